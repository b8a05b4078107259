"""CUDA checks of llama_rlhf against HF transformers on the same random weights: the GPU subset of
tests/test_models.py, tests/test_linear_ce.py and tests/test_generation.py, one PASS / FAIL line each.

    PYTHONPATH=src python bench/gpu_checks.py [--device auto|cpu] [--small]

Models (random weights, `build_model(init_seed=)`, copied into HF's `LlamaForCausalLM` by
`meta_to_hf`): SmolLM2-135M's shape (dim 576, 30 layers, 9 heads / 3 KV heads, FFN 1536, vocab
49152, tied embeddings; its real weights are too large to carry to the GPU machine) and a GQA llama
with an untied output (dim 1024, 8 layers, 16 / 4 heads, FFN 2816, vocab 32000). Batch 2 x 128.

1. logits, fp32 (TF32 off): ours vs HF, tolerance 1e-3.
2. logits, fp32 weights under bf16 autocast (the training mode) and bf16 weights (the inference
   mode), ours vs HF. bf16 tolerance: 3 x HF's own bf16 error (max |HF bf16 - HF fp32|), i.e.
   ours may differ from HF by no more than the rounding HF already shows against fp32.
3. `scoring.linear_cross_entropy` under bf16 autocast (the SFT loss; 3000 rows, vocab 49152,
   gradient formed in the forward) vs autograd of F.cross_entropy over fp32 logits: loss and both
   gradients, relative max error, tolerance 3 x that of the same plain computation under autocast.
4. greedy `generation.generate` vs HF `generate`, bf16 weights, 4 prompts x 32 new tokens:
   tokens equal per row (reported, not judged: in bf16 a near-tie may flip either way).

--small: tiny sizes on any device, for a dry run (catches errors, judges nothing real).
Exit status 1 when any check FAILs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")


import early_device  # noqa: E402,F401  (before torch: --device cpu hides CUDA)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS: list[tuple[str, bool]] = []


def verdict(name: str, ok: bool | None, detail: str) -> None:
    tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{tag} {name}: {detail}", flush=True)
    if ok is not None:
        RESULTS.append((name, ok))


def build_pair(shape: dict, device: torch.device, seed: int):
    """Ours with random weights and HF's LlamaForCausalLM holding the same weights, fp32."""
    import transformers

    from llama_rlhf.checkpoint import meta_to_hf
    from llama_rlhf.models import ModelArgs, build_model
    from llama_rlhf.models.args import hf_config_from_args

    args = ModelArgs(family="llama", max_seq_len=512, **shape)
    ours = build_model(args, device, torch.float32, init_seed=seed).eval()
    cfg = hf_config_from_args(args)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf(ours.state_dict(), args), strict=False)
    allowed = ("rotary", "lm_head") if args.tie_word_embeddings else ("rotary",)
    assert not unexpected and all(any(a in k for a in allowed) for k in missing), (missing, unexpected)
    if args.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "HF did not tie"
    return ours, hf, args


