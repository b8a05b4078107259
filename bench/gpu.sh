#!/usr/bin/env bash
# The GPU pass: CUDA checks and benchmarks on one H100 / H200, at most ~5 minutes, every figure in ONE
# file, appended part by part (a run cut short still reports the parts it finished).
#
#   bash bench/gpu.sh [FIGURES_FILE]               # default $OUT/gpu_figures.txt, else runs/gpu_figures.txt
#   bash bench/gpu.sh --cpu-dry-run [FIGURES_FILE] # tiny sizes on the CPU with .venv: catches errors, measures nothing
#
# Needs bench/wheels (bash bench/gpu_wheels.sh where a registry is reachable; git-ignored, so carry
# it with the checkout: the device tool's run(command="bash bench/gpu.sh", carry=["bench/wheels"],
# timeout_s=330); 17 wheels, 27 MiB). The machine is assumed to have Python 3.12 with torch, transformers and
# numpy only: the wheels are installed with --no-index --no-deps into a target dir put on
# PYTHONPATH after src/, so the machine's torch stays the one used.
#
# Parts, each under `timeout` within one overall budget (GPU_BUDGET_S, default 295 s):
#   0. machine, versions; wheels installed and imported
#   a. bench/gpu_checks.py: ours vs HF logits (fp32, bf16 autocast, bf16 weights) on random weights of
#      SmolLM2-135M's shape and a GQA llama, linear_cross_entropy in bf16, greedy generate; PASS / FAIL
#   b. bench/train.py: training tokens/s and MFU, ours vs HF, ~1.1B random llama (dim 2048, 16 layers,
#      32 / 8 heads, FFN 8192, vocab 32000), batch 4 x 2048, fp32 weights + bf16 autocast
#   c. bench/generation.py: greedy tokens/s, ours vs HF, bf16, the same 1.1B model, batch 64, 128 + 128
#      tokens; c'. bench/rollout.py --random (last: its time is the least known): sampled rollouts of
#      SmolLM2's shape, continuous batching vs HF, 32 prompts x 4 samples, 128 new tokens
#   d. bench/ppo_memory.py: peak torch.cuda.max_memory_allocated of one PPO round with / without
#      --offload against SFT of the actor alone (target: offload <= 1.3 x SFT); actor dim 1024 x 8
#      layers, buffer 16, minibatch 4, 64 new tokens
# Caps (s): install 30, versions 20, a 45, b 70, c 60, d 100, rollout 45; a part gets what is left of
# the budget when less, and is skipped under 15 s.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
if [ -n "${1:-}" ]; then FIG=$1
elif [ -n "${OUT:-}" ]; then FIG=$OUT/gpu_figures.txt
else FIG=runs/gpu_figures.txt; fi
mkdir -p "$(dirname "$FIG")"
: > "$FIG"
BUDGET=${GPU_BUDGET_S:-295}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama_rlhf_gpu.XXXXXX")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

log() { echo "$*" >> "$FIG"; }

# part NAME CAP_SECONDS CMD...: run CMD with stdout appended to $FIG as it comes, under
# timeout min(CAP, what is left of the budget); stderr's tail is appended when it fails.
part() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS)) t rc start=$SECONDS
  t=$(( cap < left ? cap : left ))
  log ""
  log "=== $name ($(date -u +%H:%M:%S) UTC, limit ${t} s) ==="
  if [ "$t" -lt 15 ]; then log "SKIPPED: ${left} s of the ${BUDGET} s budget left"; return; fi
  timeout -k 5 "$t" "$@" >> "$FIG" 2> "$WORK/$name.err"
  rc=$?
  if [ $rc -ne 0 ]; then
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "TIMEOUT after ${t} s (exit $rc)"; else log "FAILED (exit $rc)"; fi
    log "--- last lines of stderr ---"
    tail -n 25 "$WORK/$name.err" >> "$FIG"
  fi
  log "--- $name: $((SECONDS - start)) s, exit $rc ---"
}

