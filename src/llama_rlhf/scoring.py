"""Forward passes over (prompt, response) pairs, and THE log-prob path.

Every log-prob the library trains on or compares comes from `linear_logprobs` /
`linear_cross_entropy` here: SFT's loss, the verifier's LM term, DPO's sequence log-probs and
PPO's action log-probs (with the entropy PPO logs). Both take final hidden states of the
positions that matter only, and form the vocabulary projection a chunk of rows at a time, so
no [B, T, V] fp32 logits tensor ever exists. One token alignment for the verifier, DPO and PPO:

    tokens  [B, T]    prompt + response, right-padded
    actions [B, T-1]  position j is the prediction of token j+1 from tokens <= j

Packed batches (`packed_batch`) hold the prompt of several sequences once per row; their
action log-probs / values still come back in that unpacked [S, T-1] layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import parallel
from .errors import UsageError
from .models import attend, causal_mask

CHUNK = 1024  # rows of the vocabulary projection formed at once


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) with the gradients formed during the forward, one chunk of rows
    at a time: peak memory is one [chunk, V] block instead of [N, V] logits + softmax + grad,
    and nothing is recomputed (the forward already holds softmax - onehot). Matmuls run in
    `dtype` (bf16 under autocast), the weight gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk].to(dtype), targets[s:s + chunk]
            logits = (hc @ w.t()).float()  # [c, V]
            target = logits.gather(1, yc[:, None])[:, 0]
            # log-sum-exp in place, in four passes over the block (torch.logsumexp takes a copy)
            m = logits.amax(dim=-1)
            p = logits.sub_(m[:, None]).exp_()
            total = p.sum(dim=-1)
            loss += (m + total.log() - target).sum()
            if need_h or need_w:
                g = p.mul_(total.reciprocal_()[:, None])  # softmax
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0  # - onehot
                g = g.to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


class _LinearLogprobs(torch.autograd.Function):
    """Per row i: log softmax(h_i W^T)[y_i] and the entropy of softmax(h_i W^T), fp32 [N] each.
    Chunked like _LinearCrossEntropy. The backward forms each chunk's logits again (the per-row
    upstream gradients are only known then) and turns them into dz in place from the saved
    log-normalisers: memory stays one [chunk, V] block plus one more for the probabilities, in
    a few passes over the block.
    d logp_i / dz = onehot(y_i) - p;  d H_i / dz = -p * (log p + H_i)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        w = weight.to(dtype)
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, h.shape[0], chunk):
            z = (h[s:s + chunk].to(dtype) @ w.t()).float()  # [c, V]
            m = z.amax(dim=-1)
            z.sub_(m[:, None])  # shifted logits: exp cannot overflow, log-probs and entropy unchanged
            e = z.exp()
            total = e.sum(dim=-1)
            log_total = total.log()
            lse[s:s + chunk] = m + log_total
            logp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None])[:, 0] - log_total
            ent[s:s + chunk] = log_total - e.mul_(z).sum(dim=-1) / total  # H = log S - sum(e z) / S
        ctx.save_for_backward(h, weight, targets, ent, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, targets, ent, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, yc = h[s:s + ctx.chunk].to(ctx.dtype), targets[s:s + ctx.chunk]
            logp_all = (hc @ w.t()).float().sub_(lse[s:s + ctx.chunk, None])  # [c, V]
            p = logp_all.exp()
            gl = g_logp[s:s + ctx.chunk].float() if g_logp is not None else torch.zeros_like(yc, dtype=p.dtype)
            # dz = gl (onehot - p) - ge p (log p + H) = p * -(gl + ge (log p + H)) + gl onehot
            if g_ent is not None:
                ge = g_ent[s:s + ctx.chunk].float()
                coef = logp_all.add_(ent[s:s + ctx.chunk, None]).mul_(-ge[:, None]).sub_(gl[:, None])
                dz = p.mul_(coef)
            else:
                dz = p.mul_(-gl[:, None])
            dz[torch.arange(dz.shape[0], device=dz.device), yc] += gl
            dz = dz.to(ctx.dtype)
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = dz @ w
            if grad_w is not None and ctx.dtype == torch.float32:
                grad_w.addmm_(dz.t(), hc)
            elif grad_w is not None:
                grad_w += (dz.t() @ hc).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _fused(output: nn.Module) -> bool:
    """A plain bias-free projection (TP = 1); a fairscale column-parallel one is called per chunk."""
    return isinstance(output, nn.Linear) and output.bias is None


def linear_cross_entropy(h: torch.Tensor, output: nn.Module, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of `output(h)` against `targets` (= -sum of `linear_logprobs`);
    h [N, dim], targets [N]. The gradient is formed in the forward: no recompute."""
    if h.shape[0] == 0:
        return h.sum() * 0.0 + output.weight.sum() * 0.0
    if _fused(output):
        return _LinearCrossEntropy.apply(h, output.weight, targets, chunk, _matmul_dtype(h))
    total = None
    for s in range(0, h.shape[0], chunk):
        part = F.cross_entropy(output(h[s:s + chunk]).float(), targets[s:s + chunk], reduction="sum")
        total = part if total is None else total + part
    return total


def linear_logprobs(h: torch.Tensor, output: nn.Module, targets: torch.Tensor,
                    chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets | h) and the entropy of each row's next-token distribution, fp32 [N] each;
    h [N, dim], targets [N]. Both are differentiable."""
    if _fused(output):
        return _LinearLogprobs.apply(h, output.weight, targets, chunk, _matmul_dtype(h))
    logps, ents = [], []
    for s in range(0, h.shape[0], chunk):
        logp_all = torch.log_softmax(output(h[s:s + chunk]).float(), dim=-1)  # [c, V]
        logps.append(logp_all.gather(1, targets[s:s + chunk, None])[:, 0])
        ents.append(-(logp_all.exp() * logp_all).sum(-1))
    if not logps:
        empty = h.sum() * 0.0 + output.weight.sum() * 0.0
        return empty.expand(0), empty.expand(0)
    return torch.cat(logps), torch.cat(ents)


@dataclass
class PairBatch:
    """S (prompt, response) sequences laid out in R rows of T tokens: the one batch format of
    the verifier, DPO, PPO and best-of-N. Unpacked (`pair_batch`), row i is sequence i. Packed
    (`packed_batch`: the verifier's `--packing`, PPO's samples of one prompt), sequences that
    share a prompt share one row, prompt once, with `positions` and `segments` (0 prompt, k the
    row's k-th response, PAD_SEGMENT padding) for the mask."""
    tokens: torch.Tensor  # [R, T] long, right-padded
    row: torch.Tensor  # [S] long: the row of each sequence
    last: torch.Tensor  # [S] long: position of each sequence's last token (its EOS)
    resp_mask: torch.Tensor  # [S, T] bool: positions of each sequence's response tokens, in its row
    positions: Optional[torch.Tensor] = None  # [R, T], packed rows only
    segments: Optional[torch.Tensor] = None  # [R, T], packed rows only
    n_tokens: int = 0  # real (non-padding) tokens
    n_pairs: int = 0  # pair batches: sequences 0..P-1 are the chosen answers, P..2P-1 the rejected
    labels: Optional[torch.Tensor] = None  # [S] 0 / 1, pointwise records
    margin: Optional[torch.Tensor] = None  # [P]
    ref: Optional[torch.Tensor] = None  # [P, 2] DPO's cached reference log-probs (chosen, rejected)

    @property
    def action_mask(self) -> torch.Tensor:
        """[S, W]: True at j where token j+1 of the sequence, laid out as one unpacked row, is a
        response token (W = T-1 of that unpacked layout)."""
        if self.positions is None:
            return self.resp_mask[:, 1:]
        s, q = self.resp_mask.nonzero(as_tuple=True)
        pos = self.positions[self.row[s], q]  # each response token's position in its own sequence
        mask = torch.zeros(self.resp_mask.shape[0], max(int(pos.max()), 1), dtype=torch.bool,
                           device=pos.device)
        mask[s, pos - 1] = True
        return mask

    def action_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources [M], targets [M]) for the M True entries of `action_mask`, in its row-major
        order: the flat index into [R * T] of the hidden state that predicts each response token,
        and the token. In a packed row a response's first token is predicted from the prompt's
        last position, not from the token before it (another response's end)."""
        s, q = self.resp_mask.nonzero(as_tuple=True)  # sequence-major, positions ascending
        r, T = self.row[s], self.tokens.shape[1]
        pred = q - 1
        if self.segments is not None:
            prompt_end = (self.segments == 0).sum(1) - 1  # [R]: the prompt opens every row
            pred = torch.where(self.resp_mask[s, q - 1], pred, prompt_end[r])
        return r * T + pred, self.tokens[r, q]

    def to(self, device) -> "PairBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))})


def pair_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PairBatch:
    """Right-padded prompt+response rows, one per sequence; every response must be non-empty."""
    rows = [p + r for p, r in zip(prompts, responses)]
    T = max(max(len(r) for r in rows), 2)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    resp_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    last = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not r:
            raise ValueError(f"row {i}: empty response")
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        resp_mask[i, len(p):len(p) + len(r)] = True
        last[i] = len(p) + len(r) - 1
    return PairBatch(tokens, torch.arange(len(rows)), last, resp_mask, n_tokens=sum(map(len, rows)))


PAD_SEGMENT = -1


def packed_batch(prompts: list[list[int]], responses: list[list[int]], groups: list[list[int]],
                 pad_id: int) -> PairBatch:
    """Row g holds the prompt of the sequences `groups[g]` (equal prompts) once, then each of
    their responses; a response continues the prompt's positions and sees the prompt and itself
    (`packed_mask`). Sequence s keeps index s. Every prompt and response must be non-empty."""
    S, R = len(prompts), len(groups)
    lengths = [len(prompts[g[0]]) + sum(len(responses[s]) for s in g) for g in groups]
    T = max(lengths)
    tokens = torch.full((R, T), pad_id, dtype=torch.long)
    positions = torch.zeros((R, T), dtype=torch.long)
    segments = torch.full((R, T), PAD_SEGMENT, dtype=torch.long)
    row, last = torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.long)
    resp = torch.zeros((S, T), dtype=torch.bool)
    for g, seqs in enumerate(groups):
        prompt = prompts[seqs[0]]
        n = len(prompt)
        tokens[g, :n], positions[g, :n], segments[g, :n] = torch.tensor(prompt), torch.arange(n), 0
        at = n
        for k, s in enumerate(seqs, start=1):
            c = len(responses[s])
            if not (n and c):
                raise ValueError(f"sequence {s}: empty prompt or response")
            if prompts[s] != prompt:
                raise ValueError(f"sequence {s}: its prompt differs from its row's")
            tokens[g, at:at + c] = torch.tensor(responses[s])
            positions[g, at:at + c] = torch.arange(n, n + c)
            segments[g, at:at + c] = k
            resp[s, at:at + c] = True
            row[s], last[s] = g, at + c - 1
            at += c
        positions[g, at:] = torch.arange(T - at)
    return PairBatch(tokens, row, last, resp, positions, segments, n_tokens=sum(lengths))


def prompt_rows(prompts: list[list[int]], responses: list[list[int]], max_tokens: int) -> list[list[int]]:
    """`packed_batch`'s rows: sequences with equal prompts together (in order of first
    appearance), a row closed before its prompt + responses would pass `max_tokens` (a bound
    on one row's activations)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    rows = []
    for seqs in groups.values():
        row, n = [], len(prompts[seqs[0]])
        for s in seqs:
            if row and n + len(responses[s]) > max_tokens:
                rows.append(row)
                row, n = [], len(prompts[s])
            row.append(s)
            n += len(responses[s])
        rows.append(row)
    return rows


class PackedAttention:
    """The attention of packed rows (`packed_batch`), as the per-layer hook `Transformer.hidden`
    calls in place of a KV cache: each row's prompt attends itself causally, and each response
    attends its prompt and itself, gathered into a short row of its own (two sdpa calls). It
    equals one dense [T, T] mask where a response sees the prompt and its own segment, but a row
    of K responses then costs about K times less attention than the dense product (which was
    14% of a packed SmolLM2 forward). Padding's outputs are never read."""

    def __init__(self, batch: PairBatch, window: Optional[int], device: torch.device):
        R, T = batch.tokens.shape
        seg, positions = batch.segments.to(device), batch.positions.to(device)
        row, resp = batch.row.to(device), batch.resp_mask.to(device)
        prompt_len = (seg == 0).sum(1)  # [R]: the prompt opens every row
        P = int(prompt_len.max())
        n = resp.sum(1)  # [S] response lengths
        N = int(n.max())
        start = resp.float().argmax(1)  # [S]: each response's first column in its row
        j = torch.arange(N, device=device)
        valid = j[None, :] < n[:, None]  # [S, N]
        cols = torch.where(valid, start[:, None] + j, start[:, None])  # pads repeat a real column
        self.P = P
        self.query_idx = row[:, None] * T + cols  # [S, N] flat [R * T] indices
        self.key_idx = torch.cat([row[:, None] * T + torch.arange(P, device=device), self.query_idx], 1)
        self.out_idx = self.query_idx[valid]  # [M]
        self.valid = valid
        # Keys of a response's short row: its prompt's P columns, then its own N.
        q_pos = positions.flatten()[self.query_idx]  # [S, N]
        k_pos = positions.flatten()[self.key_idx]  # [S, P + N]
        k_ok = torch.cat([torch.arange(P, device=device)[None, :] < prompt_len[row, None], valid], 1)
        self.mask = causal_mask(q_pos, k_pos, window) & k_ok[:, None, None, :]  # [S, 1, N, P + N]
        prompt_pos = positions[:, :P]
        self.prompt_mask = causal_mask(prompt_pos, prompt_pos, window) if window is not None else None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor], pos: int) -> torch.Tensor:
        """q [R, H, T, D], k / v [R, H_kv, T, D] -> [R, H, T, D]; `mask` (the dense one) is unused."""
        R, H, T, D = q.shape
        P = self.P
        head = attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], self.prompt_mask)  # [R, H, P, D]
        q_f, k_f, v_f = (x.transpose(1, 2).reshape(R * T, x.shape[1], D) for x in (q, k, v))  # [R T, h, D]
        short = attend(q_f[self.query_idx].transpose(1, 2), k_f[self.key_idx].transpose(1, 2),
                       v_f[self.key_idx].transpose(1, 2), self.mask)  # [S, H, N, D]
        out = F.pad(head.transpose(1, 2), (0, 0, 0, 0, 0, T - P)).reshape(R * T, H, D)
        out = out.index_put((self.out_idx,), short.transpose(1, 2)[self.valid])
        return out.view(R, T, H, D).transpose(1, 2)


