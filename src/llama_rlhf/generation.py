"""The generation engine: continuous batching over a slot-based KV cache, for every model family.

    out = generate(model, prompts, max_new_tokens=256, eos_id=tok.stop_ids)              # greedy
    out = generate(model, prompts, 256, tok.stop_ids, temperature=0.7, top_p=0.95, seed=3,
                   num_samples=8, max_batch=64)   # 8 samples per prompt, at most 64 rows at a time

The work is a queue of rows, one per (prompt, sample), prompt-major; the result has one entry
per row in that order.

Slot scheduler
* At most `max_batch` rows (default: all of them) run at once, each in a slot of one
  pre-allocated `SlotCache` [layers, max_batch, kv heads, S, head dim], S = the longest
  prompt plus its token budget. A row fills its slot from column 0, so position = column and
  every slot has its own length. The cache is never re-allocated.
* A decode step is one batched forward over the slot prefix [0, nb): each slot feeds one token
  at its own column (one indexed write per layer) and attends columns <= its own (and within
  the sliding window) through an additive key mask (0 / -inf in the model dtype; on CPU sdpa
  is much faster with it than with a bool mask on the strided cache views). The cache is
  head-major, and the query heads that share a key head attend it together (`attend`), so a
  step reads each cached key once. Attention runs in chunks of `_ATTN_CHUNK` slots, each
  over the columns its longest slot needs: a new row then reads keys for its own length, not
  for the oldest row's (one rectangle over the prefix had read 1.6x the keys needed in
  bench/rollout.py's schedule, chunks of sorted slots 1.27x).
* Admission: a waiting prompt is prefilled into its slot, all but its last token (right-padded
  blocks, causal, no mask); the last token is fed by the next decode step like any other
  row's token, so a new row's first logits come from the same batched step. The K samples of a
  prompt are prefilled once and written into K slots; when only some fit, the prompt's keys /
  values are kept aside (the stash) for the rest.
* Retirement: a row that used its budget is retired on the host's own count (no device read);
  one that emitted a stop id or stop string is seen when the host reads the finish codes: every
  step on CPU (free there) or with stop strings, every 8th step on CUDA (the finished row idles
  meanwhile, its writes going to a scratch row). A retired slot takes the next waiting row at
  once. Re-sorting (`_reorder`): when sorting the slots by column, longest first, would make the
  chunks read `_RESORT` times fewer keys, the occupied slots move to the front in that order
  (a copy of the moved slots' caches, 8 times in bench/rollout.py's 1,024 steps), and the free
  slots, which the next short rows take, come last; with the queue empty and at most half of
  the prefix occupied, they move anyway and the prefix shrinks to them.
* Tokens and log-probs go into per-row device buffers, copied to the host once at the end.

Sampling
* `temperature == 0` is greedy (argmax). Otherwise logits / temperature, then top-k, then top-p
  (nucleus), then inverse-CDF sampling with one uniform per row and token. The uniform is a
  counter-based hash of (seed, prompt index, sample index, token index), not a generator
  stream, so a row's samples do not depend on `max_batch`, on the arrival order or on the
  other rows in the batch. Under tensor parallelism every rank holds the full logits (gathered
  output) and computes the same hash: every rank draws the same token, no broadcast needed.
* `Generation.logprobs` are log-probs of the chosen tokens under the model's own distribution:
  `log_softmax(raw logits)` at temperature 1, *not* the tempered / truncated sampling
  distribution. They equal a fresh forward pass over prompt + new tokens, which is what PPO's
  old-policy log-probs must be.

Stopping
* `eos_id` is one id or a sequence of ids (a model's generation_config.json eos list:
  Llama-3's <|eot_id|> and <|end_of_text|>, Qwen's <|im_end|>); any of them ends a row ("eos",
  the id is included). Negative ids are ignored: `eos_id < 0` or `[]` disables stopping.
* A stop string ends a row when the decoded new text contains it ("stop", the tokens up to and
  including the one that completed it are kept); a row also ends at `max_new_tokens` or the
  model's `max_seq_len` ("length").
* On CPU the model's fp32 `nn.Linear`s run through oneDNN, their weights pre-packed once per
  call, while generating (`cpu_linears`).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from .errors import UsageError
from .models.args import ModelArgs
from .models.transformer import KVCache, Transformer, attend

_RUNNING, _EOS, _STOP, _LENGTH, _FREE = 0, 1, 2, 3, 4
REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the 32-bit range
_PREFILL_TOKENS = 8192  # prompt tokens per prefill forward: bounds its activations, not its speed
# Decode steps between reads of the finish codes: a read is free on CPU, a stall on an accelerator.
_CPU_SYNC_EVERY, _CUDA_SYNC_EVERY = 1, 8
_ATTN_CHUNK = 16  # slots per attention call of a decode step (SlotCache)
# Re-sort the slots by column when chunked attention reads this many times the keys it would
# with sorted slots (Engine._reorder): a re-sort copies the moved slots' caches.
_RESORT = 1.25

EosIds = Union[int, Sequence[int]]


@dataclass
class Generation:
    """Per row: the new tokens, their log-probs (temperature-1 model distribution) and why it stopped."""
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                noise: Union[torch.Tensor, torch.Generator, None] = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else tempered top-k / top-p sampling.

    `noise`: each row's uniform in [0, 1) [B] that picks its token by inverting its CDF, or a
    `torch.Generator` (None: the global one) to draw them from."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    idx = None
    if top_k and top_k < logits.shape[-1]:
        logits, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        logits, idx = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    if not isinstance(noise, torch.Tensor):
        noise = torch.rand(len(probs), generator=noise, device=probs.device)
    choice = _invert_cdf(probs, noise)
    return choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds u x (row total)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, yet u * total can round up to total and land past the last nonzero probability.
    target = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def _mix32(x: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """A 32-bit integer hash (xor-shift-multiply rounds) of a python int or an int64 tensor in
    [0, 2^32). The multiplier is < 2^27, so int64 products never overflow."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _row_key(seed: int, prompt: int, sample: int) -> int:
    """The 32-bit random key of one row; its token t draws `_uniforms(key, t)`."""
    h = 0
    for part in (seed & _M32, (seed >> 32) & _M32, prompt & _M32, sample & _M32):
        h = _mix32((h + part + _GOLDEN) & _M32)  # + golden: _mix32(0) is 0
    return h


