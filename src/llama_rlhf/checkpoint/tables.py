"""The tables every checkpoint operation is driven by, and what follows from them alone.

`SHARD_DIMS`: which dimension each parameter is split on across TP ranks. `HF_KEYS`: Meta key
<-> HF key (with the rope permutation of q / k). `QWEN1_KEYS`: Qwen-1's keys -> Meta (import
only). Pure functions of state dicts and configs: split / merge into TP shards, HF <-> Meta
renaming, the shapes a config implies.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from .. import parallel
from ..errors import UsageError
from ..models import ModelArgs
from ..models.transformer import Transformer


# (key regex, dim): 0 = split rows (column-parallel / vocab-parallel), 1 = split
# columns (row-parallel), None = replicated on every rank.
SHARD_DIMS: list[tuple[str, Optional[int]]] = [
    (r"tok_embeddings\.weight", 0),
    (r"output\.weight", 0),
    (r"attention\.w[qkv]\.(weight|bias)", 0),
    (r"attention\.wo\.weight", 1),
    (r"w[13]\.weight", 0),  # dense FFN and every Mixtral expert
    (r"w2\.weight", 1),
    (r"feed_forward\.gate\.weight", None),  # Mixtral router
    (r"(attention_norm|ffn_norm|norm)\.weight", None),
    (r"reward_head\.(weight|bias)", None),
]


# (Meta key, HF key, rope permutation: None | "q" | "k"); {i} layer, {e} expert.
HF_KEYS: list[tuple[str, str, Optional[str]]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", None),
    ("norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", None),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "q"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "k"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", None),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", None),
    ("layers.{i}.attention.wq.bias", "model.layers.{i}.self_attn.q_proj.bias", "q"),
    ("layers.{i}.attention.wk.bias", "model.layers.{i}.self_attn.k_proj.bias", "k"),
    ("layers.{i}.attention.wv.bias", "model.layers.{i}.self_attn.v_proj.bias", None),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", None),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", None),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", None),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w1.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w2.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w3.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", None),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("reward_head.weight", "score.weight", None),
    ("reward_head.bias", "score.bias", None),
]


# Qwen-1 (QWenLMHeadModel) -> Meta, import only (export writes Qwen2's HF keys, the same model):
# (Qwen-1 key, Meta key, rope permutation, part). `part` k takes the k-th third of the rows of the
# fused c_attn ([q; k; v], no GQA). The MLP is c_proj(w1(x) * silu(w2(x))): Qwen's w2 is the gated
# input, i.e. Meta's w1, and Qwen's w1 is Meta's w3.
QWEN1_KEYS: list[tuple[str, str, Optional[str], Optional[int]]] = [
    ("transformer.wte.weight", "tok_embeddings.weight", None, None),
    ("transformer.ln_f.weight", "norm.weight", None, None),
    ("lm_head.weight", "output.weight", None, None),
    ("transformer.h.{i}.ln_1.weight", "layers.{i}.attention_norm.weight", None, None),
    ("transformer.h.{i}.ln_2.weight", "layers.{i}.ffn_norm.weight", None, None),
    ("transformer.h.{i}.attn.c_attn.weight", "layers.{i}.attention.wq.weight", "q", 0),
    ("transformer.h.{i}.attn.c_attn.weight", "layers.{i}.attention.wk.weight", "k", 1),
    ("transformer.h.{i}.attn.c_attn.weight", "layers.{i}.attention.wv.weight", None, 2),
    ("transformer.h.{i}.attn.c_attn.bias", "layers.{i}.attention.wq.bias", "q", 0),
    ("transformer.h.{i}.attn.c_attn.bias", "layers.{i}.attention.wk.bias", "k", 1),
    ("transformer.h.{i}.attn.c_attn.bias", "layers.{i}.attention.wv.bias", None, 2),
    ("transformer.h.{i}.attn.c_proj.weight", "layers.{i}.attention.wo.weight", None, None),
    ("transformer.h.{i}.mlp.w2.weight", "layers.{i}.feed_forward.w1.weight", None, None),
    ("transformer.h.{i}.mlp.w1.weight", "layers.{i}.feed_forward.w3.weight", None, None),
    ("transformer.h.{i}.mlp.c_proj.weight", "layers.{i}.feed_forward.w2.weight", None, None),
]


class CheckpointError(UsageError):
    """A checkpoint that cannot be read, or that disagrees with its config (bad input: one line)."""


def shard_dim(key: str) -> Optional[int]:
    for pattern, dim in SHARD_DIMS:
        if re.search(r"(^|\.)" + pattern + "$", key):
            return dim
    raise CheckpointError(f"no shard rule for parameter {key!r}")


# Weights with one row per vocabulary id: a TP split pads their rows to `parallel.padded_vocab`.
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")


def split_tensor(key: str, t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`t` (the full tensor of `key`) as its `n` TP shards; vocabulary rows are padded with
    zeros to a multiple of `n` first, so any vocabulary splits at any TP."""
    dim = shard_dim(key)
    if dim is None:
        return [t] * n
    if key in VOCAB_KEYS and dim == 0:
        pad = parallel.padded_vocab(t.shape[0], n) - t.shape[0]
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
    if t.shape[dim] % n:
        raise CheckpointError(f"{key} of shape {tuple(t.shape)} cannot be split into {n} on dim {dim}")
    return list(torch.chunk(t, n, dim=dim))