def forward_hidden(model, batch: PairBatch) -> torch.Tensor:
    """Final hidden states [R, T, dim] of a batch (packed rows get their positions and
    `PackedAttention`)."""
    dev = parallel.device()
    tokens = batch.tokens.to(dev, non_blocking=True)
    if batch.segments is None:
        return model.hidden(tokens)
    layout = PackedAttention(batch, model.args.sliding_window, dev)
    return model.hidden(tokens, positions=batch.positions.to(dev, non_blocking=True), cache=layout)


def action_logprobs(model, batch: PairBatch, with_entropy: bool = False):
    """log p(token j+1 | tokens <= j) at every action position, 0 elsewhere: [B, T-1] fp32
    (and the entropy there, [B, T-1]). Only action positions reach the vocabulary projection."""
    h = forward_hidden(model, batch)  # [R, T, dim]
    mask = batch.action_mask.to(h.device)  # [B, T-1]
    src, targets = (t.to(h.device) for t in batch.action_sources())
    logp, ent = linear_logprobs(h.flatten(0, 1)[src], model.output, targets)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    logps = zeros.masked_scatter(mask, logp)
    return (logps, zeros.masked_scatter(mask, ent)) if with_entropy else logps


def sequence_logprobs(model, h: torch.Tensor, batch: PairBatch,
                      n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens (+ EOS) of sequences 0..n-1 (default: all) given
    their prompts, fp32 [n], and their token counts [n]; h [R, T, dim] from `forward_hidden`.
    The same sources as `action_logprobs`, so packed rows are read right too."""
    n = batch.resp_mask.shape[0] if n is None else n
    src, targets = (t.to(h.device) for t in batch.action_sources())
    seq = batch.resp_mask.nonzero()[:, 0].to(h.device)  # action_sources' order: sequence-major
    keep = seq < n
    logp, _ = linear_logprobs(h.flatten(0, 1)[src[keep]], model.output, targets[keep])
    seq = seq[keep]
    zeros = torch.zeros(n, dtype=torch.float32, device=h.device)
    return zeros.index_add(0, seq, logp), zeros.index_add(0, seq, torch.ones_like(logp))


def action_values(model, batch: PairBatch) -> torch.Tensor:
    """Critic value of the state before each action, 0 elsewhere: [B, T-1]."""
    h = forward_hidden(model, batch)  # [R, T, dim]
    mask = batch.action_mask.to(h.device)
    src, _ = batch.action_sources()
    values = model.values(h.flatten(0, 1)[src.to(h.device)])  # [M]
    return torch.zeros(mask.shape, dtype=values.dtype, device=h.device).masked_scatter(mask, values)


def scores_from_hidden(model, h: torch.Tensor, batch: PairBatch, reduce: str = "last") -> torch.Tensor:
    """Verifier score of every sequence of the batch [S] (fp32): the head at the sequence's
    last token, or its mean over the response tokens."""
    dev = h.device
    values = model.values(h)[batch.row.to(dev)]  # [S, T]
    if reduce == "last":
        return values.gather(1, batch.last.to(dev)[:, None])[:, 0]
    if reduce == "mean":
        mask = batch.resp_mask.to(dev)
        return (values * mask).sum(1) / mask.sum(1)
    raise UsageError(f"--reduce must be 'last' or 'mean', got {reduce!r}")


def sequence_scores(model, batch: PairBatch, reduce: str = "last") -> torch.Tensor:
    """Verifier score of each sequence [S]: `scores_from_hidden` of a forward pass."""
    return scores_from_hidden(model, forward_hidden(model, batch), batch, reduce)
