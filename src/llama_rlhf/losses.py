"""Token-level helpers and the SFT / reward-model / DPO objectives.

Every function is a pure tensor function: tensors in, ``(loss, stats)`` out. Losses are
differentiable scalars; stats values are detached tensors (no host sync is forced here,
the trainer decides when to ``.item()`` them). Masks are bool or 0/1 tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from .errors import UsageError
from torch import Tensor

Stats = dict[str, "float | Tensor"]

# --------------------------------------------------------------------------- token helpers


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target_t | ...) for every position, in fp32.

    logits: [B, T, V] (any float dtype), targets: [B, T] int64 -> [B, T] fp32.

    The vocabulary is large, so the fp32 log-softmax is formed one batch row at a time:
    peak temporary memory is one [T, V] fp32 block, and what autograd keeps alive for the
    backward (each row's log-softmax) adds up to a single [B, T, V] fp32 copy.
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):  # [T, V], [T]
        logp = F.log_softmax(row_logits.float(), dim=-1)  # [T, V] fp32
        rows.append(logp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))  # [T]
    return torch.stack(rows)  # [B, T]


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of the next-token distribution, in fp32.

    logits: [B, T, V] -> [B, T]. Row-by-row for the same memory reason as token_logprobs.
    """
    rows = []
    for row_logits in logits:  # [T, V]
        logp = F.log_softmax(row_logits.float(), dim=-1)  # [T, V]
        rows.append(-(logp.exp() * logp).sum(-1))  # [T]
    return torch.stack(rows)  # [B, T]


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over entries where mask is set.

    torch.where (not x * mask) so that inf/nan sitting under the mask cannot leak in.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    picked = torch.where(mask.bool(), x, zero)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask is set (0 when nothing is selected, not nan)."""
    m = mask.bool()
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean/var (biased, unbiased=False) over masked entries.

    shift_mean=False adds the mean back, only rescaling (as for PPO rewards, where the
    sign of the reward carries meaning). Masked-out positions are returned as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------- SFT


# --------------------------------------------------------------------------- reward models


def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor,
                  margin: Tensor | None = None) -> tuple[Tensor, Stats]:
    """Bradley-Terry preference loss -log sigma(r_c - r_r - m), batch mean.

    r_chosen/r_rejected/margin: [B]. The optional margin (Llama 2, Touvron et al. 2023,
    eq. 2) asks for a larger reward gap on pairs rated as clearly different.
    """
    diff = r_chosen.float() - r_rejected.float()  # [B]
    z = diff if margin is None else diff - margin.float()
    loss = -F.logsigmoid(z).mean()
    d = diff.detach()
    stats = {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
             "chosen_reward": r_chosen.detach().float().mean(),
             "rejected_reward": r_rejected.detach().float().mean(),
             "reward_mean": torch.cat([r_chosen.detach(), r_rejected.detach()]).float().mean()}
    return loss, stats


def logexpwithlm_loss(r_chosen: Tensor, r_rejected: Tensor, lm_loss: Tensor, lm_coef: float,
                      margin: Tensor | None = None) -> tuple[Tensor, Stats]:
    """log(1 + exp(r_r - r_c)) + lm_coef * lm_loss ("log-exp with LM" verifier objective).

    log(1 + exp(r_r - r_c)) = -log sigma(r_c - r_r), i.e. the Bradley-Terry term of
    pairwise_loss; the LM term (SFT loss on the chosen response) keeps the verifier's
    backbone a working language model while it learns to score.
    """
    pref, stats = pairwise_loss(r_chosen, r_rejected, margin)
    loss = pref + lm_coef * lm_loss
    stats = {**stats, "pairwise_loss": pref.detach(), "lm_loss": lm_loss.detach()}
    return loss, stats


def pointwise_loss(scores: Tensor, labels: Tensor) -> tuple[Tensor, Stats]:
    """Binary cross-entropy on a scalar score per sample (outcome verifier, Cobbe et al. 2021).

    scores: [B] logits, labels: [B] in {0, 1}.
    """
    y = labels.float()
    loss = F.binary_cross_entropy_with_logits(scores.float(), y)
    acc = ((scores.detach() > 0).float() == y).float().mean()
    return loss, {"accuracy": acc, "score_mean": scores.detach().float().mean()}


# --------------------------------------------------------------------------- DPO


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[Tensor, Stats]:
    """Direct Preference Optimization on summed sequence log-probs (all [B]).

    h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)).
    * "sigmoid": Rafailov et al. 2023, eq. 7: -log sigma(beta h). With label_smoothing eps
      (conservative DPO, labels flipped with prob. eps):
      -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    * "ipo": Azar et al. 2023, eq. 17: (h - 1/(2 beta))^2, a squared loss that regresses
      the log-ratio gap to a finite target instead of pushing it to infinity.

    beta -> 0: for "sigmoid" the loss -> log 2 and its gradient (proportional to beta)
    -> 0, the implicit rewards beta * log(pi/ref) shrink to 0 (no constraint-free
    learning signal). For "ipo" the target margin 1/(2 beta) -> infinity, i.e. the
    KL regularisation vanishes. beta must be > 0.
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise UsageError(f"dpo_loss: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if beta <= 0:
        raise UsageError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UsageError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise UsageError("dpo_loss: label_smoothing applies to loss_type='sigmoid' only")
    chosen_lr = policy_chosen_logps.float() - ref_chosen_logps.float()  # [B]
    rejected_lr = policy_rejected_logps.float() - ref_rejected_logps.float()  # [B]
    h = chosen_lr - rejected_lr  # [B]
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    rc, rr = beta * chosen_lr.detach(), beta * rejected_lr.detach()
    stats = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean()}
    return losses.mean(), stats

