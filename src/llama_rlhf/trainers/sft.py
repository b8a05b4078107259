"""Supervised fine-tuning of a solver: the SFT objective and `train_sft`, which
`solver_train.py` calls.

The objective runs the transformer to its final hidden states, keeps only the positions
whose target is trained (answer tokens + EOS), and computes the output projection and the
cross-entropy on those rows only, in chunks (`scoring.linear_cross_entropy`): prompt and
padding positions never reach the vocabulary matmul, and no [B, T, V] fp32 logits tensor exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .. import parallel
from ..data.sft import load_sft_dataset, sft_collate_fn
from ..log import get_logger
from ..lora import apply_lora
from ..models import causal_mask
from ..scoring import linear_cross_entropy
from .base import Trainer, load_for_training
from .config import TrainConfig

def sft_objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(summed CE over answer tokens + EOS, number of those tokens, stats) of one micro-batch."""
    dev = parallel.device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    targets = batch["targets"].to(dev, non_blocking=True)
    mask = batch["mask"].to(dev, non_blocking=True)
    positions = attn = None
    if "segments" in batch:
        positions = batch["positions"].to(dev, non_blocking=True)
        seg = batch["segments"].to(dev, non_blocking=True)
        attn = causal_mask(positions, positions, model.args.sliding_window, seg, seg)
    h = model.hidden(tokens, positions=positions, mask=attn)
    loss_sum = linear_cross_entropy(h[mask], model.output, targets[mask])
    n = mask.sum()
    return loss_sum, n, {"tokens": batch.get("n_tokens", tokens.numel())}


@dataclass
class SFTConfig(TrainConfig):
    """`solver_train.py`'s flags: the shared training flags and packing."""
    packing: bool = False  # several samples per row, attention kept within each


def setup_sft(cfg: SFTConfig) -> Trainer:
    """Initialise the TP x DP world, load model + tokenizer + data and build the Trainer."""
    cfg.validate()
    model, tokenizer, tok_path = load_for_training(cfg, role="solver")
    dataset = load_sft_dataset(cfg.train_file, tokenizer, cfg.max_seq_len, cfg.seed, cfg.prompt_format(cfg.ckpt_dir))
    if cfg.lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        n_train = parallel.param_count(model, trainable_only=True)
        get_logger().info(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}: "
                          f"{n_train / 1e6:.3f}M trainable params")
    trainer = Trainer(model, sft_objective, len(dataset), sft_collate_fn(dataset, cfg.packing), cfg, tok_path)
    trainer.dataset = dataset
    return trainer


def train_sft(cfg: SFTConfig) -> Optional[str]:
    """`solver_train.py`: fine-tune, checkpoint, log; returns the last checkpoint dir."""
    return setup_sft(cfg).fit()
