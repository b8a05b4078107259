"""Verifier (outcome reward model) training: a solver checkpoint + a scalar head, trained on
preference pairs with the shared `Trainer`; `verifier_train.py` calls `train_verifier`.

Objectives (losses.py), per micro-batch of P pairs with scores r_c, r_r:

* ``pairwise``:     -log sigma(r_c - r_r [- margin])                     (Bradley-Terry)
* ``logexpwithlm``: the same + lm_coef x (mean NLL of each chosen answer's tokens)
* ``pointwise``:    BCE(score, label) on chosen = 1 / rejected = 0 (or on pointwise records)

The loss is summed over pairs (samples for pointwise) and the Trainer divides by the global
count, so the update is the same under any DP x accumulation layout. A score is the head's
value at the answer's last token (EOS) (``--reduce last``) or its mean over the answer's
tokens (``--reduce mean``), with the token alignment of `llama_rlhf.scoring`.

The model is initialised from a SOLVER checkpoint (a verifier dir is refused) and given a
seeded head (`attach_reward_head`); every checkpoint written is a verifier (params.json has
``reward_head: 1``). ``--resume`` restarts from the latest checkpoint in ``--save_dir``: pass
the same solver ``--ckpt_dir`` as the first run, the head and weights then come from the
checkpoint. With LoRA the head trains fully beside the adapters and is kept in the state
files, so a LoRA run resumes too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .. import parallel
from ..data.pairs import PairDataset, load_pair_dataset
from ..config import flag
from ..errors import UsageError
from ..log import get_logger
from ..lora import apply_lora
from ..losses import logexpwithlm_loss, pairwise_loss, pointwise_loss
from ..models import attach_reward_head
from ..scoring import PairBatch, forward_hidden, scores_from_hidden, sequence_logprobs, sequence_scores
from .base import Trainer, autocast, load_for_training
from .config import TrainConfig

LOSSES = ("pairwise", "logexpwithlm", "pointwise")
REDUCES = ("last", "mean")


# ----------------------------------------------------------------------------- forward

def chosen_lm_nll(model: nn.Module, h: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Mean next-token NLL of each chosen answer's tokens (+ EOS), one value per pair [P], by
    the log-prob path DPO and PPO use (chunked: no [B, T, V] logits)."""
    logp, count = sequence_logprobs(model, h, batch, batch.n_pairs)
    return -logp / count


def verifier_objective(loss_type: str = "pairwise", lm_coef: float = 0.0, reduce: str = "last"):
    """`objective(model, batch) -> (loss summed over units, units, stats)` for the Trainer."""
    if loss_type not in LOSSES:
        raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, got {loss_type!r}")
    if reduce not in REDUCES:
        raise UsageError(f"--reduce must be 'last' or 'mean', got {reduce!r}")

    def objective(model: nn.Module, batch: PairBatch):
        dev = parallel.device()
        h = forward_hidden(model, batch)
        scores = scores_from_hidden(model, h, batch, reduce)
        tokens = {"tokens": batch.n_tokens}
        if batch.labels is not None:  # pointwise records
            n = scores.shape[0]
            value, stats = pointwise_loss(scores, batch.labels.to(dev))
            return value * n, n, {**stats, **tokens}
        P = batch.n_pairs
        if loss_type == "pointwise":
            labels = torch.cat([torch.ones(P), torch.zeros(P)]).to(dev)
            value, stats = pointwise_loss(scores, labels)
            return value * 2 * P, 2 * P, {**stats, **tokens}
        rc, rr = scores[:P], scores[P:]
        margin = batch.margin.to(dev) if batch.margin is not None else None
        if loss_type == "pairwise":
            value, stats = pairwise_loss(rc, rr, margin)
        else:
            value, stats = logexpwithlm_loss(rc, rr, chosen_lm_nll(model, h, batch).mean(), lm_coef, margin)
        return value * P, P, {**stats, **tokens}

    return objective


# ----------------------------------------------------------------------------- held-out evaluation

@torch.no_grad()
def score_dataset(model: nn.Module, dataset: PairDataset, max_batch_size: int, reduce: str = "last",
                  packing: bool = False) -> tuple[list[float], list[float]]:
    """Scores of every unit of `dataset` (all ranks get all): pairwise -> (chosen, rejected)
    scores per pair; pointwise -> (scores, labels). DP replicas score strided slices."""
    was_training = model.training
    model.eval()
    mine = list(range(parallel.dp_rank(), len(dataset), parallel.dp_size()))
    local: list[tuple[int, float, float]] = []
    for s in range(0, len(mine), max_batch_size):
        idx = mine[s:s + max_batch_size]
        batch = dataset.collate(idx, 0, packing and dataset.kind == "pairwise")
        with autocast():
            sc = sequence_scores(model, batch, reduce).float().cpu()
        if dataset.kind == "pairwise":
            P = len(idx)
            local += [(i, float(sc[k]), float(sc[P + k])) for k, i in enumerate(idx)]
        else:
            local += [(i, float(sc[k]), float(batch.labels[k])) for k, i in enumerate(idx)]
    model.train(was_training)
    rows = sorted(r for part in parallel.all_gather_objects(local) for r in part)
    return [r[1] for r in rows], [r[2] for r in rows]


