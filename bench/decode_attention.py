"""Decode-step attention at bench/rollout.py's shape: is it bound by memory bandwidth, and would a
shared-prefix cache (each prompt's keys read once for its K samples) pay off on this machine?

    .venv/bin/python bench/decode_attention.py [--prompts 16 --samples 4 --prompt_len 95 --generated 160]

SmolLM2-135M's attention shape (30 layers, 3 key heads of 3 query heads each, head dim 64), fp32,
one decode step of `--prompts` x `--samples` rows, each at column prompt_len + generated. Every
row's keys live in a head-major cache [rows, 3, width, 64] as the engine keeps them. Three ways to
attend, interleaved `--reps` times, medians printed:

* engine: the engine's own `generation.SlotCache` (its decode step: the step's new key / value
  written at each row's column, then sdpa over chunks of `_ATTN_CHUNK` slots with additive masks,
  the three query heads of a key head as its query rows);
* matmul: scores = q k^T, softmax, times v: two batched matmuls, no kernel of sdpa's;
* shared prefix: a cascade. The K samples of a prompt attend its prompt keys (stored once per
  prompt) together, K x 3 query rows per key head, then their own generated keys; one softmax over both parts.
  This reads the prompt keys once instead of K times.

Also printed: the bytes of keys and values each way reads, the GB/s that gives, and the stream bandwidth of a
1 GiB `sum`, fastest of three (the most any way could read at). Outputs are checked against each other (max abs diff).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama_rlhf.generation import SlotCache, _chunk_extents
from llama_rlhf.models import preset_args

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt_len", type=int, default=95)
    ap.add_argument("--generated", type=int, default=160, help="tokens each row has generated so far")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def matmul(q, k, v, mask):
    B, H, _, D = q.shape
    qg = q.view(B, KV_HEADS, GROUP, D) * D ** -0.5
    p = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)) + mask, dim=-1)  # [B, H_kv, G, S]
    return torch.matmul(p, v).view(B, H, 1, D)


def shared_prefix(q, pk, pv, k, v, samples: int):
    """pk, pv [P, H_kv, Lp, D]: each prompt's keys once; k, v [B, H_kv, Sg, D]: the rows' own."""
    B, H, _, D = q.shape
    P, Lp = pk.shape[0], pk.shape[2]
    qg = q.view(B, KV_HEADS, GROUP, D) * D ** -0.5
    qp = qg.view(P, samples, KV_HEADS, GROUP, D).transpose(1, 2).reshape(P, KV_HEADS, samples * GROUP, D)
    s1 = torch.matmul(qp, pk.transpose(-1, -2))  # [P, H_kv, K G, Lp]
    s1 = s1.view(P, KV_HEADS, samples, GROUP, Lp).transpose(1, 2).reshape(B, KV_HEADS, GROUP, Lp)
    s2 = torch.matmul(qg, k.transpose(-1, -2))  # [B, H_kv, G, Sg]
    m = torch.maximum(s1.amax(-1, keepdim=True), s2.amax(-1, keepdim=True))
    e1, e2 = (s1 - m).exp(), (s2 - m).exp()
    den = e1.sum(-1, keepdim=True) + e2.sum(-1, keepdim=True)
    e1 = e1.view(P, samples, KV_HEADS, GROUP, Lp).transpose(1, 2).reshape(P, KV_HEADS, samples * GROUP, Lp)
    o1 = torch.matmul(e1, pv).view(P, KV_HEADS, samples, GROUP, D).transpose(1, 2).reshape(B, KV_HEADS, GROUP, D)
    return ((o1 + torch.matmul(e2, v)) / den).view(B, H, 1, D)


def stream_gbs() -> float:
    """The fastest of three timed `sum`s over 1 GiB of fp32 (after one untimed pass)."""
    x = torch.ones(1 << 28)
    x.sum()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    opt = parse()
    torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    P, K, Lp, Sg = opt.prompts, opt.samples, opt.prompt_len, opt.generated + 1
    B, S = P * K, Lp + Sg
    shape = (LAYERS, P, KV_HEADS, Lp, HEAD_DIM)
    pk, pv = torch.randn(shape), torch.randn(shape)  # the prompts' keys, once per prompt
    gk = torch.randn(LAYERS, B, KV_HEADS, Sg, HEAD_DIM)
    gv = torch.randn_like(gk)
    # The engine's cache: each row holds its prompt's keys, then its own; the step writes the last.
    args = preset_args("llama-tiny", dim=KV_HEADS * GROUP * HEAD_DIM, n_layers=LAYERS, n_heads=KV_HEADS * GROUP,
                       n_kv_heads=KV_HEADS)
    cache = SlotCache(args, B, S + 64, torch.device("cpu"), torch.float32, additive=True)
    cache.k[:, :, :, :Lp], cache.v[:, :, :, :Lp] = pk.repeat_interleave(K, dim=1), pv.repeat_interleave(K, dim=1)
    cache.k[:, :, :, Lp:S - 1], cache.v[:, :, :, Lp:S - 1] = gk[:, :, :, :-1], gv[:, :, :, :-1]
    cols = [S - 1] * B
    cache.set_decode(torch.tensor(cols), [e for _, e in _chunk_extents(cols)])
    new_k, new_v = gk[:, :, :, -1:].contiguous(), gv[:, :, :, -1:].contiguous()
    k, v = cache.k, cache.v  # after the first engine call, holding the step's key too
    q = torch.randn(LAYERS, B, KV_HEADS * GROUP, 1, HEAD_DIM)
    mask = torch.zeros(B, 1, 1, S)  # every row at the same column: all S keys allowed
    ways = {
        "engine (sdpa, chunks)": lambda l: cache.attend(l, q[l], new_k[l], new_v[l], None, 0),
        "matmul softmax": lambda l: matmul(q[l], k[l, :, :, :S], v[l, :, :, :S], mask),
        "shared prefix": lambda l: shared_prefix(q[l], pk[l], pv[l], gk[l], gv[l], K),
    }
    row_bytes = KV_HEADS * HEAD_DIM * 4 * 2 * LAYERS  # keys + values of one column, all layers
    read = {"engine (sdpa, chunks)": B * S * row_bytes, "matmul softmax": B * S * row_bytes,
            "shared prefix": (P * Lp + B * Sg) * row_bytes}
    ref = [ways["engine (sdpa, chunks)"](l) for l in range(LAYERS)]
    for name, f in ways.items():
        diff = max((f(l) - ref[l]).abs().max().item() for l in range(LAYERS))
        print(f"{name:22s} max abs diff to the engine's output: {diff:.2e}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(opt.reps):
        for name, f in ways.items():
            t0 = time.perf_counter()
            for l in range(LAYERS):
                f(l)
            times[name].append(time.perf_counter() - t0)
    print(f"shape: {P} prompts x {K} samples = {B} rows, prompt {Lp} + generated {Sg} columns, "
          f"{LAYERS} layers, {opt.threads} threads; stream bandwidth (1 GiB sum): {stream_gbs():.1f} GB/s")
    base = statistics.median(times["engine (sdpa, chunks)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med * 1e3:7.1f} ms per decode step   reads {read[name] / 1e6:6.0f} MB "
              f"({read[name] / med / 1e9:5.1f} GB/s)   engine / this: {base / med:.2f}x")


if __name__ == "__main__":
    main()
