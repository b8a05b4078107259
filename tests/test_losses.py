"""llama_rlhf.losses against values worked out by hand with plain `math`."""
import math

import pytest
import torch
import torch.nn.functional as F

from llama_rlhf.losses import (dpo_loss, logexpwithlm_loss, masked_mean, masked_sum, masked_whiten,
                               pairwise_loss, pointwise_loss, token_entropy,
                               token_logprobs)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def close(a, b, tol=1e-5):
    a = a.detach() if isinstance(a, torch.Tensor) else a
    return abs(float(a) - float(b)) < tol


# --------------------------------------------------------------------------- token helpers


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    targets = torch.tensor([[2, 1]])
    lp = token_logprobs(logits, targets)
    z = math.exp(1) + math.exp(2) + math.exp(3)
    assert close(lp[0, 0], 3 - math.log(z))
    assert close(lp[0, 1], -math.log(3))


def test_token_logprobs_is_negative_cross_entropy_and_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    ce = F.cross_entropy(logits.view(-1, 11), targets.view(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(token_logprobs(logits, targets), -ce)
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


def test_token_logprobs_gradient_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    t = torch.randint(0, 7, (2, 4), generator=g)
    (-token_logprobs(a, t)).sum().backward()
    F.cross_entropy(b.view(-1, 7), t.view(-1), reduction="sum").backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_token_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e4, -1e4]]])
    h = token_entropy(logits)
    assert close(h[0, 0], math.log(4))  # uniform over 4
    p, q = 0.75, 0.25
    assert close(h[0, 1], -(p * math.log(p) + q * math.log(q)))


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert close(masked_sum(x, m), 1 + 2 + 4)
    assert close(masked_mean(x, m), (1 + 2 + 4) / 3)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(x, m, dim=0), torch.tensor([5.0, 2.0, 0.0]))
    # garbage (even inf / nan) under the mask has no effect
    y = x.clone()
    y[0, 2], y[1, 1], y[1, 2] = float("inf"), float("nan"), -7.0
    assert close(masked_mean(y, m), (1 + 2 + 4) / 3)
    # empty mask: 0, not nan
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, m)
    var = ((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3  # unbiased=False over the 3 valid entries
    expect = [(v - 2) / math.sqrt(var + 1e-8) for v in (1.0, 2.0, 3.0)]
    for i in range(3):
        assert close(w[0, i], expect[i])
    assert w[0, 3].item() == 0.0
    assert close(masked_mean(w, m), 0.0)
    assert close(masked_mean(w ** 2, m), 1.0, 1e-4)  # mean 0, std 1
    w2 = masked_whiten(x, m, shift_mean=False)
    for i in range(3):
        assert close(w2[0, i], expect[i] + 2.0)
    x2 = x.clone()
    x2[0, 3] = -5.0
    torch.testing.assert_close(masked_whiten(x2, m), w)


# --------------------------------------------------------------------------- SFT


def test_pairwise_loss_by_hand():
    rc = torch.tensor([2.0, 0.0])
    rr = torch.tensor([1.0, 0.5])
    loss, stats = pairwise_loss(rc, rr)
    assert close(loss, (-math.log(sig(1.0)) - math.log(sig(-0.5))) / 2)
    assert close(stats["accuracy"], 0.5)
    assert close(stats["margin"], (1.0 - 0.5) / 2)
    assert close(stats["reward_mean"], (2 + 0 + 1 + 0.5) / 4)
    # log(1 + exp(r_r - r_c)) form
    assert close(loss, (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2)
    loss_m, _ = pairwise_loss(rc, rr, margin=torch.tensor([1.0, 0.0]))
    assert close(loss_m, (-math.log(sig(0.0)) - math.log(sig(-0.5))) / 2)


def test_logexpwithlm_loss_by_hand():
    rc, rr = torch.tensor([1.0]), torch.tensor([3.0])
    lm = torch.tensor(2.5)
    loss, stats = logexpwithlm_loss(rc, rr, lm, lm_coef=0.1)
    assert close(loss, math.log1p(math.exp(3.0 - 1.0)) + 0.1 * 2.5)
    assert close(stats["lm_loss"], 2.5)
    assert close(stats["accuracy"], 0.0)


def test_pointwise_loss_by_hand():
    scores = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1, 1, 0])
    loss, stats = pointwise_loss(scores, labels)
    expect = (-math.log(sig(2.0)) - math.log(sig(-1.0)) - math.log(1 - sig(0.5))) / 3
    assert close(loss, expect)
    assert close(stats["accuracy"], 1 / 3)


# --------------------------------------------------------------------------- DPO

PC, PR, RC, RR = (torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]),
                  torch.tensor([-1.5, -2.5]), torch.tensor([-1.5, -2.0]))
# h = (pc - pr) - (rc - rr): row 0: 1 - 0 = 1; row 1: -1 - (-0.5) = -0.5


def test_dpo_sigmoid_by_hand():
    beta = 0.5
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=beta)
    assert close(loss, (-math.log(sig(0.5 * 1.0)) - math.log(sig(0.5 * -0.5))) / 2)
    # rewards/chosen = beta (pc - rc): row 0: 0.5*0.5, row 1: 0.5*(-0.5)
    assert close(stats["rewards/chosen"], (0.25 - 0.25) / 2)
    # rewards/rejected = beta (pr - rr): row 0: 0.5*(-0.5), row 1: 0
    assert close(stats["rewards/rejected"], (-0.25 + 0.0) / 2)
    assert close(stats["rewards/accuracy"], 0.5)
    assert close(stats["rewards/margin"], (0.5 * 1.0 + 0.5 * -0.5) / 2)


def test_dpo_label_smoothing_by_hand():
    beta, eps = 0.5, 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    rows = [-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)) for h in (1.0, -0.5)]
    assert close(loss, sum(rows) / 2)
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=beta)
    zero_eps, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=0.0)
    assert plain.item() == zero_eps.item()
    assert close(zero_eps, (-math.log(sig(beta * 1.0)) - math.log(sig(beta * -0.5))) / 2)


def test_dpo_ipo_by_hand():
    beta = 0.25  # target margin 1/(2 beta) = 2
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    assert close(loss, ((1.0 - 2.0) ** 2 + (-0.5 - 2.0) ** 2) / 2)


def test_dpo_beta_to_zero_gives_log2_and_vanishing_grad():
    pc = PC.clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, PR, RC, RR, beta=1e-8)
    assert close(loss, math.log(2))
    loss.backward()
    assert pc.grad.abs().max() < 1e-7


def test_dpo_validation():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