def pair_metrics(dataset: PairDataset, a: list[float], b: list[float], prefix: str = "eval/") -> dict:
    """Pairwise: accuracy (chosen scored above rejected), mean margin, reward mean / std.
    Pointwise (a = scores, b = labels): accuracy at threshold 0, reward mean / std."""
    if dataset.kind == "pairwise":
        diffs = [c - r for c, r in zip(a, b)]
        everything = a + b
        acc = sum(d > 0 for d in diffs) / len(diffs)
        extra = {"margin": sum(diffs) / len(diffs), "chosen_reward": sum(a) / len(a),
                 "rejected_reward": sum(b) / len(b)}
    else:
        everything = a
        acc = sum((s > 0) == (y > 0.5) for s, y in zip(a, b)) / len(a)
        extra = {}
    mean = sum(everything) / len(everything)
    std = math.sqrt(sum((x - mean) ** 2 for x in everything) / len(everything))
    out = {"accuracy": acc, **extra, "reward_mean": mean, "reward_std": std, "n": len(a)}
    return {prefix + k: v for k, v in out.items()}


def evaluate_verifier(model: nn.Module, dataset: PairDataset, max_batch_size: int, reduce: str = "last",
                      packing: bool = False, prefix: str = "eval/") -> dict:
    a, b = score_dataset(model, dataset, max_batch_size, reduce, packing)
    return pair_metrics(dataset, a, b, prefix)


# ----------------------------------------------------------------------------- trainer & setup

class VerifierTrainer(Trainer):
    """The shared Trainer; with LoRA it also keeps the (fully trained) reward head in the
    state files, since LoRA checkpoints restore only adapters onto the loaded base."""

    def _extra_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters()
                if p.requires_grad and not n.endswith(("lora_A", "lora_B"))}

    def state_dict(self) -> dict:
        st = super().state_dict()
        if self.is_lora:
            st["extra_trainable"] = {n: p.detach().cpu().clone() for n, p in self._extra_trainable().items()}
        return st

    def load(self, path: str) -> None:
        super().load(path)
        if self.is_lora:
            st = torch.load(os.path.join(path, f"state.{parallel.rank():02d}.pth"), map_location="cpu",
                            weights_only=False, mmap=True)
            with torch.no_grad():
                for n, p in self._extra_trainable().items():
                    p.copy_(st["extra_trainable"][n])


@dataclass
class VerifierConfig(TrainConfig):
    """`verifier_train.py`'s flags: the shared training flags and the verifier's own."""
    loss: str = flag("pairwise", choices=LOSSES)
    lm_coef: float = 0.0  # --loss logexpwithlm: weight of the chosen answers' LM loss
    reduce: str = flag("last", choices=REDUCES)  # score = head at the last token, or its mean
    packing: bool = False
    label_file: Optional[str] = flag(None, path="file")  # held-out pairs scored after each epoch
    eval_batch_size: Optional[int] = None  # default: --max_batch_size

    def validate(self) -> None:
        super().validate()
        if self.lm_coef < 0 or (self.loss != "logexpwithlm" and self.lm_coef):
            raise UsageError(f"--lm_coef {self.lm_coef}: must be >= 0 and applies to --loss logexpwithlm only")


def setup_verifier(cfg: VerifierConfig) -> VerifierTrainer:
    """Load solver + data, attach the head (+ LoRA), build the Trainer (with held-out eval)."""
    cfg.validate()
    objective = verifier_objective(cfg.loss, cfg.lm_coef, cfg.reduce)
    model, tokenizer, tok_path = load_for_training(cfg, role="solver")
    fmt = cfg.prompt_format(cfg.ckpt_dir)
    train = load_pair_dataset(cfg.train_file, tokenizer, cfg.max_seq_len, fmt)
    held_out = load_pair_dataset(cfg.label_file, tokenizer, cfg.max_seq_len, fmt) if cfg.label_file else None
    if train.kind == "pointwise" and cfg.loss != "pointwise":
        raise UsageError(f"{cfg.train_file} holds pointwise records (output, label); they need --loss pointwise")
    attach_reward_head(model, cfg.seed)
    if cfg.lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        model.reward_head.requires_grad_(True)  # the new head always trains fully
        get_logger().info(f"LoRA rank {cfg.lora_rank} + reward head: "
                          f"{parallel.param_count(model, trainable_only=True) / 1e6:.3f}M trainable params")
    use_packing = cfg.packing and train.kind == "pairwise"

    def collate(indices: list[int], epoch: int, _ds=train) -> dict:
        return _ds.collate(indices, epoch, use_packing)

    # Without the LM term the vocabulary projection never runs: its FLOPs are not in `mfu`.
    n_params = None if cfg.lm_coef else parallel.param_count(model, exclude=("tok_embeddings", "output"))
    trainer = VerifierTrainer(model, objective, len(train), collate, cfg, tok_path,
                              plot_keys=("loss", "accuracy", "margin"), n_params=n_params)
    trainer.dataset, trainer.held_out, trainer.tokenizer = train, held_out, tokenizer
    if held_out is not None:
        bs = cfg.eval_batch_size or cfg.max_batch_size
        trainer.eval_fn = lambda tr: evaluate_verifier(tr.model, held_out, bs, cfg.reduce, use_packing)
    return trainer


def train_verifier(cfg: VerifierConfig) -> Optional[str]:
    """`verifier_train.py`: train a verifier, checkpoint, log; returns the last checkpoint dir."""
    return setup_verifier(cfg).fit()


__all__ = ["LOSSES", "REDUCES", "VerifierTrainer", "chosen_lm_nll", "evaluate_verifier",
           "pair_metrics", "score_dataset",
           "setup_verifier", "train_verifier", "verifier_objective", "VerifierConfig"]
