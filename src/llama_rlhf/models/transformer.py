"""One decoder-only transformer for Llama 1/2/3, Mistral, Mixtral and Qwen.

Attribute names equal Meta's checkpoint keys (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, ...). Parallelism only enters through the
layer factories of `llama_rlhf.parallel`; heads per rank come from `tp_size()`.
RoPE uses Meta's interleaved (complex) layout; HF checkpoints are permuted on import.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel import (column_parallel_linear, row_parallel_linear, tp_size, vocab_parallel_embedding,
                        vocab_parallel_output)
from .args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 training does not lose the small variances.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_frequencies(args: ModelArgs, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3.1 long-context scaling when configured."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd))
    sc = args.rope_scaling
    if sc:
        # Low frequencies (long wavelengths) are slowed by `factor`, high ones kept,
        # and the band in between blended smoothly.
        old = sc["original_max_position_embeddings"]
        low_wl, high_wl = old / sc["low_freq_factor"], old / sc["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
        blended = (1 - smooth) * inv / sc["factor"] + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / sc["factor"], torch.where(wavelen < high_wl, inv, blended))
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D] with (real, imag) pairs interleaved; cos/sin: [B, T, 1, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        tp = tp_size()
        args.check_tp(tp)
        self.layer_id = layer_id
        self.n_local_heads = args.n_heads // tp
        self.n_local_kv_heads = args.n_kv_heads // tp
        self.head_dim = args.head_dim
        hd, b = args.head_dim, args.qkv_bias
        self.wq = column_parallel_linear(args.dim, args.n_heads * hd, bias=b)
        self.wk = column_parallel_linear(args.dim, args.n_kv_heads * hd, bias=b)
        self.wv = column_parallel_linear(args.dim, args.n_kv_heads * hd, bias=b)
        self.wo = row_parallel_linear(args.n_heads * hd, args.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional["KVCache"] = None, cache_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is None:
            out = attend(q, k, v, mask)
        else:
            out = cache.attend(self.layer_id, q, k, v, mask, cache_pos)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of q [B, H, T, D] on k, v [B, H_kv, S, D] (H a multiple of H_kv), out [B, H, T, D].
    mask [B, 1, T, S] (bool or additive); None is causal. A decoding step (T = 1) puts the
    H / H_kv query heads of each key head in its query rows, so sdpa reads every cached key
    once: its own GQA path (`enable_gqa`) copies the keys and values H / H_kv times on a CPU."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if H != H_kv and T == 1 and mask is not None:
        out = F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=mask)
        return out.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != H_kv)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = column_parallel_linear(dim, hidden_dim)
        self.w2 = row_parallel_linear(hidden_dim, dim)
        self.w3 = column_parallel_linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse FFN: a replicated router picks the top-k experts per token;
    each expert is a tensor-parallel FeedForward, so TP splits every expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.n_experts_per_tok
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, dim]
        logits = self.gate(flat)  # [N, E]
        weights, chosen = torch.topk(logits, self.top_k, dim=-1)  # [N, k]
        weights = F.softmax(weights.float(), dim=-1).type_as(x)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # Every rank must call every expert (its all-reduce), even with no tokens routed.
            token_idx, slot = torch.where(chosen == e)
            y = expert(flat[token_idx])
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out.view_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (full vocabulary on every TP rank, as in Meta's reference).

    V is `args.vocab_size`, the real vocabulary, at any TP: the rows a TP split pads the
    embedding / output weight with live inside `parallel` and never reach the logits.

    A verifier / critic (`args.reward_head > 0`) also has `reward_head`, applied by `values()`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = vocab_parallel_embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = vocab_parallel_output(args.dim, args.vocab_size)  # logits of the real vocab only
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if args.reward_head:
            self.reward_head = nn.Linear(args.dim, args.reward_head, bias=True)
        self.gradient_checkpointing = False
        self._inv_freq: dict = {}

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_frequencies(self.args, dev)
        angles = positions[..., None].float() * self._inv_freq[dev]  # [B, T, D/2]
        return angles.cos()[:, :, None], angles.sin()[:, :, None]

    def hidden(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, cache: Optional["KVCache"] = None,
               cache_pos: int = 0) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim].

        positions [B, T] default to 0..T-1; mask [B, 1, T, S] (True = attend) defaults
        to causal. `cache` is each layer's attention hook, `attend(layer, q, k, v, mask, pos)`:
        a `KVCache` (keys / values written at `cache_pos`) or packed rows' layout
        (`scoring.PackedAttention`).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=tokens.device).expand(B, T)
        if mask is None and (cache is not None and cache_pos > 0 or self._needs_window(T)):
            mask = causal_mask(positions, positions, self.args.sliding_window)
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, cache_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, cache_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        return self.output(self.hidden(tokens, **kw)).float()

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalar head on hidden states: [B, T, dim] -> [B, T]."""
        return self.reward_head(hidden).float()[..., 0]

    def _needs_window(self, T: int) -> bool:
        return self.args.sliding_window is not None and T > self.args.sliding_window


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int] = None,
                q_seg: Optional[torch.Tensor] = None, k_seg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, Tq, Tk] from positions (and optional segment ids for
    packed rows / padding: a key attends only within its own segment; segment < 0 never)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        m = m & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] >= 0)
    return m[:, None]


class KVCache(nn.Module):
    """Pre-allocated keys/values for every layer, head-major: [layers, B, H_kv_local, S, D], so
    that a decoding step reads each head's cached keys as one contiguous block."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        super().__init__()
        shape = (args.n_layers, batch, args.n_kv_heads // tp_size(), max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int):
        """Write k, v [B, H_kv, T, D] at columns pos..pos+T-1; the layer's keys and values so far."""
        T = k.shape[2]
        self.k[layer, :, :, pos:pos + T] = k
        self.v[layer, :, :, pos:pos + T] = v
        return self.k[layer, :, :, :pos + T], self.v[layer, :, :, :pos + T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor], pos: int) -> torch.Tensor:
        """Store the new k, v [B, H_kv, T, D] at `pos`; attention of q [B, H, T, D] on all keys so far."""
        k, v = self.update(layer, k, v, pos)
        return attend(q, k, v, mask)
