"""Scalar heads: turning a solver (language model) into a verifier / reward model."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UsageError
from .transformer import Transformer


@torch.no_grad()
def attach_reward_head(model: Transformer, seed: int) -> Transformer:
    """Give `model` a scalar `reward_head` (nn.Linear(dim, 1)) and mark it a verifier
    (`model.args.reward_head = 1`, so the checkpoints it is saved to say so); in place.

    Weight ~ N(0, 1/sqrt(dim + 1)) from a CPU generator seeded with `seed` only, so every
    tensor-parallel rank (the head is replicated) builds the identical head; bias 0. The
    hidden state entering the head is RMS-normalised, so initial scores are O(1).
    """
    if getattr(model.args, "reward_head", 0) or hasattr(model, "reward_head"):
        raise UsageError("the model already has a reward head (it is a verifier, not a solver)")
    ref = model.norm.weight
    dim = model.args.dim
    g = torch.Generator().manual_seed(int(seed))
    weight = torch.randn((1, dim), generator=g, dtype=torch.float32) / math.sqrt(dim + 1)
    head = nn.Linear(dim, 1, bias=True, device=ref.device, dtype=ref.dtype)
    head.weight.copy_(weight.to(ref.dtype))
    head.bias.zero_()
    model.reward_head = head
    model.args.reward_head = 1
    return model


__all__ = ["attach_reward_head"]
