"""PPO round time and peak memory per rank under each --placement strategy.

    .venv/bin/python bench/placement.py [--world 2 --tp 1 --rounds 4 --dim 512 --layers 8 \
        --buffer 16 --batch 4 --new_tokens 32 --strategies flattening,interleaving,separation,auto]

Builds a random Llama actor and a same-size critic / reward model (dim x layers, vocab from a
SentencePiece model trained on synthetic math problems), then for each strategy launches

    torchrun --nproc_per_node WORLD ppo_train.py ... --placement STRATEGY [--placement_file F]

with OMP_NUM_THREADS = cores / WORLD (fp32 on CPU, bf16 + offload rules of ppo_train on CUDA),
and reports the median round time of rank 0 over rounds 2.. (metrics.jsonl `time/round`; round 1
warms up), the last round's span over all ranks from its `timeline.json` (first phase start to
last phase end), and each rank's peak memory from the same file (CPU: peak RSS via getrusage,
the whole process; CUDA: torch.cuda.max_memory_allocated).
Separation uses `--placement_file` when given, else actor and critic on disjoint halves
(world 2: actor+reward on replica 0, critic+reference on replica 1). The timeline PNGs stay in
--out for a look at what overlapped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoints(root: Path, dim: int, layers: int, tp: int, prompts: int) -> None:
    from llama_rlhf.checkpoint import save_meta
    from llama_rlhf.records import write_json_atomic
    from llama_rlhf.data.synthetic import make_problems
    from llama_rlhf.models import ModelArgs, build_model
    from llama_rlhf.tokenizers import load_tokenizer, train_sentencepiece

    problems = make_problems(400, seed=0)
    sp = train_sentencepiece([p["instruction"] for p in problems] + [p["output"][0] for p in problems],
                             str(root / "sp"), 512)
    vocab = load_tokenizer(sp).vocab_size
    for name, head, seed in (("actor", 0, 0), ("critic", 1, 1)):
        args = ModelArgs(family="llama", dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 128,
                         vocab_size=vocab, max_seq_len=512, reward_head=head)
        save_meta(build_model(args, init_seed=seed).state_dict(), args, str(root / name), n=tp, tokenizer_path=sp)
    write_json_atomic(make_problems(prompts, seed=1), str(root / "prompts.json"))


def default_separation(replicas: int) -> dict:
    if replicas == 2:
        return {"actor": [0], "reward": [0], "critic": [1], "reference": [1]}
    half = list(range(replicas // 2)), list(range(replicas // 2, replicas))
    return {"actor": half[0], "critic": half[1], "reference": half[1][:max(1, len(half[1]) // 2)],
            "reward": half[1][len(half[1]) // 2:] or half[1]}


def run(strategy: str, opt, root: Path) -> dict:
    out = root / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opt.world}", "--master_port",
           str(opt.port), str(ROOT / "ppo_train.py"), "--actor_ckpt_dir", root / "actor", "--actor_save_dir",
           out / "actor", "--critic_ckpt_dir", root / "critic", "--critic_save_dir", out / "critic",
           "--reward_model_ckpt_dir", root / "critic", "--train_file", root / "prompts.json",
           "--max_batch_size", opt.batch, "--max_buffer_size", opt.buffer, "--max_rounds", opt.rounds,
           "--max_new_tokens", opt.new_tokens, "--placement", strategy]
    if strategy == "separation":
        path = opt.placement_file or str(root / "separation.json")
        if not opt.placement_file:
            Path(path).write_text(json.dumps(default_separation(opt.world // opt.tp)))
        cmd += ["--placement_file", path]
    threads = max(1, (os.cpu_count() or 1) // opt.world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads((out / "actor" / "timeline.json").read_text())
    rows = [json.loads(line) for line in (out / "actor" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/round"] for r in rows if "time/round" in r][1:]  # round 1 warms up
    data["median_round"] = statistics.median(times) if times else data["round_time"]
    return data


def row(strategy: str, data: dict) -> str:
    mems = " ".join(f"{r['peak_memory_mb']:.0f}" for r in data["ranks"])
    return f"{strategy:<13} {data['strategy']:<13} {data['median_round']:>9.2f} {data['round_time']:>9.2f}   {mems}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--strategies", default="flattening,interleaving,separation,auto")
    ap.add_argument("--placement_file", default=None)
    ap.add_argument("--out", default=None, help="keep runs (timeline.png per strategy) here")
    ap.add_argument("--port", type=int, default=29533)
    opt = ap.parse_args()
    root = Path(opt.out or tempfile.mkdtemp(prefix="bench_placement_"))
    root.mkdir(parents=True, exist_ok=True)
    build_checkpoints(root, opt.dim, opt.layers, opt.tp, opt.buffer * opt.rounds)
    kind = "GPU max_memory_allocated" if _cuda() else "CPU peak RSS"
    print(f"world {opt.world} (TP {opt.tp}), {os.cpu_count()} cores, model dim {opt.dim} x {opt.layers} layers, "
          f"buffer {opt.buffer}, batch {opt.batch}, {opt.new_tokens} new tokens, {opt.rounds} rounds; runs in {root}")
    print(f"{'--placement':<13} {'ran as':<13} {'median (s)':>9} {'last (s)':>9}   peak MB per rank ({kind})")
    for strategy in opt.strategies.split(","):
        data = run(strategy, opt, root)
        print(row(strategy, data), flush=True)
        if strategy == "auto":
            print(f"  {data['placement']}")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
