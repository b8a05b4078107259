"""llama_rlhf.ppo (advantages, KL, clipped losses) against values worked out by hand."""
import math

import pytest
import torch

from llama_rlhf.ppo.advantages import (AdaptiveKLController, FixedKLController, gae,
                                       grpo_advantages, kl_penalized_rewards, rloo_advantages)
from llama_rlhf.ppo.losses import kl_estimate, policy_loss, value_loss


def close(a, b, tol=1e-5):
    a = a.detach() if isinstance(a, torch.Tensor) else a
    return abs(float(a) - float(b)) < tol


# --------------------------------------------------------------------------- GAE


def test_gae_1x3_step_by_step():
    gamma, lam = 0.9, 0.8
    r = [1.0, 0.0, 2.0]
    v = [0.5, 1.0, 1.5]
    # the value after the last valid token is 0 (episode ends)
    d2 = r[2] + gamma * 0.0 - v[2]          # 0.5
    a2 = d2
    d1 = r[1] + gamma * v[2] - v[1]         # 0.35
    a1 = d1 + gamma * lam * a2              # 0.71
    d0 = r[0] + gamma * v[1] - v[0]         # 1.4
    a0 = d0 + gamma * lam * a1              # 1.9112
    adv, ret = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), gamma, lam)
    for t, a in enumerate((a0, a1, a2)):
        assert close(adv[0, t], a)
        assert close(ret[0, t], a + v[t])
    assert close(a0, 1.9112)


def test_gae_padding_is_ignored_and_ends_episode():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 0.0], [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 1 by hand: terminal at t=1
    a1 = 3.0 + 0.0 - 2.0                     # 1.0
    a0 = (0.0 + gamma * 2.0 - 1.0) + gamma * lam * a1  # 0.8 + 0.72
    assert close(adv[1, 1], a1) and close(adv[1, 0], a0)
    assert close(ret[1, 0], a0 + 1.0)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # garbage under the mask changes nothing
    r2, v2 = rewards.clone(), values.clone()
    r2[mask == 0] = 123.0
    v2[mask == 0] = -55.0
    adv2, ret2 = gae(r2, v2, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_lambda1_gamma1_is_monte_carlo_return_minus_value():
    r = torch.tensor([[0.1, -0.2, 1.0]])
    v = torch.tensor([[0.3, 0.4, 0.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.8, 1.0]]))
    torch.testing.assert_close(adv, ret - v)


def test_gae_is_detached():
    v = torch.tensor([[0.5, 1.0]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), v, torch.ones(1, 2), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- GRPO / RLOO


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(scores, 3)
    mean = 1 / 3
    std = math.sqrt(((1 - mean) ** 2 + 2 * mean ** 2) / 3)  # population std = sqrt(2/9)
    expect = [(1 - mean) / (std + 1e-6), -mean / (std + 1e-6), -mean / (std + 1e-6), 0, 0, 0]
    for a, e in zip(adv.tolist(), expect):
        assert close(a, e)
    adv_nostd = grpo_advantages(scores, 3, normalize_std=False)
    for a, e in zip(adv_nostd.tolist(), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0]):
        assert close(a, e)


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 4.0, 2.0, 0.0])
    adv = rloo_advantages(scores, 3)
    expect = [1 - 0.0, 0 - 0.5, 0 - 0.5, 4 - 1.0, 2 - 2.0, 0 - 3.0]
    for a, e in zip(adv.tolist(), expect):
        assert close(a, e)


def test_group_errors():
    with pytest.raises(ValueError, match="group"):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group"):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    k1 = kl_estimate(logp, ref, "k1")
    assert close(k1[0, 0], math.log(2)) and close(k1[0, 1], -math.log(2))
    k3 = kl_estimate(logp, ref, "k3")
    # r = ref / pi: 0.5 then 2
    assert close(k3[0, 0], (0.5 - 1) - math.log(0.5))
    assert close(k3[0, 1], (2 - 1) - math.log(2))
    assert (k3 >= 0).all()
    k2 = kl_estimate(logp, ref, "k2")
    assert close(k2[0, 0], 0.5 * math.log(2) ** 2)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logp, ref, "k9")


