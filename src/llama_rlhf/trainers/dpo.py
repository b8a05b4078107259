"""Direct Preference Optimization on the verifier's pairwise data; `dpo_train.py` calls `train_dpo`.

Reference log-probs are computed ONCE, before training, for every train and held-out pair
(summed over the answer's tokens + EOS), cached in memory per pair, and the reference model
is then freed: a training step runs the policy only. The reference defaults to the initial
policy (``--ckpt_dir``; it then computes its own reference before any update, so no second
model is ever loaded), or ``--reference_ckpt_dir`` (same TP size, same tokenizer).

Loss (losses.dpo_loss), with h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)):
``sigmoid`` -log sigma(beta h) (``--label_smoothing`` eps: conservative DPO) or ``ipo``
(h - 1/(2 beta))^2. Summed over pairs and divided by the global pair count by the Trainer, so
it is the same under any DP x accumulation layout. As beta -> 0 the sigmoid loss tends to
log 2 with a gradient proportional to beta (the policy barely moves: raise --lr or beta);
for ipo the target gap 1/(2 beta) grows without bound (the KL anchor vanishes). beta > 0.

Token alignment is that of `llama_rlhf.scoring` (prompt = format_prompt with BOS, answer +
EOS; the log-prob of token j+1 comes from position j); `sequence_logps` computes the sums
with the SFT trainer's chunked cross-entropy, so no [B, T, V] logits tensor is formed.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .. import parallel
from ..checkpoint import load_model, shard_files
from ..data.pairs import PairDataset, collate_pairs, load_pair_dataset
from ..config import flag
from ..errors import MissingPathError, UsageError
from ..log import get_logger
from ..lora import apply_lora
from ..losses import dpo_loss
from ..scoring import PairBatch, forward_hidden, sequence_logprobs
from .base import Trainer, autocast, load_for_training
from .config import TrainConfig

DPO_LOSSES = ("sigmoid", "ipo")


def sequence_logps(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Summed log-prob of each sequence's response tokens (+ EOS) given its prompt [S], fp32."""
    return sequence_logprobs(model, forward_hidden(model, batch), batch)[0]


@torch.no_grad()
def pair_logps(model: nn.Module, datasets: list[PairDataset], max_batch_size: int) -> list[torch.Tensor]:
    """Per dataset, [N, 2] (chosen, rejected) summed log-probs of every pair under `model`;
    DP replicas compute strided slices, every rank gets all."""
    was_training = model.training
    model.eval()
    out = []
    for ds in datasets:
        mine = list(range(parallel.dp_rank(), len(ds), parallel.dp_size()))
        local = []
        for s in range(0, len(mine), max_batch_size):
            idx = mine[s:s + max_batch_size]
            batch = collate_pairs([ds.pairs[i] for i in idx], ds.pad_id)
            with autocast():
                lp = sequence_logps(model, batch).float().cpu()
            P = len(idx)
            local += [(i, float(lp[k]), float(lp[P + k])) for k, i in enumerate(idx)]
        table = torch.zeros(len(ds), 2, dtype=torch.float32)
        for part in parallel.all_gather_objects(local):
            for i, c, r in part:
                table[i, 0], table[i, 1] = c, r
        out.append(table)
    model.train(was_training)
    return out


def dpo_collate(dataset: PairDataset, ref: torch.Tensor):
    """collate(indices, epoch) -> unpacked pair batch + the cached reference log-probs [P, 2]."""
    def collate(indices: list[int], epoch: int = 0, _ds=dataset, _ref=ref) -> PairBatch:
        batch = collate_pairs([_ds.pairs[i] for i in indices], _ds.pad_id)
        return dataclasses.replace(batch, ref=_ref[list(indices)])
    return collate


