"""Supervised fine-tuning of a solver: the SFT objective and `train_sft`, which
`solver_train.py` calls.

The objective runs the transformer to its final hidden states, keeps only the positions
whose target is trained (answer tokens + EOS), and computes the output projection and the
cross-entropy on those rows only, in chunks (`linear_cross_entropy`): prompt and padding
positions never reach the vocabulary matmul, and no [B, T, V] fp32 logits tensor exists.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import parallel
from ..log import get_logger
from ..models import causal_mask
from .base import Trainer, load_for_training, train_config

_CHUNK = 1024  # rows of the vocabulary projection formed at once


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


def linear_cross_entropy(h: torch.Tensor, output: nn.Module, targets: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Summed cross-entropy of `output(h)` against `targets`; h [N, dim], targets [N].

    Fused and chunked for a plain (TP = 1, bias-free) output layer; otherwise (fairscale
    column-parallel output at TP > 1) the layer is called on chunks of rows and the fp32
    cross-entropy taken per chunk."""
    if h.shape[0] == 0:
        return h.sum() * 0.0 + output.weight.sum() * 0.0
    if isinstance(output, nn.Linear) and output.bias is None:
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        return _LinearCrossEntropy.apply(h, output.weight, targets, chunk, dtype)
    total = None
    for s in range(0, h.shape[0], chunk):
        logits = output(h[s:s + chunk]).float()
        part = F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
        total = part if total is None else total + part
    return total


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


def setup_sft(ckpt_dir: str, save_dir: str, train_file: str, model_type: Optional[str] = None,
              max_batch_size: int = 6, lora_rank: int = -1, lora_alpha: Optional[float] = None,
              epochs: int = 1, lr: float = 1e-5, max_seq_len: int = 512, accumulation_steps: int = 1,
              seed: int = 0, save_steps: int = 0, resume: bool = False, packing: bool = False,
              warmup_steps: int = 0, max_steps: int = -1, log_steps: int = 1, gradient_checkpointing: bool = False,
              schedule: str = "cosine", weight_decay: float = 0.0, max_grad_norm: float = 1.0,
              tokenizer_path: Optional[str] = None, peak_flops: Optional[float] = None,
              progress: bool = True) -> Trainer:
    """Initialise the TP x DP world, load model + tokenizer + data and build the Trainer."""
    flags = dict(locals())
    from .. import lora as lora_mod
    from ..data.sft import load_sft_dataset, sft_collate_fn

    log = get_logger()
    if save_steps < 0:
        raise ValueError(f"--save_steps must be >= 0, got {save_steps}")
    model, tokenizer, tok_src = load_for_training(ckpt_dir, model_type, tokenizer_path, seed, role="solver")
    dataset = load_sft_dataset(train_file, tokenizer, max_seq_len, seed)
    if lora_rank is not None and lora_rank > 0:
        lora_mod.apply_lora(model, lora_rank, lora_alpha, seed=seed)
        n_train = parallel.param_count(model, trainable_only=True)
        log.info(f"LoRA rank {lora_rank}, alpha {lora_alpha or lora_rank}: {n_train / 1e6:.3f}M trainable params")
    cfg = train_config(flags, tok_src, {"packing": packing, "max_seq_len": max_seq_len, "lora_rank": lora_rank})
    trainer = Trainer(model, sft_objective, len(dataset), sft_collate_fn(dataset, packing), cfg)
    trainer.dataset = dataset
    return trainer


def train_sft(**kwargs) -> Optional[str]:
    """`solver_train.py`: fine-tune, checkpoint, log; returns the last checkpoint dir."""
    trainer = setup_sft(**kwargs)
    return trainer.fit()
