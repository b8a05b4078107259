"""Packed rows' attention: `scoring.PackedAttention` (each response in a short row of its own:
its prompt, then itself) against the one dense [T, T] mask it replaced, on SmolLM2-135M's shape.

    .venv/bin/python bench/packed_attention.py [--rows 4 --samples 4 --prompt 80 --response 128]

The GRPO round's micro-batch of bench/grpo_vs_trl.py: `--rows` prompts of `--prompt` random
tokens, each with `--samples` responses of `--response` tokens, packed one prompt per row
(`scoring.packed_batch`). Random weights of SmolLM2's shape (30 layers, dim 576, 9 / 3 heads,
vocab 49152, fp32), `--threads` threads. Timed, interleaved `--reps` times (medians): PPO's
no-grad action log-probs (the reference pass), and the log-probs + entropy forward and backward
(the actor's). Both sides run the same `scoring.action_logprobs`; the dense side hands the model
the mask in place of the layout. The log-probs of both sides are compared (max abs diff).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from llama_rlhf import scoring
from llama_rlhf.models import build_model, causal_mask, preset_args


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=80)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


@contextmanager
def dense_mask(model, seg: torch.Tensor):
    """forward_hidden with the dense mask: a response sees the prompt and its own segment."""
    inner = model.hidden

    def hidden(tokens, positions=None, mask=None, cache=None, **kw):
        if isinstance(cache, scoring.PackedAttention):
            q_seg, k_seg = seg[:, None, :, None], seg[:, None, None, :]
            mask = causal_mask(positions, positions) & ((q_seg == k_seg) | ((k_seg == 0) & (q_seg > 0)))
            cache = None
        return inner(tokens, positions=positions, mask=mask, cache=cache, **kw)

    model.hidden = hidden
    try:
        yield
    finally:
        del model.hidden


def main() -> None:
    opt = parse()
    torch.set_num_threads(opt.threads)
    args = preset_args("llama-tiny", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                       vocab_size=49152, max_seq_len=2048)
    model = build_model(args, init_seed=0)
    g = torch.Generator().manual_seed(0)
    prompts, responses, groups = [], [], []
    for _ in range(opt.rows):
        p = torch.randint(3, 49152, (opt.prompt,), generator=g).tolist()
        groups.append(list(range(len(prompts), len(prompts) + opt.samples)))
        for _ in range(opt.samples):
            prompts.append(p)
            responses.append(torch.randint(3, 49152, (opt.response,), generator=g).tolist())
    batch = scoring.packed_batch(prompts, responses, groups, pad_id=0)

    def reference():
        with torch.no_grad():
            return scoring.action_logprobs(model, batch)

    def actor():
        logp, ent = scoring.action_logprobs(model, batch, with_entropy=True)
        (logp.sum() + 0.01 * ent.sum()).backward()

    split = reference()
    with dense_mask(model, batch.segments):
        dense = reference()
    print(f"{opt.rows} rows x {opt.samples} responses, prompt {opt.prompt} + responses {opt.response} tokens "
          f"({batch.tokens.shape[1]} columns a row), SmolLM2 shape, random fp32 weights, {opt.threads} threads; "
          f"log-probs max abs diff split / dense: {(split - dense).abs().max().item():.2e}")
    times = {(name, side): [] for name in ("reference (no grad)", "actor (fwd + bwd)") for side in ("dense", "split")}
    for _ in range(opt.reps):
        for name, f in (("reference (no grad)", reference), ("actor (fwd + bwd)", actor)):
            for side in ("dense", "split"):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                if side == "dense":
                    with dense_mask(model, batch.segments):
                        f()
                else:
                    f()
                times[(name, side)].append(time.perf_counter() - t0)
    for name in ("reference (no grad)", "actor (fwd + bwd)"):
        d, s = (statistics.median(times[(name, side)]) for side in ("dense", "split"))
        print(f"{name:20s} dense mask {d:6.2f} s   PackedAttention {s:6.2f} s   dense / split: {d / s:.2f}x")


if __name__ == "__main__":
    main()
