"""Greedy generation speed: llama_rlhf's engine vs HF `generate`, same weights, same prompts.

    .venv/bin/python bench/generation.py [--batch 16 --prompt_len 64 --new_tokens 64 --repeats 3]

Llama config dim 512, 8 layers, 8 heads, 4 KV heads, FFN 1408, vocab 32000, fp32 on CPU with
2 threads. HF runs its defaults (sdpa attention, use_cache=True) with EOS disabled so both
make exactly `new_tokens` tokens per row; the tokens must be equal. Prints tokens/s and the ratio,
also for the engine with its CPU oneDNN GEMMs switched off (LLAMA_RLHF_ONEDNN=0).

It also prints the matmul floor: the time of the model's weight GEMMs alone for the whole run
(one prefill pass, then `new_tokens - 1` decode passes of `batch` rows; each pass runs every
weight GEMM in model order, with the fastest of MKL `F.linear`, oneDNN and pre-packed oneDNN / MKL), i.e.
what any fp32 engine on this machine must spend even with zero overhead, and the largest ratio
over HF that this floor leaves room for.

Model size: --dim --layers --heads --kv_heads --ffn --vocab (defaults: the config above).
--device auto|cpu|cuda (auto: CUDA when visible). On CUDA both models hold bf16 weights
(--dtype fp32 keeps fp32), runs are timed between `torch.cuda.synchronize()` calls, the
F.linear-only variant and the CPU kernels are skipped (the floor is F.linear alone, synchronised),
and unequal tokens are reported (rows equal, first differing position) instead of failing the
run: in bf16 two engines may break a near-tie differently.
"""
from __future__ import annotations

import argparse
import os
import time


import early_device  # noqa: E402,F401  (before torch: --device cpu hides CUDA)

import torch  # noqa: E402


