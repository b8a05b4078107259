"""AdamW, the learning-rate schedule and THE optimizer step, shared by every trainer and PPO."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .. import parallel
from ..errors import UsageError


class TrainingError(UsageError):
    """Training cannot go on (non-finite loss, unusable resume state); reported in one line."""


class NonFiniteError(TrainingError):
    """A NaN / inf loss or gradient norm: nothing was stepped."""


def build_optimizer(params: Iterable, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. `params`: parameters or (name, parameter) pairs.
    Weight decay applies to matrices only (not norms, biases or other vectors)."""
    params = [p[1] if isinstance(p, tuple) else p for p in params]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    try:  # fused AdamW (one kernel for all tensors) on CUDA and, in recent torch, CPU
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup over
    `warmup_steps` (the first step already has lr/warmup), then cosine / linear decay to
    `min_ratio` at `total_steps`, or constant."""
    if kind not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    kind: str = "cosine", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup_steps, total_steps, kind, min_ratio)  # validates `kind`
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, kind, min_ratio))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                   max_grad_norm: Optional[float] = 1.0) -> float:
    """Clip (TP-aware global norm), check, AdamW step, schedule step, zero_grad, on gradients
    the caller has already reduced over DP and scaled. Returns the pre-clip norm.

    A non-finite norm (NaN / inf loss or gradient) raises NonFiniteError with nothing
    stepped, so the weights and optimizer state stay those of the last good step."""
    norm = parallel.clip_grad_norm(model, max_grad_norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite gradient norm ({norm})")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