def logits_checks(label: str, shape: dict, device: torch.device, seq: int) -> None:
    import copy

    ours, hf, args = build_pair(shape, device, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, seq), generator=g).to(device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        ref_hf = hf(tokens).logits.float()
        ref_ours = ours(tokens).float()
        d32 = (ref_ours - ref_hf).abs().max().item()
        verdict(f"{label} logits fp32", d32 <= 1e-3, f"max |ours - HF| {d32:.2e} (tol 1e-3; |logits| max "
                f"{ref_hf.abs().max().item():.2f})")
        with autocast():
            hf_ac, ours_ac = hf(tokens).logits.float(), ours(tokens).float()
        _bf16_verdict(f"{label} logits bf16 autocast", ours_ac, hf_ac, ref_hf)
        hf16, ours16 = copy.deepcopy(hf).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
        _bf16_verdict(f"{label} logits bf16 weights", ours16(tokens).float(), hf16(tokens).logits.float(), ref_hf)
    del ours, hf, hf16, ours16


def _bf16_verdict(name: str, ours: torch.Tensor, hf: torch.Tensor, ref32: torch.Tensor) -> None:
    d = (ours - hf).abs().max().item()
    hf_err = (hf - ref32).abs().max().item()
    ours_err = (ours - ref32).abs().max().item()
    tol = 3 * hf_err + 1e-6
    verdict(name, d <= tol, f"max |ours - HF| {d:.3e} (tol 3 x HF's bf16 error = {tol:.3e}); vs fp32: ours "
            f"{ours_err:.3e}, HF {hf_err:.3e}; mean |ours - HF| {(ours - hf).abs().mean().item():.2e}")


def linear_ce_check(device: torch.device, n: int, dim: int, vocab: int) -> None:
    from llama_rlhf.scoring import linear_cross_entropy

    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(n, dim, generator=g).to(device)
    w0 = (torch.randn(vocab, dim, generator=g) * 0.05).to(device)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    scale = 1.0 / n  # the trainer's 1 / tokens

    def run(fn, ac: bool):
        h, lin = h0.clone().requires_grad_(), torch.nn.Linear(dim, vocab, bias=False, device=device)
        with torch.no_grad():
            lin.weight.copy_(w0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ac):
            loss = fn(h, lin)
        (loss * scale).backward()
        return loss.detach().float(), h.grad.float(), lin.weight.grad.float()

    plain = lambda h, lin: F.cross_entropy(lin(h).float(), y, reduction="sum")  # noqa: E731
    ref = run(plain, ac=False)
    base = run(plain, ac=True)  # the plain computation's own bf16 error
    ours = run(lambda h, lin: linear_cross_entropy(h, lin, y), ac=True)
    names = ("loss", "grad h", "grad W")
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    errs = [rel(o, r) for o, r in zip(ours, ref)]
    base_errs = [rel(b, r) for b, r in zip(base, ref)]
    ok = all(e <= 3 * b + 1e-6 for e, b in zip(errs, base_errs))
    detail = "; ".join(f"{k} rel err {e:.2e} (plain bf16 {b:.2e})" for k, e, b in zip(names, errs, base_errs))
    verdict(f"linear_cross_entropy bf16 autocast, {n} x {vocab}", ok, detail + " (tol 3 x plain)")


def generation_check(device: torch.device, shape: dict, new_tokens: int) -> None:
    from llama_rlhf.generation import generate

    ours, hf, args = build_pair(shape, device, seed=3)
    ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, args.vocab_size, (4, 16), generator=g)
    t0 = time.perf_counter()
    mine = generate(ours, prompts.tolist(), new_tokens, eos_id=-1).tokens
    t1 = time.perf_counter()
    with torch.no_grad():
        p = prompts.to(device)
        out = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    t2 = time.perf_counter()
    theirs = out[:, prompts.shape[1]:].tolist()
    equal = sum(a == b for a, b in zip(mine, theirs))
    first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(mine, theirs)]
    verdict("greedy generate bf16 vs HF generate", None,
            f"{equal} of {len(mine)} rows equal; first differing position per row {first} of {new_tokens} "
            f"(ours {t1 - t0:.2f} s, HF {t2 - t1:.2f} s, incl. warm-up)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a dry run)")
    opt = ap.parse_args()
    from llama_rlhf import parallel

    device = parallel.device()
    if opt.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks mean fp32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}", flush=True)
    if opt.small:
        smol = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512,
                    tie_word_embeddings=True)
        gqa = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=160, vocab_size=384)
        seq, ce = 32, (100, 64, 512)
    else:
        smol = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                    tie_word_embeddings=True)
        gqa = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=2816, vocab_size=32000)
        seq, ce = 128, (3000, 576, 49152)
    for label, shape in (("SmolLM2-135M shape (tied)", smol), ("GQA llama (untied)", gqa)):
        logits_checks(label, shape, device, seq)
    linear_ce_check(device, *ce)
    generation_check(device, gqa, 32)
    failed = [n for n, ok in RESULTS if not ok]
    print(f"checks: {len(RESULTS) - len(failed)} of {len(RESULTS)} PASS" + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
