"""Greedy generation speed: llama_rlhf's engine vs HF `generate`, same weights, same prompts.

    .venv/bin/python bench/generation.py [--batch 16 --prompt_len 64 --new_tokens 64 --repeats 3]

Llama config dim 512, 8 layers, 8 heads, 4 KV heads, FFN 1408, vocab 32000, fp32 on CPU with
2 threads. HF runs its defaults (sdpa attention, use_cache=True) with EOS disabled so both
make exactly `new_tokens` tokens per row; the tokens must be equal. Prints tokens/s and the ratio,
also for the engine with its CPU oneDNN GEMMs switched off (LLAMA_RLHF_ONEDNN=0).

It also prints the matmul floor: the time of the model's weight GEMMs alone for the whole run
(one prefill pass, then `new_tokens - 1` decode passes of `batch` rows; each pass runs every
weight GEMM in model order, with the fastest of MKL `F.linear`, oneDNN and pre-packed MKL), i.e.
what any fp32 engine on this machine must spend even with zero overhead, and the largest ratio
over HF that this floor leaves room for.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def build(seed: int = 0):
    import transformers

    from llama_rlhf.checkpoint import meta_to_hf
    from llama_rlhf.models import ModelArgs, build_model
    from llama_rlhf.models.args import hf_config_from_args

    args = ModelArgs(family="llama", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1408,
                     vocab_size=32000, max_seq_len=1024)
    ours = build_model(args, "cpu", torch.float32, init_seed=seed).eval()
    cfg = hf_config_from_args(args)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()  # default: sdpa
    missing, unexpected = hf.load_state_dict(meta_to_hf(ours.state_dict(), args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours, hf, args


def _kernels(rows: int, w: torch.Tensor) -> dict:
    """x[rows, K] @ w[N, K].T by MKL F.linear, oneDNN, and MKL with the weight pre-packed for
    `rows` (what inductor's freezing uses)."""
    x = torch.randn(rows, w.shape[1])
    out = {"F.linear": lambda: torch.nn.functional.linear(x, w)}
    if torch.backends.mkldnn.is_available():
        out["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    if torch._C.has_mkl:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        out["MKL packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
    return out


def _pass_seconds(model, rows_of, repeats: int = 5) -> float:
    """Best time, over kernels, of one pass over every weight GEMM in model order. A pass
    streams all weights from memory as a real forward does (timing one GEMM in a loop would
    keep its weight in cache and flatter the floor)."""
    weights = [(name, m.weight.detach()) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    calls = [_kernels(rows_of(name), w) for name, w in weights]
    best = float("inf")
    for kernel in calls[0]:
        for _ in range(repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            for fns in calls:
                fns[kernel]()
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_floor(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Seconds of weight GEMMs for one run: the prefill (every layer on batch x prompt_len rows,
    the output layer on the last position only) and new_tokens - 1 decode steps of batch rows."""
    prefill = _pass_seconds(model, lambda name: batch if name == "output" else batch * prompt_len)
    return prefill + (new_tokens - 1) * _pass_seconds(model, lambda name: batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    opt = ap.parse_args()
    torch.set_num_threads(opt.threads)

    from llama_rlhf.generation import generate

    ours, hf, args = build()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab_size, (opt.batch, opt.prompt_len), generator=g)
    n_tok = opt.batch * opt.new_tokens
    print(f"attention: HF {hf.config._attn_implementation}; batch {opt.batch}, prompt {opt.prompt_len}, "
          f"new {opt.new_tokens}, threads {torch.get_num_threads()}")

    def run_ours():
        return generate(ours, prompts.tolist(), opt.new_tokens, eos_id=-1).tokens

    def run_ours_mkl():  # the engine with the model's own F.linear (MKL) instead of oneDNN GEMMs
        os.environ["LLAMA_RLHF_ONEDNN"] = "0"
        try:
            return run_ours()
        finally:
            del os.environ["LLAMA_RLHF_ONEDNN"]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=opt.new_tokens,
                              min_new_tokens=opt.new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
        return out[:, opt.prompt_len:].tolist()

    runs = {"ours": run_ours, "ours (F.linear)": run_ours_mkl, "hf": run_hf}
    tokens = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens to compare
    times: dict = {name: [] for name in runs}
    for _ in range(opt.repeats):  # interleaved, so a busy machine slows every variant alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {name: min(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:>16}: {n_tok / best[name]:8.1f} tok/s  (best of {opt.repeats}: {best[name]:.3f} s)")
    same = all(t == tokens["hf"] for t in tokens.values())
    print(f"tokens equal: {same}; speed ratio ours/HF: {best['hf'] / best['ours']:.2f}x "
          f"(with F.linear: {best['hf'] / best['ours (F.linear)']:.2f}x)")
    floor = matmul_floor(ours, opt.batch, opt.prompt_len, opt.new_tokens)
    print(f"matmul floor (weight GEMMs alone, no overhead): {n_tok / floor:8.1f} tok/s ({floor:.3f} s); "
          f"largest possible ratio over HF: {best['hf'] / floor:.2f}x; ours is at {floor / best['ours']:.0%} of it")
    if not same:
        raise SystemExit("token mismatch between the engine and HF generate")


if __name__ == "__main__":
    main()
