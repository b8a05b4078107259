"""Distributed gradient helpers: the DP gradient all-reduce, a TP-aware gradient
norm / clip, TP-aware parameter counting, and the two autograd region maps that
adapters (LoRA) need beside the fairscale layers.

A parameter is *TP-sharded* when each tensor-parallel rank holds a different slice
of it (fairscale column / row / vocab-parallel weights, column-parallel biases,
and anything tagged ``param.tp_sharded = True``, e.g. a LoRA factor); every other
parameter is *replicated*: identical on all TP ranks, with identical gradients.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from fairscale.nn.model_parallel import layers as fsl
from fairscale.nn.model_parallel import mappings as fsm

from .state import dp_group, dp_size, tp_group, tp_size

_BUCKET_BYTES = 32 * 1024 * 1024


def _sharded_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, (fsl.ColumnParallelLinear, fsl.VocabParallelEmbedding, fsl.ParallelEmbedding)):
            ids.update(id(p) for p in m.parameters(recurse=False))
        elif isinstance(m, fsl.RowParallelLinear):
            ids.add(id(m.weight))  # its bias is added after the all-reduce: replicated
    for p in model.parameters():
        if getattr(p, "tp_sharded", False):
            ids.add(id(p))
    return ids


def is_tp_sharded(model: nn.Module) -> dict[int, bool]:
    """id(param) -> whether TP ranks hold different slices of it (always False at TP=1)."""
    sharded = _sharded_ids(model) if tp_size() > 1 else set()
    return {id(p): id(p) in sharded for p in model.parameters()}


def param_count(model: nn.Module, exclude: Iterable[str] = (), trainable_only: bool = False) -> int:
    """Parameters of the *whole* model (sharded ones counted across TP ranks, tied ones once);
    names containing any of `exclude` are skipped."""
    sharded = is_tp_sharded(model)
    # Vocabulary pad rows (parallel.layers.padded_vocab) are no parameters of the model.
    pad = {id(m.weight): m.vocab_pad_rows * m.weight.shape[1]
           for m in model.modules() if getattr(m, "vocab_pad_rows", 0)}
    n = 0
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if any(e in name for e in exclude) or (trainable_only and not p.requires_grad):
            continue
        n += p.numel() * (tp_size() if sharded[id(p)] else 1) - pad.get(id(p), 0)
    return n


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype/device tensors, each at most ~bucket_bytes."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_grads(model: nn.Module, average: bool = False, bucket_bytes: int = _BUCKET_BYTES) -> None:
    """Sum (or average) every gradient over the data-parallel group, in flattened buckets
    (one collective per ~32 MiB instead of one per tensor). No-op at DP = 1."""
    if dp_size() == 1:
        return
    scale = 1.0 / dp_size() if average else None
    for bucket in _buckets(_grads(model), bucket_bytes):
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=dp_group())
        if scale is not None:
            flat.mul_(scale)
        for g, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


@torch.no_grad()
def grad_norm(model: nn.Module) -> float:
    """Global L2 norm of the gradients of the whole (TP-split) model: squares of sharded
    gradients are summed over the TP group, replicated ones counted once. Call after
    `all_reduce_grads`, so every DP replica holds the same gradients."""
    sharded = is_tp_sharded(model)
    params = [p for p in model.parameters() if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros(2, dtype=torch.float32, device=dev)  # [sharded, replicated]
    for which in (0, 1):
        grads = [p.grad for p in params if sharded[id(p)] == (which == 0)]
        if grads:
            norms = torch._foreach_norm(grads, 2)
            sq[which] = torch.stack([n.float() for n in norms]).pow(2).sum()
    if tp_size() > 1:
        shard_sq = sq[0:1].clone()
        dist.all_reduce(shard_sq, group=tp_group())
        sq[0] = shard_sq[0]
    return math.sqrt(sq.sum().item())


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: Optional[float]) -> float:
    """Scale gradients so their global (TP-aware) norm is at most `max_norm`; returns the norm
    before clipping (inf / nan are returned as is and nothing is scaled). `max_norm` <= 0 or
    None only measures."""
    total = grad_norm(model)
    if max_norm and max_norm > 0 and math.isfinite(total) and total > max_norm:
        torch._foreach_mul_(_grads(model), max_norm / (total + 1e-6))
    return total


@torch.no_grad()
def scale_grads(model: nn.Module, factor: float) -> None:
    grads = _grads(model)
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over the TP group backward (the input of a
    column-parallel branch). Identity at TP = 1."""
    return fsm.copy_to_model_parallel_region(x) if tp_size() > 1 else x


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-reduce over the TP group forward (partial sums of a row-parallel branch); identity
    backward. Identity at TP = 1."""
    return fsm.reduce_from_model_parallel_region(x) if tp_size() > 1 else x