def split_state_dict(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict] = [{} for _ in range(n)]
    shared: dict[int, str] = {}
    for key, t in sd.items():
        if id(t) in shared:  # a tied weight: the same shard tensors, so each file stores it once
            for shard in shards:
                shard[key] = shard[shared[id(t)]]
            continue
        shared[id(t)] = key
        for shard, part in zip(shards, split_tensor(key, t, n)):
            shard[key] = part.clone()
    return shards


def is_meta_embedding_shard(t: torch.Tensor, args: ModelArgs, n: int) -> bool:
    """Whether `t`, one of `n` shards of tok_embeddings.weight, is split on the model dim as Meta's
    Llama-1/2 `consolidated.NN.pth` are (fairscale ParallelEmbedding), not on the vocabulary."""
    return n > 1 and t.shape[1] != args.dim


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The full state dict of `shards`: vocabulary pad rows dropped, a tied embedding kept one tensor."""
    full = {}
    for key in shards[0]:
        dim = shard_dim(key)
        if key == "tok_embeddings.weight" and is_meta_embedding_shard(shards[0][key], args, len(shards)):
            dim = 1
        full[key] = shards[0][key].clone() if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return drop_vocab_padding(full, args)


def drop_vocab_padding(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """`sd` with the vocabulary rows past `args.vocab_size` (a split's pad rows, `split_tensor`)
    cut off; a tied output stays the embedding's tensor, so it is still stored once."""
    out = dict(sd)
    for key in VOCAB_KEYS:
        if key in out and out[key].shape[0] > args.vocab_size:
            out[key] = out[key][:args.vocab_size].clone()
    if args.tie_word_embeddings and "output.weight" in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _key_regex(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + pat + "$")


_META_RE = [(_key_regex(m), h, p) for m, h, p in HF_KEYS]


_HF_RE = [(_key_regex(h), m, p) for m, h, p in HF_KEYS]


def _permute(t: torch.Tensor, heads: int, to_meta: bool) -> torch.Tensor:
    """HF stores each head's rotary pairs as [all reals | all imags]; Meta interleaves them."""
    rest = t.shape[1:]
    if to_meta:
        return t.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape)
    return t.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def _rename(sd: dict, table: list, args: ModelArgs, to_meta: bool) -> dict:
    out = {}
    for key, t in sd.items():
        for regex, target, perm in table:
            m = regex.match(key)
            if m:
                new = target.format(**m.groupdict())
                if perm:
                    t = _permute(t, args.n_heads if perm == "q" else args.n_kv_heads, to_meta)
                out[new] = t
                break
        else:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"unknown parameter {key!r} (not in the HF key table)")
    return out


_QWEN1_RE = [(_key_regex(q), m, p, part) for q, m, p, part in QWEN1_KEYS]


def is_qwen1_keys(sd: dict) -> bool:
    return any(k.startswith("transformer.h.") or k == "transformer.wte.weight" for k in sd)


def qwen1_to_meta(sd: dict, args: ModelArgs) -> dict:
    """Qwen-1 keys -> Meta keys: one Qwen-1 tensor may give several (c_attn -> wq, wk, wv)."""
    out = {}
    for key, t in sd.items():
        rows = [(m, meta, perm, part) for regex, meta, perm, part in _QWEN1_RE if (m := regex.match(key))]
        if not rows and key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer the model recomputes, not a weight
        if not rows:
            raise CheckpointError(f"unknown parameter {key!r} (not in the Qwen-1 key table)")
        if any(part is not None for *_, part in rows) and t.shape[0] % 3:
            raise CheckpointError(f"{key} of shape {tuple(t.shape)} is no fused [q; k; v] (rows not divisible by 3)")
        for m, meta, perm, part in rows:
            piece = t if part is None else t.chunk(3, dim=0)[part]
            if perm:
                piece = _permute(piece, args.n_heads if perm == "q" else args.n_kv_heads, to_meta=True)
            out[meta.format(**m.groupdict())] = piece
    if args.tie_word_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def hf_to_meta(sd: dict, args: ModelArgs) -> dict:
    if is_qwen1_keys(sd):  # Qwen-1's own layout (transformer.h.N...), not the HF Llama one
        return qwen1_to_meta(sd, args)
    out = _rename(sd, _HF_RE, args, to_meta=True)
    if args.tie_word_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def meta_to_hf(sd: dict, args: ModelArgs) -> dict:
    out = _rename(sd, _META_RE, args, to_meta=False)
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def is_hf_keys(sd: dict) -> bool:
    return any(k.startswith(("model.", "lm_head.")) for k in sd) or is_qwen1_keys(sd)


def _model_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Parameter shapes of the model as built under the current TP size."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def expected_shapes(args: ModelArgs, n: int = 1) -> dict[str, tuple]:
    """Per-shard parameter shapes for `n` TP shards, from the config alone."""
    if parallel.tp_size() != 1:
        raise CheckpointError("expected_shapes needs the full model: call it outside a TP>1 world")
    out = {}
    for key, shape in _model_shapes(args).items():
        dim = shard_dim(key)
        if dim is not None and key in VOCAB_KEYS:
            shape = (parallel.padded_vocab(shape[0], n), *shape[1:])  # split_tensor pads the vocab rows
        out[key] = shape if dim is None else tuple(s // n if d == dim else s for d, s in enumerate(shape))
    return out


def check_shapes(sd: dict, expected: dict, source: str) -> None:
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: keys disagree with the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(sd[key].shape)} but the config "
                                  f"(params.json / config.json) implies {shape}")