def _uniforms(keys: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (24 bits, exact in fp32) per (row key, token index), computed on the device."""
    h = _mix32((keys + (t + 1) * _GOLDEN) & _M32)
    h = _mix32(h ^ keys)  # a second round with the key: two rows whose counters collide still differ
    return (h >> 8).float() * 2.0 ** -24


def _stop_ids(eos_id: EosIds) -> list[int]:
    try:
        ids = [operator.index(eos_id)]
    except TypeError:
        ids = [operator.index(i) for i in eos_id]
    return sorted({i for i in ids if i >= 0})


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int, sampling: _Sampling,
           stop_strings: Optional[list[str]], tokenizer, num_samples: int, max_batch: Optional[int]) -> None:
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if sampling.temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {sampling.top_k}")
    if num_samples < 1:
        raise UsageError(f"num_samples must be >= 1, got {num_samples}")
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"max_batch must be >= 1, got {max_batch}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least a BOS token)")
        if len(p) > max_seq_len:
            raise UsageError(f"prompt {i} has {len(p)} tokens, longer than max_seq_len {max_seq_len} "
                             f"(truncate it before generating)")


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: EosIds,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_strings: Optional[list[str]] = None, tokenizer=None, seed: int = 0,
             max_seq_len: Optional[int] = None, *, num_samples: int = 1, max_batch: Optional[int] = None,
             progress: Optional[Callable[[int], None]] = None) -> Generation:
    """Continue every prompt (token ids, BOS included) `num_samples` times by up to `max_new_tokens` tokens.

    One result row per (prompt, sample), prompt-major. At most `max_batch` rows (default: all)
    run at once. A row never grows past `max_seq_len` (default: the model's) positions; a prompt
    longer than that is an error naming its index. `progress(n)` is called as n rows finish.
    See the module docstring for the scheduler, the sampling and the stop rules.
    """
    max_seq_len = max_seq_len or model.args.max_seq_len
    sampling = _Sampling(temperature, top_p, top_k, seed)
    _check(prompts, max_new_tokens, max_seq_len, sampling, stop_strings, tokenizer, num_samples, max_batch)
    budgets = [min(max_new_tokens, max_seq_len - len(p)) for p in prompts]
    n_rows = len(prompts) * num_samples
    if not any(budgets):  # nothing to generate (or no prompts at all)
        if progress is not None and n_rows:
            progress(n_rows)
        return Generation([[] for _ in range(n_rows)], [[] for _ in range(n_rows)], ["length"] * n_rows)
    param = next(model.parameters())
    stops = _StopChecker(stop_strings, tokenizer) if stop_strings else None
    batch = min(max_batch or n_rows, n_rows)
    engine = _Engine(model, prompts, num_samples, budgets, sampling, _stop_ids(eos_id), stops,
                     batch, param.device, param.dtype, progress)
    with cpu_linears(model, param.device, batch):
        return engine.run()


class SlotCache(KVCache):
    """A `KVCache` whose batch rows are slots, each with its own length.

    Decode (`set_decode`): batch row b writes its one new key / value into slot b at column
    `pos[b]`. The slot prefix attends in chunks of `_ATTN_CHUNK` consecutive slots, each over
    the columns its longest slot needs, a slot's own columns picked by its key mask: one
    rectangle over the whole prefix would make every new, short row read as many keys as the
    oldest one. Prefill (`set_prefill`): prompt-block row src[j] is written into columns [0, T)
    of slot slots[j] (one row may fill several slots: the samples of one prompt), and attends
    only itself."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 additive: bool):
        super().__init__(args, batch, max_len, device, dtype)
        self.window, self.additive = args.sliding_window, additive
        heads = self.k.shape[2]
        # Row (slot, head) of a layer's cache viewed as [batch * H_kv * max_len, D], at column 0.
        self._base = (torch.arange(batch, device=device)[:, None] * heads + torch.arange(heads, device=device)) * max_len
        self._cols = torch.arange(max_len, device=device)
        self._flat: Optional[torch.Tensor] = None
        self._chunks: list[tuple[int, int, torch.Tensor]] = []  # (first slot, end slot, key mask)
        self._slots: Optional[torch.Tensor] = None
        self._src: Optional[torch.Tensor] = None

    def set_decode(self, pos: torch.Tensor, extents: list[int]) -> None:
        """pos [nb]: the column each slot feeds; extents[i]: the columns chunk i attends."""
        self._flat = (self._base[:len(pos)] + pos[:, None]).reshape(-1)
        self._slots = self._src = None
        self._chunks = []
        for i, extent in enumerate(extents):
            a = i * _ATTN_CHUNK
            b = min(a + _ATTN_CHUNK, len(pos))
            p, cols = pos[a:b, None], self._cols[None, :extent]
            allowed = cols <= p
            if self.window is not None:  # keys more than `window` positions back drop out
                allowed = allowed & (p - cols < self.window)
            self._chunks.append((a, b, _as_mask(allowed, self.additive, self.k.dtype)[:, None, None]))

    def set_prefill(self, slots: torch.Tensor, src: torch.Tensor) -> None:
        self._flat, self._slots, self._src = None, slots, src

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor], pos: int) -> torch.Tensor:
        if self._slots is not None:
            T = k.shape[2]
            self.k[layer, self._slots, :, :T] = k[self._src].to(self.k.dtype)
            self.v[layer, self._slots, :, :T] = v[self._src].to(self.v.dtype)
            return attend(q, k, v, mask)
        B, H, _, D = k.shape
        self.k[layer].view(-1, D)[self._flat] = k.reshape(B * H, D).to(self.k.dtype)
        self.v[layer].view(-1, D)[self._flat] = v.reshape(B * H, D).to(self.v.dtype)
        outs = [attend(q[a:b], self.k[layer, a:b, :, :m.shape[-1]], self.v[layer, a:b, :, :m.shape[-1]], m)
                for a, b, m in self._chunks]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _to_device(data: Union[list, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A small host list / tensor of ints on `device`. On CUDA through pinned memory, non-blocking:
    a pageable host-to-device copy would wait for the queued decode steps (a host sync)."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=torch.long)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Slots:
    """Per-slot decode state on the device, one [8, max_batch] tensor so that admitting,
    freeing and moving slots is one indexed copy. Fields: the token to feed next, its column,
    the index of the next sampled token, the result row, the random key, the token budget,
    the finish code and the number of tokens kept. A free slot feeds token 0 at column 0,
    writes to the scratch row and has code _FREE."""

    def __init__(self, batch: int, scratch_row: int, device: torch.device):
        self.free_col = torch.tensor([0, 0, 0, scratch_row, 0, 0, _FREE, 0], device=device)
        self.data = self.free_col[:, None].repeat(1, batch)
        self.fed, self.pos, self.t, self.row, self.key, self.budget, self.reason, self.length = self.data.unbind(0)

    def set(self, slots: list[int], values: list[list[int]]) -> None:
        """Slot slots[i] gets the field values values[i]: [fed, pos, t, row, key, budget, reason, length]."""
        dev = self.data.device
        self.data[:, _to_device(slots, dev)] = _to_device(values, dev).T

    def free(self, idx: torch.Tensor) -> None:
        self.data[:, idx] = self.free_col[:, None]

    def move(self, src: torch.Tensor, nb: int) -> None:
        """Slots src -> 0..len(src)-1, the rest of the prefix [0, nb) freed."""
        m = len(src)
        self.data[:, :m] = self.data[:, src]
        self.data[:, m:nb] = self.free_col[:, None]


class _Engine:
    """The slot scheduler of one `generate` call (see the module docstring).

    Host-side per slot: the result row it holds (-1: free), how many tokens it has sampled,
    and an upper bound of its current column (exact unless it finished unseen), which sets how
    many cache columns a decode step attends without reading the device."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], num_samples: int, budgets: list[int],
                 sampling: _Sampling, stop_ids: list[int], stops: Optional[_StopChecker], batch: int,
                 dev: torch.device, dtype: torch.dtype, progress: Optional[Callable[[int], None]]):
        self.model, self.prompts, self.K, self.budgets, self.sampling = model, prompts, num_samples, budgets, sampling
        self.stops, self.dev, self.progress = stops, dev, progress
        self.stop_ids = torch.tensor(stop_ids, device=dev) if stop_ids else None
        self.n_rows = len(prompts) * num_samples
        width = max(len(p) + b for p, b in zip(prompts, budgets) if b > 0)
        # Bool masks under autocast, where q's dtype differs from the model's (see the docstring).
        self.cache = SlotCache(model.args, batch, width, dev, dtype, additive=not torch.is_autocast_enabled(dev.type))
        self.st = _Slots(batch, self.n_rows, dev)  # row n_rows is the scratch row
        steps = max(budgets)
        self.out_tok = torch.zeros((self.n_rows + 1, steps), dtype=torch.int32, device=dev)
        self.out_lp = torch.zeros((self.n_rows + 1, steps), dtype=torch.float32, device=dev)
        self.out_len = torch.zeros(self.n_rows + 1, dtype=torch.long, device=dev)
        self.out_reason = torch.full((self.n_rows + 1,), _LENGTH, dtype=torch.long, device=dev)
        self.slot_row, self.slot_n, self.slot_col = [-1] * batch, [0] * batch, [0] * batch
        self.slot_last_col = [0] * batch  # the column its last token would be fed at
        self.nb = self.occupied = self.next_row = 0
        self.stash: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None  # (prompt, keys, values)
        self.sync_every = 1 if stops is not None else _CPU_SYNC_EVERY if dev.type == "cpu" else _CUDA_SYNC_EVERY

    def run(self) -> Generation:
        self._admit()
        step = 0
        while self.occupied:
            self._sample(self._decode())
            step += 1
            done = self._finished(read_device=step % self.sync_every == 0)
            if done:
                self._retire(done)
                self._admit()
                self._reorder()
        return self._result()

    # ------------------------------------------------------------------ one step

    def _decode(self) -> torch.Tensor:
        """One forward of the slot prefix: every slot feeds its token at its column; logits [nb, V]."""
        st, nb = self.st, self.nb
        pos = st.pos[:nb]
        self.cache.set_decode(pos, [e for _, e in _chunk_extents(self.slot_col[:nb])])
        h = self.model.hidden(st.fed[:nb, None], positions=pos[:, None], cache=self.cache)  # masks: the cache's
        return self.model.output(h).float()[:, 0]

    def _sample(self, logits: torch.Tensor) -> None:
        """Pick, record and check every running slot's next token; finished slots freeze."""
        st, nb, sp = self.st, self.nb, self.sampling
        t, live = st.t[:nb], st.reason[:nb] == _RUNNING
        noise = _uniforms(st.key[:nb], t) if sp.temperature > 0 else None
        nxt = sample_next(logits, sp.temperature, sp.top_p, sp.top_k, noise)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]  # on CPU ~2x faster than logsumexp
        dest = torch.where(live, st.row[:nb], self.n_rows)  # idle slots write to the scratch row
        self.out_tok[dest, t] = nxt.to(torch.int32)
        self.out_lp[dest, t] = lp
        code = self._codes(nxt, live, t)
        st.reason[:nb] = torch.where(code != _RUNNING, code, st.reason[:nb])
        st.length[:nb] = torch.where(live, t + 1, st.length[:nb])
        adv = (st.reason[:nb] == _RUNNING).long()
        st.pos[:nb] += adv
        st.t[:nb] += adv
        st.fed[:nb] = nxt
        for s in range(nb):
            if self.slot_row[s] >= 0:
                self.slot_n[s] += 1
                self.slot_col[s] = min(self.slot_col[s] + 1, self.slot_last_col[s])

    def _codes(self, nxt: torch.Tensor, live: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Finish code per slot for this step's tokens: eos, stop string, budget used, or running."""
        code = torch.zeros_like(nxt)
        if self.stop_ids is not None:
            code = torch.where(live & torch.isin(nxt, self.stop_ids), _EOS, code)
        if self.stops is not None:
            hit = self.stops.update(self.slot_row[:self.nb], nxt.tolist(), live.tolist())
            if hit:
                hit_t = torch.zeros_like(live)
                hit_t[_to_device(hit, self.dev)] = True
                code = torch.where(hit_t & (code == _RUNNING), _STOP, code)
        return torch.where(live & (code == _RUNNING) & (t + 1 >= self.st.budget[:self.nb]), _LENGTH, code)

    def _finished(self, read_device: bool) -> list[int]:
        """Occupied slots known to be finished: by the host's count of their budget, and when
        `read_device`, by their finish codes (the one device read of a step)."""
        occ = [s for s in range(self.nb) if self.slot_row[s] >= 0]
        if read_device:
            codes = self.st.reason[:self.nb].tolist()
            return [s for s in occ if codes[s] != _RUNNING]
        return [s for s in occ if self.slot_n[s] >= self.budgets[self.slot_row[s] // self.K]]

    # ------------------------------------------------------------------ scheduling

    def _retire(self, slots: list[int]) -> None:
        """Copy the slots' lengths and finish codes to their rows, and free the slots."""
        idx = _to_device(slots, self.dev)
        rows = self.st.row[idx]
        self.out_len[rows] = self.st.length[idx]
        self.out_reason[rows] = self.st.reason[idx]
        self.st.free(idx)
        for s in slots:
            self.slot_row[s], self.slot_n[s], self.slot_col[s], self.slot_last_col[s] = -1, 0, 0, 0
        self.occupied -= len(slots)
        if self.progress is not None:
            self.progress(len(slots))

    def _admit(self) -> None:
        """Fill the free slots (lowest first) with the next waiting rows."""
        free = [s for s, r in enumerate(self.slot_row) if r < 0]
        new: list[tuple[int, int]] = []  # (slot, row)
        skipped = 0
        while len(new) < len(free) and self.next_row < self.n_rows:
            r, self.next_row = self.next_row, self.next_row + 1
            if self.budgets[r // self.K] == 0:  # no room for a token: an empty "length" row
                skipped += 1
            else:
                new.append((free[len(new)], r))
        if skipped and self.progress is not None:
            self.progress(skipped)
        if not new:
            return
        values = []
        for s, r in new:
            p, L = r // self.K, len(self.prompts[r // self.K])
            self.slot_row[s], self.slot_n[s], self.slot_col[s] = r, 0, L - 1
            self.slot_last_col[s] = L + self.budgets[p] - 2
            values.append([self.prompts[p][-1], L - 1, 0, r, _row_key(self.sampling.seed, p, r % self.K),
                           self.budgets[p], _RUNNING, 0])
        self.st.set([s for s, _ in new], values)
        self.occupied += len(new)
        self.nb = max(self.nb, max(s for s, _ in new) + 1)
        self._fill_caches(new)

    def _fill_caches(self, new: list[tuple[int, int]]) -> None:
        """Write the prompts of the new rows (but their last tokens) into their slots: the stashed
        prompt's copied, the others prefilled; stash the last prompt if some of its samples wait."""
        slots_of: dict[int, list[int]] = {}
        for s, r in new:
            slots_of.setdefault(r // self.K, []).append(s)
        stash = self.stash
        if stash is not None and stash[0] in slots_of:
            idx = _to_device(slots_of[stash[0]], self.dev)
            n = stash[1].shape[2]  # [layers, H_kv, n, D]
            self.cache.k[:, idx, :, :n] = stash[1][:, None]
            self.cache.v[:, idx, :, :n] = stash[2][:, None]
        self._prefill([p for p in slots_of if (stash is None or p != stash[0]) and len(self.prompts[p]) > 1],
                      slots_of)
        if stash is not None and self.next_row >= (stash[0] + 1) * self.K:
            self.stash = None  # all its samples are in
        last = new[-1][1] // self.K
        if self.stash is None and self.next_row < (last + 1) * self.K:
            s, n = slots_of[last][0], len(self.prompts[last]) - 1
            self.stash = (last, self.cache.k[:, s, :, :n].clone(), self.cache.v[:, s, :, :n].clone())

    def _prefill(self, todo: list[int], slots_of: dict[int, list[int]]) -> None:
        """Prefill prompts `todo` (all but the last token) into their slots, in blocks of about
        `_PREFILL_TOKENS` padded tokens."""
        start = 0
        while start < len(todo):
            end, width = start + 1, len(self.prompts[todo[start]]) - 1
            while end < len(todo):
                w = max(width, len(self.prompts[todo[end]]) - 1)
                if (end + 1 - start) * w > _PREFILL_TOKENS:
                    break
                end, width = end + 1, w
            self._prefill_block(todo[start:end], width, slots_of)
            start = end

    def _prefill_block(self, block: list[int], width: int, slots_of: dict[int, list[int]]) -> None:
        # Right-padded rows: causal attention never lets a prompt token see the pads after it,
        # and the pads' keys land in columns the row's key mask hides until decode overwrites them.
        tokens = torch.zeros((len(block), width), dtype=torch.long)
        slots, src = [], []
        for i, p in enumerate(block):
            tokens[i, :len(self.prompts[p]) - 1] = torch.as_tensor(self.prompts[p][:-1], dtype=torch.long)
            slots += slots_of[p]
            src += [i] * len(slots_of[p])
        self.cache.set_prefill(_to_device(slots, self.dev), _to_device(src, self.dev))
        self.model.hidden(_to_device(tokens, self.dev), cache=self.cache)  # positions 0..width-1, causal mask

    def _reorder(self) -> None:
        """Move the occupied slots to the front, longest first, when that makes a decode step's
        chunks attend `_RESORT` times fewer keys, and always once nothing waits and at most half
        of the prefix is occupied: then the prefix shrinks to them, and later steps run fewer rows.
        The free slots come last, so the next admitted (short) rows join the short end."""
        nb = self.nb
        occ = sorted((s for s in range(nb) if self.slot_row[s] >= 0), key=lambda s: -self.slot_col[s])
        m = len(occ)
        shrink = self.next_row >= self.n_rows and m <= nb // 2
        if not shrink:
            now = [self.slot_col[s] if self.slot_row[s] >= 0 else 0 for s in range(nb)]
            if _attended(now) <= _RESORT * _attended([self.slot_col[s] for s in occ] + [0] * (nb - m)):
                return
        moved = [i for i in range(m) if occ[i] != i]
        if moved:
            dst, src = _to_device(moved, self.dev), _to_device([occ[i] for i in moved], self.dev)
            extent = max(self.slot_col[s] for s in occ) + 1
            for buf in (self.cache.k, self.cache.v):
                buf[:, dst, :, :extent] = buf[:, src, :, :extent]
            self.st.move(_to_device(occ, self.dev), nb)
            for host in (self.slot_row, self.slot_n, self.slot_col, self.slot_last_col):
                host[:nb] = [host[s] for s in occ] + [-1 if host is self.slot_row else 0] * (nb - m)
        if shrink:
            self.nb = m

    def _result(self) -> Generation:
        n = self.n_rows
        lengths, reasons = self.out_len[:n].tolist(), self.out_reason[:n].tolist()
        toks, lps = self.out_tok[:n].tolist(), self.out_lp[:n].tolist()
        return Generation(tokens=[toks[i][:lengths[i]] for i in range(n)],
                          logprobs=[lps[i][:lengths[i]] for i in range(n)],
                          finish_reasons=[REASONS[r] for r in reasons])


def _chunk_extents(cols: list[int]) -> list[tuple[int, int]]:
    """(slots, key columns) of each attention chunk of a decode step whose slots feed columns `cols`."""
    return [(len(cols[a:a + _ATTN_CHUNK]), max(cols[a:a + _ATTN_CHUNK]) + 1) for a in range(0, len(cols), _ATTN_CHUNK)]


def _attended(cols: list[int]) -> int:
    """Key columns a decode step reads (all chunks, masked ones too) with slots at columns `cols`."""
    return sum(n * e for n, e in _chunk_extents(cols))


def _as_mask(allowed: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = attend) as sdpa gets it: additive 0 / -inf in `dtype`, or as is."""
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _onednn_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_works() -> bool:
    """Whether this torch has oneDNN's linear and its weight pre-packing, and they compute x @ w.T."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
            _ONEDNN_OK = all(bool(torch.allclose(_onednn_linear(v, None, x), x @ w.t(), atol=1e-5)) for v in (w, packed))
        except Exception:  # noqa: BLE001 - an older / newer torch without the ops: keep F.linear
            _ONEDNN_OK = False
    return _ONEDNN_OK


_ONEDNN_OK: Optional[bool] = None
# Pre-pack the weights only up to this many bytes of them: the packed copies live beside the
# weights while generating (a 1B model in fp32; a 7B one on a CPU keeps oneDNN's per-call reorder).
_PACK_MAX_BYTES = 4 << 30


@contextlib.contextmanager
def cpu_linears(model: nn.Module, device: torch.device, rows: int) -> Iterator[None]:
    """On CPU, run the model's fp32 `nn.Linear`s through oneDNN, weights pre-packed, for the duration.

    Decode multiplies a few rows by every weight matrix; for those thin fp32 GEMMs oneDNN is
    up to ~2x faster than the MKL sgemm behind `F.linear` (same fp32 math, different summation
    order: logits agree to ~1e-6 relative). Given a plain weight, oneDNN re-lays it out into its
    blocked format on every call. Packing each weight once per `generate` call (for about `rows`
    rows; any row count works) made a pass over SmolLM2-shaped weight GEMMs 1.15x faster at 64
    rows and ~1.5x at 7-33 rows (2 cores, 2026-12-07), with outputs equal to the unpacked call's
    (but at one row, ~1e-5 apart). Inference only (no autograd through it) and only plain
    `nn.Linear` (TP=1); set LLAMA_RLHF_ONEDNN=0 to disable.
    """
    use = (device.type == "cpu" and os.environ.get("LLAMA_RLHF_ONEDNN", "1") != "0"
           and torch.backends.mkldnn.is_available() and _onednn_works())
    linears = [m for m in model.modules() if use and type(m) is nn.Linear and m.weight.dtype == torch.float32
               and "forward" not in m.__dict__]
    pack = sum(m.weight.numel() * 4 for m in linears) <= _PACK_MAX_BYTES
    for m in linears:
        w = m.weight.detach()
        m.forward = functools.partial(_onednn_linear, torch.ops.mkldnn._reorder_linear_weight(w, rows) if pack else w,
                                      None if m.bias is None else m.bias.detach())
    try:
        yield
    finally:
        for m in linears:
            del m.forward


class _StopChecker:
    """Host-side stop-string detection on the decoded new text of every row."""

    def __init__(self, stop_strings: list[str], tokenizer):
        self.stops = [s for s in stop_strings if s]
        self.tokenizer = tokenizer
        self.ids: dict[int, list[int]] = {}

    def update(self, rows: list[int], tokens: list[int], live: list[bool]) -> list[int]:
        """Append this step's token of every live slot (holding row rows[b]); return the slots
        whose row's text now contains a stop string."""
        hit = []
        for b, (r, t, ok) in enumerate(zip(rows, tokens, live)):
            if not ok:
                continue
            ids = self.ids.setdefault(r, [])
            ids.append(t)
            text = self.tokenizer.decode(ids)
            if any(s in text for s in self.stops):
                hit.append(b)
                del self.ids[r]  # the row is done; its text is not needed any more
        return hit
