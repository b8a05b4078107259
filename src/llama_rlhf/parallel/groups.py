"""Process groups over *sets of replicas*, and moving tensors / objects between them.

A replica is one tensor-parallel group (ranks ``r*tp .. r*tp+tp-1``); a replica set is a
tuple of replica indices. Data never crosses TP ranks: TP rank ``t`` of one replica talks
to TP rank ``t`` of the others, so for a replica set there is one *slice group* per TP
rank (fairscale's data-parallel group is the slice group of all replicas).

`dist.new_group` is collective over the whole world, so every rank must create the same
groups in the same order: `ReplicaGroups(sets)` is built once, on every rank, from the
placement, and later calls only look groups up.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .grads import _buckets
from .state import dp_group, dp_rank, dp_size, is_distributed, tp_rank, tp_size


def _key(replicas: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(int(r) for r in replicas)))


class ReplicaGroups:
    """Slice groups for the given replica sets (sets of one replica need none)."""

    def __init__(self, sets: Iterable[Sequence[int]]):
        self._groups: dict[tuple[int, ...], Any] = {}
        all_replicas = tuple(range(dp_size()))
        for key in dict.fromkeys(_key(s) for s in sets):  # dedupe, keep a deterministic order
            if len(key) < 2 or key in self._groups:
                continue
            if key == all_replicas:
                self._groups[key] = dp_group()
                continue
            mine = None
            for t in range(tp_size()):  # every rank creates every slice group, in the same order
                g = dist.new_group([r * tp_size() + t for r in key])
                if t == tp_rank():
                    mine = g
            self._groups[key] = mine

    def group(self, replicas: Iterable[int]) -> Any:
        """This rank's slice group of `replicas`; None when it is not a member."""
        key = _key(replicas)
        if dp_rank() not in key:
            return None
        if key not in self._groups:
            raise KeyError(f"no process group was built for replicas {key}")
        return self._groups[key]


def member(replicas: Iterable[int]) -> bool:
    return dp_rank() in _key(replicas)


def gather_objects(groups: ReplicaGroups, obj: Any, replicas: Iterable[int]) -> list:
    """Each member replica's `obj`, in replica order, on every member; `[obj]` on a set of one.
    Non-members must not call it (they are not in the collective)."""
    key = _key(replicas)
    if len(key) < 2 or not is_distributed():
        return [obj]
    g = groups.group(key)
    out: list = [None] * len(key)
    dist.all_gather_object(out, obj, group=g)
    return out


def _global(replica: int) -> int:
    """The world rank of `replica`'s member that shares this rank's TP slice."""
    return replica * tp_size() + tp_rank()


@torch.no_grad()
def broadcast_params(groups: ReplicaGroups, model: nn.Module, src: int, replicas: Iterable[int],
                     trainable_only: bool = True) -> None:
    """Copy `model`'s parameters from replica `src` to every replica in `replicas`, TP shard by
    TP shard, in flat buckets (one collective per ~32 MiB). Models must be built alike."""
    key = _key([*replicas, src])
    if len(key) < 2 or not is_distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    g = groups.group(key)
    for bucket in _buckets([p.data for p in params], 32 * 1024 * 1024):
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=_global(src), group=g)
        if dp_rank() != src:
            for p, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                p.copy_(new)


@torch.no_grad()
def all_reduce_grads_over(groups: ReplicaGroups, model: nn.Module, replicas: Iterable[int]) -> None:
    """Sum gradients over the replicas holding `model` (a subset of the DP replicas).

    A replica may have had no data for this step (uneven shards): the members first agree on
    which parameters have a gradient anywhere and give those zeros where they have none, so
    every member reduces the same buckets and the optimizer steps the same parameters."""
    key = _key(replicas)
    if len(key) < 2 or not is_distributed():
        return
    g = groups.group(key)
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device if params else torch.device("cpu")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=g)
    for p, flag in zip(params, has.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads, 32 * 1024 * 1024):
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=g)
        for grad, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            grad.copy_(synced)


def all_gather_ranks(obj: Any) -> list:
    """Every *rank*'s `obj` (TP ranks included), in rank order; `[obj]` without a world."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

