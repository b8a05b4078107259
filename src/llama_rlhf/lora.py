"""LoRA adapters on the attention (wq wk wv wo) and FFN (w1 w2 w3) linears, tensor-parallel
like the layers they adapt:

* column-parallel base (W [out/tp, in]): A [r, in] replicated, B [out/tp, r] sharded.
  The rank-r activation `x A^T` is replicated; it enters the sharded branch through
  `copy_to_tp` (identity forward, gradient all-reduced backward), which makes the
  gradients of A and of x complete on every rank.
* row-parallel base (W [out, in/tp]): A [r, in/tp] sharded, B [out, r] replicated. The
  partial sums `x_shard A_shard^T` are all-reduced (`reduce_from_tp`) like the base
  output, then B maps them to the full, replicated output.

y = base(x) + (alpha / r) * B A x. Adapters are parameters `lora_A` / `lora_B` registered on
the base module itself plus a forward hook, so base parameter names (and checkpoint keys)
do not change. B starts at zero, so an adapted model starts equal to its base. Only the
adapters train; `merge_lora` folds them into the base weights (a plain checkpoint again),
`merged_state_dict` gives the merged weights without touching the model.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from .errors import UsageError
from . import parallel
from .parallel.grads import is_tp_sharded

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_ROW = ("wo", "w2")  # row-parallel bases; the rest are column-parallel


def _targets(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    targets = tuple(targets)
    return [(name, m) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and hasattr(m, "weight") and m.weight.dim() == 2]


def _lora_forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    a, b = module.lora_A, module.lora_B
    h = x.to(a.dtype) @ a.t()  # adapters stay fp32 (autocast still runs the matmul in bf16)
    if module.lora_row:
        h = parallel.reduce_from_tp(h)  # sum the partial products of the input shards
    else:
        h = parallel.copy_to_tp(h)  # gradient of the replicated branch summed over B's shards
    return output + (h @ b.t()).to(output.dtype) * module.lora_scale


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               targets: Iterable[str] = TARGETS, seed: int = 0) -> nn.Module:
    """Add rank-`rank` adapters to every target linear, freeze everything else; in place.

    A is Kaiming-uniform (as in the LoRA paper's reference code) from a generator seeded with
    `seed` (+ the TP rank for sharded A, so shards differ); B is zero. `alpha` defaults to `rank`
    (scale 1)."""
    if rank <= 0:
        raise UsageError(f"--lora_rank must be > 0 to apply LoRA, got {rank}")
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    alpha = float(rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    sharded = is_tp_sharded(model)
    tp, tpr = parallel.tp_size(), parallel.tp_rank()
    mods = _targets(model, targets)
    if not mods:
        raise ValueError(f"no LoRA target layers {tuple(targets)} found in the model")
    for i, (name, m) in enumerate(mods):
        row = name.rsplit(".", 1)[-1] in _ROW
        w = m.weight
        out_local, in_local = w.shape  # row: [out, in/tp]; column: [out/tp, in]
        a_shape, b_shape = (rank, in_local), (out_local, rank)
        fan_in = in_local * (tp if row and sharded[id(w)] else 1)
        a_is_sharded = row and tp > 1
        g = torch.Generator().manual_seed(seed * 100003 + i * 7 + (tpr * 1000003 if a_is_sharded else 0))
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound
        a = (torch.rand(a_shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        lora_a = nn.Parameter(a.to(device=w.device, dtype=torch.float32))
        lora_b = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=torch.float32))
        lora_a.tp_sharded = a_is_sharded
        lora_b.tp_sharded = (not row) and tp > 1
        m.register_parameter("lora_A", lora_a)
        m.register_parameter("lora_B", lora_b)
        m.lora_row = row
        m.lora_scale = alpha / rank
        m._lora_hook = m.register_forward_hook(_lora_forward)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "_lora_hook") for m in model.modules())


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> adapter parameter (the only trainable ones)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(model).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    params = lora_parameters(model)
    if set(params) != set(sd):
        raise UsageError(f"LoRA adapters disagree: missing {sorted(set(params) - set(sd))[:3]}, "
                         f"unexpected {sorted(set(sd) - set(params))[:3]} (same --lora_rank as the run?)")
    for n, p in params.items():
        if p.shape != sd[n].shape:
            raise UsageError(f"LoRA adapter {n} has shape {tuple(sd[n].shape)}, expected {tuple(p.shape)}")
        p.copy_(sd[n])


def _delta(m: nn.Module) -> torch.Tensor:
    return (m.lora_B.float() @ m.lora_A.float()) * m.lora_scale


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded in and the adapter keys dropped:
    exactly what `merge_lora(model).state_dict()` would be, but the model is left as is."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if hasattr(m, "_lora_hook"):
            key = f"{name}.weight"
            sd[key] = (m.weight.float() + _delta(m)).to(m.weight.dtype)
            sd.pop(f"{name}.lora_A", None)
            sd.pop(f"{name}.lora_B", None)
    return sd


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold W += (alpha/r) B A into each adapted base weight and remove the adapters (in place)."""
    for m in model.modules():
        if hasattr(m, "_lora_hook"):
            m.weight.copy_((m.weight.float() + _delta(m)).to(m.weight.dtype))
            m._lora_hook.remove()
            del m._lora_hook, m.lora_A, m.lora_B, m.lora_row, m.lora_scale
    return model


def base_fingerprint(model: nn.Module) -> list[tuple[str, tuple, float]]:
    """(name, shape, sum) of the frozen base weights this rank holds: cheap, and it tells one
    base checkpoint from another, so a LoRA resume can refuse adapters trained on another base."""
    return [(n, tuple(p.shape), round(float(p.detach().double().sum()), 6))
            for n, p in model.named_parameters() if not p.requires_grad]
