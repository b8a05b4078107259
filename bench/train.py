"""Training speed: llama_rlhf's trainer step vs HF `LlamaForCausalLM`, same weights, same batch.

    .venv/bin/python bench/train.py [--batch 8 --seq 256 --steps 4 --threads 2]

Llama config dim 512, 8 layers, 8 heads, 4 KV heads, FFN 1408, vocab 32000, fp32 on CPU. One
optimizer step = forward + backward over batch x seq tokens (every position a target on both
sides), gradient clipping at 1.0, AdamW (torch's fused kernel on both sides). Ours is
`Trainer.train_step` with the SFT objective; HF is `model(input_ids, labels=...)` + the same
optimizer. Steps alternate between the two, so background load hits both alike.

Two clocks, because this machine is shared: wall time (fastest step), and CPU time of the
process / threads (fastest step), which other processes disturb far less. OpenMP threads
sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE, set before torch loads)
so that CPU time is work, not waiting. MFU = 6·N·tokens/s over a fp32 matmul peak measured
(2048^3, best of runs, on the same clock) in the same run, N = weights that do matmuls (all
but the input embedding); the attention-inclusive figure adds 6·L·d·T FLOPs per token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def build(seed: int = 0):
    import transformers

    from llama_rlhf.checkpoint import meta_to_hf
    from llama_rlhf.models import ModelArgs, build_model
    from llama_rlhf.models.args import hf_config_from_args

    args = ModelArgs(family="llama", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1408,
                     vocab_size=32000, max_seq_len=1024)
    ours = build_model(args, "cpu", torch.float32, init_seed=seed)
    cfg = hf_config_from_args(args)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)  # default: sdpa
    missing, unexpected = hf.load_state_dict(meta_to_hf(ours.state_dict(), args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours.train(), hf.train(), args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    opt = ap.parse_args()
    torch.set_num_threads(opt.threads)

    from llama_rlhf import parallel
    from llama_rlhf.metrics import mfu
    from llama_rlhf.trainers.base import Trainer
    from llama_rlhf.trainers.config import TrainConfig
    from llama_rlhf.trainers.sft import sft_objective

    ours, hf, args = build()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, args.vocab_size, (opt.batch, opt.seq + 1), generator=g)
    tokens, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    batch = {"tokens": tokens, "targets": targets, "mask": torch.ones_like(tokens, dtype=torch.bool),
             "n_tokens": tokens.numel()}
    n_tok = tokens.numel()

    cfg = TrainConfig(ckpt_dir="", save_dir=tempfile.mkdtemp(), train_file="", max_batch_size=opt.batch, lr=1e-5,
                      max_grad_norm=1.0, max_steps=1000, progress=False)
    trainer = Trainer(ours, sft_objective, opt.batch, lambda idx, ep: batch, cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    def ours_step() -> float:
        return trainer.train_step([batch])["loss"]

    def hf_step() -> float:
        loss = hf(input_ids=tokens, labels=tokens).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    # sanity: same weights, same loss (HF shifts inside, so it scores seq-1 positions per row)
    with torch.no_grad():
        hf_loss0 = hf(input_ids=tokens, labels=tokens).loss.item()
        h = ours.hidden(tokens)
        ref = torch.nn.functional.cross_entropy(ours.output(h[:, :-1]).flatten(0, 1), targets[:, :-1].flatten())
    print(f"loss check: ours {ref.item():.6f}  HF {hf_loss0:.6f}")

    def matmul_peak(n: int = 2048, repeats: int = 3) -> tuple[float, float]:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.matmul(a, b, out=out)
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.matmul(a, b, out=out)
            best_wall = min(best_wall, time.perf_counter() - t0)
            best_cpu = min(best_cpu, (time.process_time() - c0) / opt.threads)
        return 2 * n ** 3 / best_wall, 2 * n ** 3 / best_cpu

    peak = {"wall": 0.0, "cpu": 0.0}
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in ("ours", "hf")}
    for i in range(opt.steps + 1):  # the first round warms up
        w, c = matmul_peak()
        peak = {"wall": max(peak["wall"], w), "cpu": max(peak["cpu"], c)}
        for name, fn in (("ours", ours_step), ("hf", hf_step)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append((time.process_time() - c0) / opt.threads)

    n_params = parallel.param_count(ours, exclude=("tok_embeddings",))
    attn_flops = 6 * args.n_layers * args.dim * opt.seq  # causal QK^T and PV (half of 12·L·d·T), fwd + bwd
    print(f"config: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, batch {opt.batch} x {opt.seq}, "
          f"fp32, {opt.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"N = {n_params / 1e6:.1f}M matmul params")
    tps = {}
    for clock in ("wall", "cpu"):
        print(f"[{clock} clock] matmul peak {peak[clock] / 1e9:.1f} GFLOP/s")
        for name in ("ours", "hf"):
            ts = times[name][clock]
            best = min(ts)
            tps[name, clock] = n_tok / best
            util = mfu(tps[name, clock], n_params, peak[clock])
            with_attn = (6 * n_params + attn_flops) * tps[name, clock] / peak[clock]
            print(f"  {name:>4}: step {best:.3f} s (median {statistics.median(ts):.3f}), "
                  f"{tps[name, clock]:,.0f} tokens/s, MFU {util:.1%} (with attention FLOPs {with_attn:.1%})")
        print(f"  ratio ours / HF: {tps['ours', clock] / tps['hf', clock]:.2f}x")


if __name__ == "__main__":
    main()