if [ $DRY -eq 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  DEV=(--device cpu)
else
  PY=${PYTHON:-python3}
  DEV=(--device cuda)
fi

# ---------------------------------------------------------------- 0. machine and wheels
log "llama_rlhf bench/gpu.sh, $(date -u '+%Y-%m-%d %H:%M:%S') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ $DRY -eq 1 ] && echo ', CPU DRY RUN (tiny sizes; no figure means anything)')"
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: none')"
log "cpus $(nproc), $($PY --version 2>&1)"
SITE=$WORK/site
if [ $DRY -eq 0 ]; then
  install_wheels() {
    ls bench/wheels/*.whl > /dev/null 2>&1 || { echo "bench/wheels/*.whl: none (run bench/gpu_wheels.sh, carry bench/wheels)"; return 1; }
    if $PY -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" bench/wheels/*.whl; then
      echo "pip installed $(ls bench/wheels/*.whl | wc -l) wheels into $SITE"
    else  # no pip (or it refused): a wheel is a zip laid out as site-packages
      for w in bench/wheels/*.whl; do $PY -m zipfile -e "$w" "$SITE" || return 1; done
      echo "pip unusable: unzipped $(ls bench/wheels/*.whl | wc -l) wheels into $SITE"
    fi
  }
  export -f install_wheels; export PY SITE WORK  # timeout runs programs, not functions
  part install 30 bash -c install_wheels
  export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  # the wheels are CPython 3.12's: here only check that pip accepts the set for such a target
  check_wheels() {
    $PY -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$WORK/site312" \
      --python-version 3.12 --implementation cp --abi cp312 --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      bench/wheels/*.whl 2> >(grep -v "is ignored: it is neither" >&2) &&
    echo "pip accepts the $(ls bench/wheels/*.whl | wc -l) wheels ($(du -sh bench/wheels | cut -f1)) for CPython 3.12 manylinux x86_64"
  }
  export -f check_wheels; export PY SITE WORK
  part install_check 60 bash -c check_wheels
  export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
fi
part versions 20 $PY -c "
import importlib, torch, transformers, numpy
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'numpy', numpy.__version__)
missing = []
for m in ('fire', 'fairscale', 'gguf', 'sentencepiece', 'tiktoken', 'jinja2', 'matplotlib', 'safetensors', 'tqdm', 'yaml'):
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f'{m} ({type(e).__name__}: {e})')
print('imports:', 'all ok' if not missing else 'MISSING ' + '; '.join(missing))
import llama_rlhf.trainers.sft, llama_rlhf.ppo.run  # the library imports whole
print('llama_rlhf imports ok')
"

# ---------------------------------------------------------------- a. CUDA checks
if [ $DRY -eq 1 ]; then
  part a_checks 60 $PY bench/gpu_checks.py "${DEV[@]}" --small
else
  part a_checks 45 $PY bench/gpu_checks.py "${DEV[@]}"
fi

# ---------------------------------------------------------------- b. training MFU
if [ $DRY -eq 1 ]; then
  SIZE=(--dim 64 --layers 2 --heads 4 --kv_heads 2 --ffn 128 --vocab 512)
  part b_train 60 $PY bench/train.py "${DEV[@]}" "${SIZE[@]}" --batch 2 --seq 64 --steps 1
else
  SIZE=(--dim 2048 --layers 16 --heads 32 --kv_heads 8 --ffn 8192 --vocab 32000)
  part b_train 70 $PY bench/train.py "${DEV[@]}" "${SIZE[@]}" --batch 4 --seq 2048 --steps 5
fi

# ---------------------------------------------------------------- c. generation
if [ $DRY -eq 1 ]; then
  part c_generation 60 $PY bench/generation.py "${DEV[@]}" "${SIZE[@]}" --batch 2 --prompt_len 8 --new_tokens 8 --repeats 1
else
  part c_generation 60 $PY bench/generation.py "${DEV[@]}" "${SIZE[@]}" --batch 64 --prompt_len 128 --new_tokens 128 --repeats 2
fi

# ---------------------------------------------------------------- d. PPO memory with --offload
if [ $DRY -eq 1 ]; then
  part d_ppo_memory 120 $PY bench/ppo_memory.py --dim 128 --layers 2 --buffer 4 --batch 2 --new_tokens 8 --sft_steps 1 --out "$WORK/ppo_memory"
else
  part d_ppo_memory 100 $PY bench/ppo_memory.py --dim 1024 --layers 8 --buffer 16 --batch 4 --new_tokens 64 --sft_steps 3 --out "$WORK/ppo_memory"
fi

# ---------------------------------------------------------------- c'. sampled rollouts, continuous batching vs HF
# --random: SmolLM2's shape with random weights (its wheel is too large to carry), random prompts.
if [ $DRY -eq 1 ]; then
  part c_rollout 120 $PY bench/rollout.py "${DEV[@]}" --random --prompts 2 --samples 2 --new_tokens 4 --batch 1
else
  part c_rollout 45 $PY bench/rollout.py "${DEV[@]}" --random --prompts 32 --samples 4 --new_tokens 128 --batch 16
fi

log ""
log "=== done in ${SECONDS} s (budget ${BUDGET} s) ==="
cat "$FIG"
