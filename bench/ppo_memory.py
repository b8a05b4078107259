"""Peak memory of one PPO round, with and without --offload, next to SFT-training the actor alone.

    .venv/bin/python bench/ppo_memory.py [--world 1 --tp 1 --dim 256 --layers 4 --buffer 8 \
        --batch 4 --new_tokens 32 --sft_steps 3 --out DIR]

Builds a random Llama actor and a same-size critic / reward model (dim x layers, vocab from a
SentencePiece model trained on synthetic math problems; `build_checkpoints` of placement.py),
then runs three jobs, each in its own `torchrun --nproc_per_node WORLD` so no peak carries over:

1. SFT of the actor alone: the real `solver_train.py`, --max_steps SFT_STEPS, micro-batch BATCH
   (per DP rank) of rows of LONGEST_PROMPT + NEW_TOKENS tokens (answers long enough to be cut
   there), i.e. the shape of a PPO minibatch. This script is the torchrun worker: it runs
   solver_train.py in-process and writes the rank's peak (the library records none for SFT);
2. one PPO round of `ppo_train.py --max_rounds 1 --offload True` with all four models (actor,
   critic from a reward-head checkpoint, reward model = that checkpoint, reference = actor
   init), --estimator gae --reward rm, minibatch BATCH; the peak per rank comes from the
   `timeline.json` the run writes in its actor save dir;
3. the same with --offload False.

Peak = torch.cuda.max_memory_allocated on CUDA (bf16 autocast, as ppo_train / solver_train run
there), else the process's peak RSS via getrusage (fp32), both from
`llama_rlhf.ppo.timeline.peak_memory_mb`; the table shows the largest rank. On CPU --offload
moves nothing (every model already lives in host memory), so the CPU figures are whole-process
RSS (Python + torch included) and the offload comparison only means something on CUDA.
Target (CUDA): PPO with offload <= 1.3 x the SFT peak.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

from placement import build_checkpoints  # bench/placement.py: sys.path[0] is bench/

ROOT = Path(__file__).resolve().parents[1]
CHILD = "--sft_child"  # argv[1] of this script when torchrun starts it as an SFT worker
TARGET = 1.3
GIB = 1024.0  # MiB per GiB


def write_sft_data(root: Path, new_tokens: int) -> int:
    """SFT records on the PPO prompts; returns the row length (longest prompt + new_tokens).
    Each answer is the solution repeated, so every row is cut at that length, as full as the
    longest PPO rollout of a random actor (which rarely stops before new_tokens)."""
    from llama_rlhf.records import write_json_atomic
    from llama_rlhf.tasks.gsm8k import format_prompt
    from llama_rlhf.tokenizers import load_tokenizer

    tok = load_tokenizer(root / "actor")
    records = json.loads((root / "prompts.json").read_text())
    longest = max(len(tok.encode(format_prompt(r["instruction"]), bos=True)) for r in records)
    sft = [{"instruction": r["instruction"], "output": " ".join([r["output"][0]] * 16)} for r in records]
    write_json_atomic(sft, str(root / "sft.json"))
    return longest + new_tokens


def sft_child(out: str, argv: list[str]) -> None:
    """torchrun worker: run solver_train.py here, then write this rank's peak to out/peak.RR.json."""
    from llama_rlhf import metrics
    from llama_rlhf.ppo.timeline import peak_memory_mb

    seen: dict = {}
    plot = metrics.MetricsLogger.plot

    def plot_after_peak(self, *a, **k) -> None:
        # fit plots last; matplotlib's import would raise the RSS after training is over
        # (ppo_train plots after its timeline snapshot too), so take the peak first.
        seen.setdefault("peak", peak_memory_mb())
        plot(self, *a, **k)

    metrics.MetricsLogger.plot = plot_after_peak
    sys.argv = [str(ROOT / "solver_train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
    mem, kind = seen.get("peak") or peak_memory_mb()
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"peak.{rank:02d}.json").write_text(json.dumps({"rank": rank, "peak_memory_mb": mem,
                                                              "memory_kind": kind}))


def torchrun(name: str, script: list, opt: argparse.Namespace, port: int) -> None:
    """`script` under torchrun with WORLD processes and cores / WORLD threads each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opt.world}",
           "--master_port", str(port), *script]
    threads = max(1, (os.cpu_count() or 1) // opt.world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([str(c) for c in cmd], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run_sft(opt: argparse.Namespace, root: Path, seq_len: int) -> float:
    """Largest rank's peak MiB of SFT_STEPS steps of solver_train.py."""
    out = root / "sft"
    out.mkdir(parents=True, exist_ok=True)
    args = ["--ckpt_dir", root / "actor", "--save_dir", out, "--train_file", root / "sft.json",
            "--max_batch_size", opt.batch, "--max_seq_len", seq_len, "--max_steps", opt.sft_steps,
            "--peak_flops", 1]  # given, so no matmul is timed for mfu: its buffers are no part of training
    torchrun("sft", [Path(__file__).resolve(), CHILD, out, *args], opt, opt.port)
    peaks = [json.loads(p.read_text())["peak_memory_mb"] for p in sorted(out.glob("peak.*.json"))]
    if len(peaks) != opt.world:
        raise SystemExit(f"sft: {len(peaks)} of {opt.world} ranks wrote their peak")
    return max(peaks)


def run_ppo(opt: argparse.Namespace, root: Path, offload: bool, port: int) -> float:
    """Largest rank's peak MiB of one PPO round (timeline.json of the actor save dir)."""
    out = root / f"ppo_offload_{offload}"
    script = [ROOT / "ppo_train.py", "--actor_ckpt_dir", root / "actor", "--actor_save_dir", out / "actor",
              "--critic_ckpt_dir", root / "critic", "--critic_save_dir", out / "critic",
              "--reward_model_ckpt_dir", root / "critic", "--train_file", root / "prompts.json",
              "--estimator", "gae", "--reward", "rm", "--max_batch_size", opt.batch,
              "--max_buffer_size", opt.buffer, "--max_rounds", 1, "--max_new_tokens", opt.new_tokens,
              "--offload", offload]
    torchrun(f"ppo --offload {offload}", script, opt, port)
    data = json.loads((out / "actor" / "timeline.json").read_text())
    return max(r["peak_memory_mb"] for r in data["ranks"])


def report(opt: argparse.Namespace, seq_len: int, sft: float, on: float, off: float, cuda: bool) -> None:
    kind = "torch.cuda.max_memory_allocated" if cuda else "peak RSS via getrusage, whole process"
    print(f"peak memory, largest rank (GiB; {kind})")
    print(f"{'run':<58} {'peak GiB':>9} {'/ SFT':>7}")
    print(f"{f'SFT actor alone ({opt.sft_steps} steps, micro-batch {opt.batch} x {seq_len} tokens)':<58} "
          f"{sft / GIB:>9.3f} {1.0:>7.2f}")
    for flag, mem in (("True", on), ("False", off)):
        print(f"{f'PPO, 1 round, --offload {flag}':<58} {mem / GIB:>9.3f} {mem / sft:>7.2f}")
    verdict = ("met" if on / sft <= TARGET else "NOT met") if cuda else "not judged on CPU"
    print(f"target: offload/SFT <= {TARGET} ({verdict}: {on / sft:.2f})")
    if not cuda:
        print("note: on CPU --offload moves nothing (every model already lives in host memory), so these "
              "figures are process RSS (Python + torch included) and the offload comparison is only "
              "meaningful on CUDA")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--buffer", type=int, default=8, help="prompts in the PPO round")
    ap.add_argument("--batch", type=int, default=4, help="PPO minibatch = SFT micro-batch (per DP rank)")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--sft_steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep the runs here")
    ap.add_argument("--port", type=int, default=29543, help="first of three torchrun master ports")
    return ap.parse_args()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        sft_child(sys.argv[2], sys.argv[3:])
        return
    opt = parse()
    import torch
    cuda = torch.cuda.is_available()
    root = Path(opt.out or tempfile.mkdtemp(prefix="bench_ppo_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    build_checkpoints(root, opt.dim, opt.layers, opt.tp, opt.buffer)
    seq_len = write_sft_data(root, opt.new_tokens)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"device {device}, world {opt.world} (TP {opt.tp}), model dim {opt.dim} x {opt.layers} layers, "
          f"buffer {opt.buffer}, batch {opt.batch}, {opt.new_tokens} new tokens; runs in {root}", flush=True)
    sft = run_sft(opt, root, seq_len)
    on = run_ppo(opt, root, True, opt.port + 1)
    off = run_ppo(opt, root, False, opt.port + 2)
    report(opt, seq_len, sft, on, off, cuda)


if __name__ == "__main__":
    main()
