"""PPO actor / critic losses and per-token KL estimators (all token-level, masked)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from ..losses import masked_mean

Stats = dict[str, "float | Tensor"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token Monte-Carlo estimate of KL(pi || ref) from tokens sampled from pi.

    logprobs/ref_logprobs: [B, T] -> [B, T]. Schulman, "Approximating KL divergence"
    (2020), with log r = log ref - log pi:
    * k1 = -log r = log pi - log ref: unbiased, high variance, can be negative;
    * k2 = (log r)^2 / 2: biased, low variance;
    * k3 = (r - 1) - log r: unbiased and always >= 0.
    """
    if estimator not in KL_ESTIMATORS:
        raise UsageError(f"kl_estimate: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_r = ref_logprobs.float() - logprobs.float()  # [B, T]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r  # expm1: exact for r close to 1


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3") -> tuple[Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), token-level masked mean.

    All inputs [B, T]. ratio = exp(logprobs - old_logprobs), from log-probs of the sampled
    tokens (never raw logits). Per token: max(-A r, -A clip(r, 1 - c, 1 + c)).
    Optional extras: an entropy bonus (- entropy_coef * mean entropy) and a KL-to-reference
    penalty in the loss (+ kl_coef * mean KL, GRPO-style, Shao et al. 2024) rather than in
    the reward.
    """
    m = mask.bool()
    zero = torch.zeros((), device=logprobs.device)
    # masked positions may hold garbage: neutralise before exp so neither the value nor the
    # gradient can turn into inf/nan (a where() after exp would still backprop 0 * inf)
    log_ratio = torch.where(m, logprobs.float() - old_logprobs.float(), zero)  # [B, T]
    adv = torch.where(m, advantages.float(), zero)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    loss = pg_loss

    with torch.no_grad():
        stats: Stats = {
            "pg_loss": pg_loss.detach(),
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            # k3 estimate of KL(old || new) from samples of old: (r - 1) - log r, r = new/old
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max_abs_dev": (ratio - 1.0).abs().max(),  # masked entries are exactly 0
        }
    if entropy is not None:
        ent = masked_mean(entropy.float(), m)
        loss = loss - entropy_coef * ent
        stats["entropy"] = ent.detach()
    if ref_logprobs is not None:
        lp = torch.where(m, logprobs.float(), zero)
        ref = torch.where(m, ref_logprobs.float(), zero)
        kl = masked_mean(kl_estimate(lp, ref, kl_estimator), m)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, Stats]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).

    All inputs [B, T]; masked mean over tokens. The clip (as in PPO2 / InstructGPT) keeps
    the critic from moving far from the values that produced the advantages in one epoch.
    explained_variance = 1 - Var(R - v) / Var(R) over masked tokens: 1 is a perfect critic,
    0 no better than predicting the mean return, negative worse than that.
    """
    m = mask.bool()
    zero = torch.zeros((), device=values.device)
    v = torch.where(m, values.float(), zero)  # [B, T]
    v_old = torch.where(m, old_values.float(), zero)
    ret = torch.where(m, returns.float(), zero)
    v_clipped = v_old + (v - v_old).clamp(-clip_range_value, clip_range_value)
    vf_unclipped = (v - ret) ** 2
    vf_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), m)

    with torch.no_grad():
        resid = ret - v
        var_resid = masked_mean((resid - masked_mean(resid, m)) ** 2, m)
        var_ret = masked_mean((ret - masked_mean(ret, m)) ** 2, m)
        stats: Stats = {
            "vf_loss": loss.detach(),
            "vf_clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), m),
            "explained_variance": 1.0 - var_resid / (var_ret + 1e-8),
            "value_mean": masked_mean(v, m),
        }
    return loss, stats
