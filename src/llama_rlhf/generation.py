"""The generation engine: batched, KV-cached decoding for every model family.

    out = generate(model, prompts, max_new_tokens=256, eos_id=tok.eos_id)            # greedy
    out = generate(model, prompts, 256, tok.eos_id, temperature=0.7, top_p=0.95, seed=3)

* Prompts of different lengths are left-padded into one batch. Each row keeps its own
  positions (0..len-1 for its prompt), pad keys are never attended, so a prompt gives
  the same tokens in a batch as alone.
* One pre-allocated `KVCache`; the prefill runs the whole prompt block (logits of its last
  position only), every decode step only the new token. Decode masks are views of one
  per-batch additive key mask (0 / -inf in the model dtype; sdpa takes it like the bool
  masks of `causal_mask`, and on CPU much faster with the strided cache views).
* `eos_id < 0` disables stopping on EOS (benchmarks, fixed-length rollouts).
* On CPU the model's fp32 `nn.Linear`s run through oneDNN while generating (`cpu_linears`).
* `temperature == 0` is greedy (argmax). Otherwise logits / temperature, then top-k,
  then top-p (nucleus), sampled with a `torch.Generator` seeded with `seed`. Under tensor
  parallelism every rank holds the full logits (gathered output), so every rank draws
  the same token from the identically seeded generator: no broadcast is needed.
* `Generation.logprobs` are log-probs of the chosen tokens under the model's own
  distribution: `log_softmax(raw logits)` at temperature 1, *not* the tempered / truncated
  sampling distribution. They equal a fresh forward pass over prompt + new tokens, which
  is what PPO's old-policy log-probs must be.
* Rows finish on EOS ("eos", the EOS token is included), on a stop string ("stop", the
  tokens up to and including the one that completed the string are kept), or when they
  reach `max_new_tokens` or the model's `max_seq_len` ("length"). Finished rows are dropped
  from the batch (the cache is compacted) once at least half of it has finished, and the
  loop ends when all rows have finished.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UsageError
from .models.transformer import KVCache, Transformer

_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


@dataclass
class Generation:
    """Per prompt: the new tokens, their log-probs (temperature-1 model distribution) and why it stopped."""
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else tempered top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        vals, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        vals, idx = logits.sort(dim=-1, descending=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return idx.gather(-1, choice)[:, 0]


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int, temperature: float,
           top_p: float, top_k: int, stop_strings, tokenizer) -> None:
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least a BOS token)")
        if len(p) > max_seq_len:
            raise UsageError(f"prompt {i} has {len(p)} tokens, longer than max_seq_len {max_seq_len} "
                             f"(truncate it before generating)")


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_strings: Optional[list[str]] = None, tokenizer=None, seed: int = 0,
             max_seq_len: Optional[int] = None) -> Generation:
    """Continue every prompt (token ids, BOS included) by up to `max_new_tokens` tokens.

    A row never grows past `max_seq_len` (default: the model's) positions; a prompt longer
    than that is a ValueError naming its index. See the module docstring for the semantics.
    """
    max_seq_len = max_seq_len or model.args.max_seq_len
    _check(prompts, max_new_tokens, max_seq_len, temperature, top_p, top_k, stop_strings, tokenizer)
    n = len(prompts)
    if n == 0:
        return Generation()
    param = next(model.parameters())
    with cpu_linears(model, param.device):
        return _generate(model, prompts, max_new_tokens, eos_id, temperature, top_p, top_k, stop_strings,
                         tokenizer, seed, max_seq_len, param.device, param.dtype)


def _generate(model, prompts, max_new_tokens, eos_id, temperature, top_p, top_k, stop_strings, tokenizer, seed,
              max_seq_len, dev, dtype) -> Generation:
    n = len(prompts)
    lens = [len(p) for p in prompts]
    budgets = [min(max_new_tokens, max_seq_len - L) for L in lens]
    steps = max(budgets)
    if steps == 0:
        return Generation([[] for _ in prompts], [[] for _ in prompts], ["length"] * n)

    P, window = max(lens), model.args.sliding_window
    cache, key_mask, logits, additive = _prefill(model, prompts, lens, steps, eos_id, dev, dtype)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    st = _Rows.start(lens, budgets, steps, dev)
    sync_every = 1 if dev.type == "cpu" else 8
    stops = _StopChecker(stop_strings, tokenizer, n) if stop_strings else None
    fill = eos_id if eos_id >= 0 else 0

    for step in range(steps):
        nxt = sample_next(logits, temperature, top_p, top_k, gen)
        lp = logits.gather(-1, nxt[:, None])[:, 0] - logits.logsumexp(dim=-1)
        nxt = torch.where(st.done, fill, nxt)
        st.record(step, nxt, lp)
        st.update_reasons(step, nxt, eos_id, stops)
        if step + 1 == steps:
            break
        if (step + 1) % sync_every == 0 or stops is not None:
            remaining = len(st.done) - int(st.done.sum())
            if remaining == 0:
                break
            if remaining <= len(st.done) // 2:  # drop the finished rows: a smaller batch and cache
                nxt, key_mask = st.compact(nxt, key_mask, cache)
        # ---- decode: the new token only, written to cache slot P + step
        cur = P + step
        h = model.hidden(nxt[:, None], positions=st.next_pos[:, None],
                         mask=_decode_mask(key_mask, cur, window, additive), cache=cache, cache_pos=cur)
        logits = model.output(h).float()[:, 0]
        st.next_pos = st.next_pos + 1
    return st.result()


def _as_mask(allowed: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = attend) as sdpa gets it: additive 0 / -inf in `dtype`, or as is."""
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _prefill(model, prompts, lens: list[int], steps: int, eos_id: int, dev: torch.device, dtype: torch.dtype):
    """Run the left-padded prompt block into a fresh cache of max(lens) + steps slots.

    Returns (cache, key_mask [B, S] for the decode steps, logits [B, V] of each row's last
    prompt position, additive: whether masks are additive floats rather than bools)."""
    n, P = len(prompts), max(lens)
    S = P + steps  # cache slots: slot j of row i holds position j - pad_i
    pads = torch.tensor([P - L for L in lens], device=dev)
    tokens = torch.full((n, P), eos_id if eos_id >= 0 else 0, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
    tokens = tokens.to(dev)
    slots = torch.arange(S, device=dev)
    key_valid = slots[None, :] >= pads[:, None]  # [B, S]: pad slots are never keys
    window = model.args.sliding_window
    padded = P != min(lens)
    # Masks go to sdpa as additive float masks in the model's dtype (on CPU a bool mask with the
    # strided cache views takes a path ~20x slower); bool under autocast, where q's dtype differs.
    additive = not torch.is_autocast_enabled(dev.type)

    # The whole prompt block, logits of the last position only.
    positions = (slots[None, :P] - pads[:, None]).clamp(min=0)
    mask = None
    if padded or (window is not None and P > window):
        q, k = slots[:P, None], slots[None, :P]
        allowed = (k <= q) if window is None else (k <= q) & (q - k < window)
        # A pad query attends to itself only (an all-False row would make sdpa return NaN).
        mask = _as_mask(((allowed[None] & key_valid[:, None, :P]) | (k == q)[None])[:, None], additive, dtype)
    key_mask = _as_mask(key_valid, additive, dtype)  # [B, S]; decode steps use views of it
    cache = KVCache(model.args, n, S, dev, dtype)
    h = model.hidden(tokens, positions=positions, mask=mask, cache=cache, cache_pos=0)
    logits = model.output(h[:, -1:]).float()[:, 0]
    return cache, key_mask, logits, additive


def _decode_mask(key_mask: torch.Tensor, cur: int, window: Optional[int], additive: bool) -> torch.Tensor:
    """Key mask [B, 1, 1, cur + 1] of the decode step writing cache slot `cur`."""
    kmask = key_mask[:, None, None, :cur + 1]
    if window is not None and cur >= window:  # keys more than `window` positions back drop out
        kmask = kmask.clone()
        kmask[..., :cur + 1 - window] = float("-inf") if additive else False
    return kmask


@dataclass
class _Rows:
    """Decode state. `out_*`, `len_all`, `reason_all` cover every prompt; the rest covers the rows
    of the current batch, which after a compaction `rows` maps back to prompts."""
    out_tok: torch.Tensor     # [n, steps]
    out_lp: torch.Tensor      # [n, steps]
    len_all: torch.Tensor     # [n]
    reason_all: torch.Tensor  # [n]
    rows: Optional[torch.Tensor]  # None: identity (no compaction yet)
    budget: torch.Tensor
    next_pos: torch.Tensor
    done: torch.Tensor
    reason: torch.Tensor
    length: torch.Tensor

    @classmethod
    def start(cls, lens: list[int], budgets: list[int], steps: int, dev: torch.device) -> _Rows:
        n = len(lens)
        budget = torch.tensor(budgets, device=dev)
        done = budget == 0
        return cls(out_tok=torch.zeros((n, steps), dtype=torch.long, device=dev),
                   out_lp=torch.zeros((n, steps), dtype=torch.float32, device=dev),
                   len_all=torch.zeros(n, dtype=torch.long, device=dev),
                   reason_all=torch.zeros(n, dtype=torch.long, device=dev),
                   rows=None, budget=budget, next_pos=torch.tensor(lens, device=dev), done=done,
                   reason=torch.where(done, _LENGTH, _RUNNING),
                   length=torch.zeros(n, dtype=torch.long, device=dev))

    def record(self, step: int, nxt: torch.Tensor, lp: torch.Tensor) -> None:
        if self.rows is None:
            self.out_tok[:, step], self.out_lp[:, step] = nxt, lp
        else:
            self.out_tok[self.rows, step], self.out_lp[self.rows, step] = nxt, lp

    def update_reasons(self, step: int, nxt: torch.Tensor, eos_id: int, stops: Optional[_StopChecker]) -> None:
        """Finish the live rows that emitted EOS, completed a stop string or used up their budget."""
        live = ~self.done
        self.length = torch.where(live, step + 1, self.length)
        code = torch.where(live & (nxt == eos_id), _EOS, _RUNNING)
        if stops is not None:
            hit = stops.update(self.rows, nxt, live)
            if hit:
                hit_t = torch.zeros_like(self.done)
                hit_t[torch.tensor(hit, device=self.done.device)] = True
                code = torch.where(hit_t & (code == _RUNNING), _STOP, code)
        code = torch.where(live & (code == _RUNNING) & (step + 1 >= self.budget), _LENGTH, code)
        self.reason = torch.where(code != _RUNNING, code, self.reason)
        self.done = self.reason != _RUNNING

    def _flush(self) -> torch.Tensor:
        idx = torch.arange(len(self.len_all), device=self.done.device) if self.rows is None else self.rows
        self.reason_all[idx], self.len_all[idx] = self.reason, self.length
        return idx

    def compact(self, nxt: torch.Tensor, key_mask: torch.Tensor, cache: KVCache):
        """Drop the finished rows from the state, `nxt`, `key_mask` and the cache; returns (nxt, key_mask)."""
        idx = self._flush()
        keep = (~self.done).nonzero()[:, 0]
        self.rows, self.budget, self.next_pos, self.done, self.reason, self.length, nxt, key_mask = (
            t[keep] for t in (idx, self.budget, self.next_pos, self.done, self.reason, self.length, nxt, key_mask))
        cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
        return nxt, key_mask

    def result(self) -> Generation:
        self._flush()
        n = len(self.len_all)
        out_tok, out_lp = self.out_tok.tolist(), self.out_lp.tolist()
        lengths, reasons = self.len_all.tolist(), self.reason_all.tolist()
        return Generation(tokens=[out_tok[i][:lengths[i]] for i in range(n)],
                          logprobs=[out_lp[i][:lengths[i]] for i in range(n)],
                          finish_reasons=[REASONS[r] for r in reasons])


def _onednn_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [], "")


def _onednn_works() -> bool:
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            _ONEDNN_OK = bool(torch.allclose(y, x @ w.t(), atol=1e-5))
        except Exception:  # noqa: BLE001 - an older / newer torch without the op: keep F.linear
            _ONEDNN_OK = False
    return _ONEDNN_OK


_ONEDNN_OK: Optional[bool] = None


@contextlib.contextmanager
def cpu_linears(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU, run the model's fp32 `nn.Linear`s through oneDNN for the duration.

    Decode multiplies a few rows by every weight matrix; for those thin fp32 GEMMs oneDNN is
    up to ~2x faster than the MKL sgemm behind `F.linear` on the AMD/AVX2 CPUs we test on (same
    fp32 math, different summation order: logits agree to ~1e-6 relative). Inference only (no
    autograd through it) and only plain `nn.Linear` (TP=1); set LLAMA_RLHF_ONEDNN=0 to disable.
    """
    use = (device.type == "cpu" and os.environ.get("LLAMA_RLHF_ONEDNN", "1") != "0"
           and torch.backends.mkldnn.is_available() and _onednn_works())
    patched = []
    if use:
        for m in model.modules():
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and "forward" not in m.__dict__:
                m.forward = functools.partial(_onednn_linear, m)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class _StopChecker:
    """Host-side stop-string detection on the decoded new text of every row."""

    def __init__(self, stop_strings: list[str], tokenizer, n: int):
        self.stops = [s for s in stop_strings if s]
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(n)]

    def update(self, rows: Optional[torch.Tensor], tokens: torch.Tensor, live: torch.Tensor) -> list[int]:
        """Append this step's tokens; return the batch indices whose text now contains a stop string."""
        rows_l = range(len(tokens)) if rows is None else rows.tolist()
        hit = []
        for b, (r, t, ok) in enumerate(zip(rows_l, tokens.tolist(), live.tolist())):
            if not ok:
                continue
            self.ids[r].append(t)
            text = self.tokenizer.decode(self.ids[r])
            if any(s in text for s in self.stops):
                hit.append(b)
        return hit