def build(seed: int = 0, dim: int = 512, n_layers: int = 8, n_heads: int = 8, n_kv_heads: int = 4,
          hidden_dim: int = 1408, vocab_size: int = 32000, max_seq_len: int = 1024, device: str = "cpu",
          dtype: torch.dtype = torch.float32):
    import transformers

    from llama_rlhf.checkpoint import meta_to_hf
    from llama_rlhf.models import ModelArgs, build_model
    from llama_rlhf.models.args import hf_config_from_args

    args = ModelArgs(family="llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     hidden_dim=hidden_dim, vocab_size=vocab_size, max_seq_len=max_seq_len)
    ours = build_model(args, device, torch.float32, init_seed=seed).eval()
    cfg = hf_config_from_args(args)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()  # default: sdpa
    missing, unexpected = hf.load_state_dict(meta_to_hf(ours.state_dict(), args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours.to(dtype), hf.to(dtype), args


def add_size_flags(ap: argparse.ArgumentParser, title: str) -> None:
    """The random llama's size flags, spelled once for every bench script that builds one (the
    defaults are `build`'s); `build_from_flags` reads them back."""
    size = ap.add_argument_group(title)
    for flag, default in (("dim", 512), ("layers", 8), ("heads", 8), ("kv_heads", 4), ("ffn", 1408), ("vocab", 32000)):
        size.add_argument(f"--{flag}", type=int, default=default)


def build_from_flags(opt: argparse.Namespace, **kw):
    """`build` at the size of `add_size_flags`' flags."""
    return build(dim=opt.dim, n_layers=opt.layers, n_heads=opt.heads, n_kv_heads=opt.kv_heads,
                 hidden_dim=opt.ffn, vocab_size=opt.vocab, **kw)


def _kernels(rows: int, w: torch.Tensor) -> dict:
    """x[rows, K] @ w[N, K].T by MKL F.linear, oneDNN, and oneDNN and MKL with the weight pre-packed
    for `rows` (what inductor's freezing uses; the engine's `cpu_linears` packs for oneDNN)."""
    x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
    out = {"F.linear": lambda: torch.nn.functional.linear(x, w)}
    if w.is_cuda:
        return out
    if torch.backends.mkldnn.is_available():
        out["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        packed_dnn = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        out["oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed_dnn, None, "none", [], "")
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
    cuda = weights[0][1].is_cuda
    best = float("inf")
    for kernel in calls[0]:
        for _ in range(repeats + 1):  # the first pass warms up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for fns in calls:
                fns[kernel]()
            if cuda:
                torch.cuda.synchronize()
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
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    add_size_flags(ap, "model size")
    opt = ap.parse_args()
    torch.set_num_threads(opt.threads)

    from llama_rlhf import parallel
    from llama_rlhf.generation import generate

    device = parallel.device()  # where the library runs: CUDA whenever one is visible
    if opt.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(opt.dtype, torch.bfloat16 if cuda else torch.float32)
    ours, hf, args = build_from_flags(opt, max_seq_len=max(1024, opt.prompt_len + opt.new_tokens),
                                      device=str(device), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab_size, (opt.batch, opt.prompt_len), generator=g)
    n_tok = opt.batch * opt.new_tokens
    print(f"attention: HF {hf.config._attn_implementation}; batch {opt.batch}, prompt {opt.prompt_len}, "
          f"new {opt.new_tokens}, threads {torch.get_num_threads()}")
    if cuda or opt.dtype != "auto" or (opt.dim, opt.layers, opt.heads, opt.kv_heads, opt.ffn, opt.vocab) != \
            (512, 8, 8, 4, 1408, 32000):
        where = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"model: dim {opt.dim}, {opt.layers} layers, {opt.heads} heads / {opt.kv_heads} KV, FFN {opt.ffn}, "
              f"vocab {opt.vocab}; {where}, {str(dtype).replace('torch.', '')} weights on both sides")

    def run_ours():
        return generate(ours, prompts.tolist(), opt.new_tokens, eos_id=-1).tokens

    def run_ours_mkl():  # the engine with the model's own F.linear (MKL) instead of oneDNN GEMMs
        os.environ["LLAMA_RLHF_ONEDNN"] = "0"
        try:
            return run_ours()
        finally:
            del os.environ["LLAMA_RLHF_ONEDNN"]

    hf_prompts = prompts.to(device)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(hf_prompts, attention_mask=torch.ones_like(hf_prompts), max_new_tokens=opt.new_tokens,
                              min_new_tokens=opt.new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
        return out[:, opt.prompt_len:].tolist()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    runs = {"ours": run_ours, "ours (F.linear)": run_ours_mkl, "hf": run_hf}
    if cuda:  # LLAMA_RLHF_ONEDNN only switches CPU kernels
        del runs["ours (F.linear)"]
    tokens = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens to compare
    times: dict = {name: [] for name in runs}
    for _ in range(opt.repeats):  # interleaved, so a busy machine slows every variant alike
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    best = {name: min(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:>16}: {n_tok / best[name]:8.1f} tok/s  (best of {opt.repeats}: {best[name]:.3f} s)")
    same = all(t == tokens["hf"] for t in tokens.values())
    if cuda:
        rows = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"]))
        first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                 for a, b in zip(tokens["ours"], tokens["hf"])]
        print(f"tokens equal: {same} ({rows} of {opt.batch} rows; mean first differing position "
              f"{sum(first) / len(first):.1f} of {opt.new_tokens}); speed ratio ours/HF: {best['hf'] / best['ours']:.2f}x")
    else:
        print(f"tokens equal: {same}; speed ratio ours/HF: {best['hf'] / best['ours']:.2f}x "
              f"(with F.linear: {best['hf'] / best['ours (F.linear)']:.2f}x)")
    floor = matmul_floor(ours, opt.batch, opt.prompt_len, opt.new_tokens)
    print(f"matmul floor (weight GEMMs alone, no overhead): {n_tok / floor:8.1f} tok/s ({floor:.3f} s); "
          f"largest possible ratio over HF: {best['hf'] / floor:.2f}x; ours is at {floor / best['ours']:.0%} of it")
    if not same and not cuda and dtype == torch.float32:
        raise SystemExit("token mismatch between the engine and HF generate")


if __name__ == "__main__":
    main()