def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, stats = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: row 0 [0.5, -1, 0]; row 1 [1, 0, (masked)]
    expect = [[-0.05, 0.1, 0.0 + 1.0], [-0.1, 0.0 + 2.0, 0.0]]
    for b in range(2):
        for t in range(3):
            assert close(rewards[b, t], expect[b][t])
    assert close(stats["kl"], ((0.5 - 1 + 0) + (1 + 0)) / 2)
    assert close(stats["non_score_reward"], ((-0.05 + 0.1) + (-0.1)) / 2)
    # k3 variant: per-token -0.1 * ((r - 1) - log r)
    rewards3, _ = kl_penalized_rewards(scores, logp, ref, mask, 0.1, "k3")
    lr = -1.5 - (-1.0)
    assert close(rewards3[0, 0], -0.1 * ((math.exp(lr) - 1) - lr))
    # an all-masked row receives nothing
    r0, _ = kl_penalized_rewards(scores, logp, ref, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1, "k1")
    assert (r0[1] == 0).all() and close(r0[0, 0], -0.05 + 1.0)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error 9/6 - 1 = 0.5 -> clipped to 0.2
    assert close(ctl.value, 0.2 * (1 + 0.2 * 256 / 10000), 1e-12)
    v = ctl.value
    ctl.update(5.4, 100)  # error 5.4/6 - 1 = -0.1 (inside the clip)
    assert close(ctl.value, v * (1 - 0.1 * 100 / 10000), 1e-12)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_clipped_and_unclipped_tokens():
    c = 0.2
    # ratios 1.5 (A=+1, clipped to 1.2), 0.9 (A=+1, inside), 0.5 (A=-1, clipped to 0.8),
    # 1.5 (A=-1: pessimistic max keeps the unclipped 1.5)
    ratios = [1.5, 0.9, 0.5, 1.5]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.3, -0.7]])
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=c)
    per_tok = [max(-1 * 1.5, -1 * 1.2), max(-0.9, -0.9), max(0.5, 0.8), max(1.5, 1.2)]
    assert close(loss, sum(per_tok) / 4)  # (-1.2 - 0.9 + 0.8 + 1.5) / 4
    assert close(stats["clipfrac"], 2 / 4)
    assert close(stats["approx_kl"], sum((r - 1) - math.log(r) for r in ratios) / 4)
    assert close(stats["ratio_mean"], sum(ratios) / 4)
    assert close(stats["ratio_max_abs_dev"], 0.5)
    loss.backward()
    # d/dlogp of (-A r)/4 is -A r / 4 where unclipped, and exactly 0 on the clipped branch
    expect_grad = [0.0, -0.9 / 4, 0.0, 1.5 / 4]
    for t in range(4):
        assert close(logp.grad[0, t], expect_grad[t])
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 2].item() == 0.0


def test_policy_loss_mask_and_garbage():
    logp = torch.tensor([[-1.0, 50.0]], requires_grad=True)  # exp(50 - (-40)) would overflow
    old = torch.tensor([[-1.0, -40.0]])
    adv = torch.tensor([[2.0, float("nan")]])
    mask = torch.tensor([[1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert close(loss, -2.0) and close(stats["ratio_max_abs_dev"], 0.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1].item() == 0.0
    assert close(logp.grad[0, 0], -2.0)


def test_policy_loss_entropy_and_kl_terms():
    logp = torch.tensor([[-1.0, -2.0]])
    old = logp.clone()
    adv = torch.tensor([[1.0, 3.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    ent = torch.tensor([[0.4, 1.0]])
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, entropy=ent, entropy_coef=0.01,
                              ref_logprobs=ref, kl_coef=0.1, kl_estimator="k3")
    pg = (-1.0 - 3.0) / 2  # ratio 1 everywhere
    k3 = [(math.exp(lr) - 1) - lr for lr in (-1.5 + 1.0, -1.0 + 2.0)]
    assert close(stats["kl"], sum(k3) / 2) and close(stats["entropy"], 0.7)
    assert close(loss, pg - 0.01 * 0.7 + 0.1 * sum(k3) / 2)


# --------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 42.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0]])
    ret = torch.tensor([[3.0, 1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, ret, mask, clip_range_value=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-3)^2, (0.7-3)^2) = 5.29 (clipped branch)
    # token 1: v inside the range -> (2-1)^2 = 1
    assert close(loss, 0.5 * (5.29 + 1.0) / 2)
    assert close(stats["vf_clipfrac"], 0.5)
    # EV: resid R - v = [2, -1] -> var 2.25; var R = var([3, 1]) = 1 -> 1 - 2.25
    assert close(stats["explained_variance"], -1.25, 1e-4)
    loss.backward()
    # clipped token has zero gradient; token 1: d/dv 0.5 * (v - R)^2 / 2 = (2 - 1) / 2
    assert values.grad[0, 0].item() == 0.0 and close(values.grad[0, 1], 0.5)
    assert values.grad[0, 2].item() == 0.0


def test_value_loss_perfect_critic_explained_variance_one():
    ret = torch.tensor([[1.0, 2.0, 4.0]])
    _, stats = value_loss(ret.clone(), ret.clone(), ret, torch.ones(1, 3), 0.2)
    assert close(stats["explained_variance"], 1.0)
