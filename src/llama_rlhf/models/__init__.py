"""Model zoo: architecture config (`args`) and the one transformer (`transformer`)."""
from __future__ import annotations

import torch

from ..parallel import tp_size
from .args import PRESETS, ConfigError, ModelArgs, family_of, preset_args, read_args, write_params
from .transformer import KVCache, Transformer, attend, causal_mask
from .heads import attach_reward_head


def build_model(args: ModelArgs, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init_seed: int | None = None) -> Transformer:
    """Construct on the meta device where possible (no wasted init of billions of
    weights), then materialise on `device`; weights are random only when `init_seed` is given,
    otherwise they are uninitialised and must be loaded from a checkpoint."""
    if tp_size() == 1:
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device=device).to(dtype)
    else:  # fairscale allocates with the legacy torch.Tensor(), which ignores the meta device
        model = Transformer(args).to(device=device, dtype=dtype)
    if args.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.output.weight = model.tok_embeddings.weight
    if init_seed is not None:
        init_weights(model, init_seed)
    return model


def parameter_count(sd: dict[str, torch.Tensor]) -> int:
    """Parameters of a state dict, a tensor shared by two keys (tied embeddings) counted once."""
    seen: dict[tuple[int, int], int] = {}
    for t in sd.values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel()
    return sum(seen.values())


@torch.no_grad()
def init_weights(model: Transformer, seed: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) for matrices, ones for norms, zero biases; output
    projections of each residual branch scaled by 1/sqrt(2 * n_layers)."""
    g = torch.Generator().manual_seed(seed)
    scaled = std / (2 * model.args.n_layers) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            s = scaled if name.endswith(("wo.weight", "w2.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g) * s)


__all__ = ["PRESETS", "ConfigError", "ModelArgs", "Transformer", "KVCache", "attend", "causal_mask", "build_model",
           "init_weights", "parameter_count", "family_of", "preset_args", "read_args", "write_params", "attach_reward_head"]
