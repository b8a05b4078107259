"""Advantage estimators (GAE, GRPO, RLOO), KL-shaped rewards and KL-coefficient controllers.

These produce training targets, so every output is detached from the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .losses import kl_estimate

Stats = dict[str, "float | Tensor"]


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), per token.

    rewards/values/mask: [B, T] over the response (right-padded; mask marks real tokens).
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}.
    The episode ends at the last valid token, so V after it is 0 (no bootstrap) and
    anything under mask = 0 is ignored. returns = advantages + values (the critic target).
    Masked positions come back as 0.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    r = torch.where(m, rewards.float(), zero)  # [B, T]
    v = torch.where(m, values.float(), zero)  # [B, T]
    T = r.shape[1]
    adv = torch.zeros_like(r)  # [B, T]
    next_value = torch.zeros_like(r[:, 0])  # [B]
    next_adv = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # where() resets the recursion at padding so A cannot flow across the episode end
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, zero)
        next_value = v[:, t]
        adv[:, t] = next_adv
    return adv, adv + v


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"scores of shape {tuple(scores.shape)} cannot be split into groups "
                         f"of size {group_size} (need 1-D, length divisible by group_size >= 1)")
    return scores.detach().float().view(-1, group_size)  # [N, K]


@torch.no_grad()
def grpo_advantages(scores: Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, GRPO outcome supervision).

    scores: [N*K], the K samples of each prompt contiguous -> [N*K].
    A_i = (r_i - mean_group) / (std_group + eps); std is the population std
    (unbiased=False). normalize_std=False gives the plain mean-centred variant
    (Dr. GRPO, Liu et al. 2025), which avoids up-weighting near-uniform groups.
    """
    g = _groups(scores, group_size)  # [N, K]
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j.

    scores: [N*K] with contiguous groups -> [N*K]. Needs K >= 2 (a baseline from others).
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    g = _groups(scores, group_size)  # [N, K]
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).view(-1)


@torch.no_grad()
def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float, estimator: str = "k1") -> tuple[Tensor, Stats]:
    """Per-token rewards -kl_coef * KL_t, with the sequence score added at the last valid token.

    scores: [B], logprobs/ref_logprobs/mask: [B, T] -> rewards [B, T] (0 under the mask).
    Ziegler et al. 2019 / Ouyang et al. 2022: R(x, y) = r(x, y) - beta log(pi/ref),
    spread over tokens so GAE can assign the KL cost where it is incurred.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    kl = torch.where(m, kl_estimate(logprobs, ref_logprobs, estimator), zero)  # [B, T]
    non_score = -kl_coef * kl  # [B, T]
    T = m.shape[1]
    pos = torch.arange(T, device=m.device).expand_as(m)  # [B, T]
    last = torch.where(m, pos, -1).max(dim=1).values  # [B]; -1 for an all-masked row
    has_token = last >= 0
    score_at = torch.zeros_like(non_score)
    rows = has_token.nonzero(as_tuple=True)[0]
    score_at[rows, last[rows]] = scores.float()[rows]
    rewards = non_score + score_at
    stats: Stats = {"kl": kl.sum(1).mean(), "non_score_reward": non_score.sum(1).mean(),
                    "score": scores.float().mean(), "kl_coef": kl_coef}
    return rewards, stats


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon):
    beta grows when the policy drifts past the target KL and shrinks when it is below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