def dpo_objective(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """`objective(model, batch) -> (DPO loss summed over pairs, pairs, stats)` for the Trainer."""
    def objective(model: nn.Module, batch: PairBatch):
        dev = parallel.device()
        P = batch.n_pairs
        logps = sequence_logps(model, batch)
        ref = batch.ref.to(dev)
        loss, stats = dpo_loss(logps[:P], logps[P:], ref[:, 0], ref[:, 1], beta, loss_type, label_smoothing)
        stats = {**stats, "accuracy": stats["rewards/accuracy"], "margin": stats["rewards/margin"],
                 "logps/chosen": logps[:P].detach().mean(), "logps/rejected": logps[P:].detach().mean(),
                 "tokens": batch.n_tokens}
        return loss * P, P, stats
    return objective


@torch.no_grad()
def evaluate_dpo(model: nn.Module, dataset: PairDataset, ref: torch.Tensor, beta: float, max_batch_size: int,
                 prefix: str = "eval/") -> dict:
    """Held-out pairs: the policy's chosen-over-rejected log-prob margin and accuracy, and the
    implicit-reward margin beta*h and accuracy (h > 0) against the cached reference."""
    table = pair_logps(model, [dataset], max_batch_size)[0]
    gap = table[:, 0] - table[:, 1]
    h = gap - (ref[:, 0] - ref[:, 1])
    return {prefix + "logp_margin": gap.mean().item(), prefix + "logp_accuracy": (gap > 0).float().mean().item(),
            prefix + "logps/chosen": table[:, 0].mean().item(), prefix + "logps/rejected": table[:, 1].mean().item(),
            prefix + "reward_margin": (beta * h).mean().item(), prefix + "reward_accuracy": (h > 0).float().mean().item(),
            prefix + "n": len(dataset)}


def _cached_reference_logps(model, reference_ckpt_dir: Optional[str], model_type: Optional[str],
                            datasets: list, bs: int) -> list:
    """Reference log-probs of every dataset: from --reference_ckpt_dir (loaded, used, freed) or the
    initial policy."""
    if reference_ckpt_dir:
        if not os.path.isdir(reference_ckpt_dir):
            raise MissingPathError(f"--reference_ckpt_dir {reference_ckpt_dir}: no such directory")
        if len(shard_files(reference_ckpt_dir)) != parallel.tp_size():
            raise UsageError(f"--reference_ckpt_dir {reference_ckpt_dir} has {len(shard_files(reference_ckpt_dir))} "
                             f"shards but --ckpt_dir has {parallel.tp_size()}; split it to the same TP size")
        reference = load_model(reference_ckpt_dir, model_type, parallel.device(), torch.float32, role="solver")
        if reference.args.vocab_size != model.args.vocab_size:
            raise UsageError(f"--reference_ckpt_dir {reference_ckpt_dir}: vocabulary {reference.args.vocab_size} "
                             f"differs from the policy's {model.args.vocab_size}")
        refs = pair_logps(reference, datasets, bs)
        del reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        refs = pair_logps(model, datasets, bs)  # the initial policy, before any update
    return refs


@dataclass
class DPOConfig(TrainConfig):
    """`dpo_train.py`'s flags: the shared training flags and DPO's own."""
    lr: float = 1e-6
    reference_ckpt_dir: Optional[str] = flag(None, path="dir")  # default: the initial policy
    label_file: Optional[str] = flag(None, path="file")  # held-out pairs evaluated after each epoch
    beta: float = 0.1
    loss: str = flag("sigmoid", choices=DPO_LOSSES)
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    eval_batch_size: Optional[int] = None  # default: --max_batch_size

    def validate(self) -> None:
        super().validate()
        z = torch.zeros(1)
        dpo_loss(z, z, z, z, self.beta, self.loss, self.label_smoothing)  # beta / label_smoothing / loss


def setup_dpo(cfg: DPOConfig) -> Trainer:
    """Load data and the reference, cache reference log-probs, free it, build the policy Trainer."""
    cfg.validate()
    model, tokenizer, tok_path = load_for_training(cfg, role="solver")
    fmt = cfg.prompt_format(cfg.ckpt_dir)
    train = load_pair_dataset(cfg.train_file, tokenizer, cfg.max_seq_len, fmt)
    held_out = load_pair_dataset(cfg.label_file, tokenizer, cfg.max_seq_len, fmt) if cfg.label_file else None
    for ds, name in ((train, cfg.train_file), (held_out, cfg.label_file)):
        if ds is not None and ds.kind != "pairwise":
            raise UsageError(f"{name}: DPO needs pairwise records (instruction, chosen, rejected)")
    datasets = [train] + ([held_out] if held_out is not None else [])
    bs = cfg.eval_batch_size or cfg.max_batch_size
    refs = _cached_reference_logps(model, cfg.reference_ckpt_dir, cfg.model_type, datasets, bs)
    get_logger().info(f"reference log-probs cached for {sum(len(d) for d in datasets)} pairs ("
                      f"{'--reference_ckpt_dir ' + cfg.reference_ckpt_dir if cfg.reference_ckpt_dir else 'initial policy'})")
    if cfg.lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        get_logger().info(f"LoRA rank {cfg.lora_rank}: "
                          f"{parallel.param_count(model, trainable_only=True) / 1e6:.3f}M trainable params")
    objective = dpo_objective(cfg.beta, cfg.loss, cfg.label_smoothing)
    trainer = Trainer(model, objective, len(train), dpo_collate(train, refs[0]), cfg, tok_path,
                      plot_keys=("loss", "rewards/margin", "rewards/accuracy"))
    trainer.dataset, trainer.held_out, trainer.reference_logps = train, held_out, refs
    if held_out is not None:
        trainer.eval_fn = lambda tr: evaluate_dpo(tr.model, held_out, refs[1], cfg.beta, bs)
    return trainer


def train_dpo(cfg: DPOConfig) -> Optional[str]:
    """`dpo_train.py`: DPO, checkpoint, log; returns the last checkpoint dir (a solver)."""
    return setup_dpo(cfg).fit()


__all__ = ["DPO_LOSSES", "dpo_collate", "dpo_objective", "evaluate_dpo", "pair_logps",
           "sequence_logps",
           "setup_dpo", "train_dpo", "DPOConfig"]
