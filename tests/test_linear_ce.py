"""The one log-prob path (scoring.py) against autograd of the plain [N, V] computation. The SFT
loss's hand-written backward (`_LinearCrossEntropy`: chunked, gradients formed in the forward)
against F.cross_entropy(h @ W.T, y, reduction="sum"): the loss and both gradients, in fp32 and in
its bf16 branch, over several chunks; PPO's per-token log-probs and entropies; action positions."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama_rlhf.scoring import _LinearCrossEntropy, linear_cross_entropy

N, D, V, CHUNK = 37, 24, 61, 8  # 5 chunks, the last one partial
UPSTREAM = 0.37  # a loss scale (1 / tokens) as the trainer applies it: backward must honour it


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5  # logits of a few units: a peaked, not one-hot, softmax
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def _projection(w: torch.Tensor) -> nn.Linear:
    """The bias-free output layer (TP = 1) holding `w`: the fused path's input."""
    out = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        out.weight.copy_(w)
    return out


def _oracle(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dL/dh, dL/dW) of UPSTREAM * the plain summed cross-entropy, by autograd in fp32."""
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), y, reduction="sum")
    (loss * UPSTREAM).backward()
    return loss.detach(), h.grad, w.grad


def _ours(fn, h: torch.Tensor, w: torch.Tensor, need_h: bool = True, need_w: bool = True):
    h, w = h.detach().clone().requires_grad_(need_h), w.detach().clone().requires_grad_(need_w)
    loss = fn(h, w)
    (loss * UPSTREAM).backward()
    return loss.detach(), h.grad, w.grad


def test_fp32_matches_autograd():
    h, w, y = _inputs()
    ref_loss, ref_gh, ref_gw = _oracle(h, w, y)
    loss, gh, gw = _ours(lambda a, b: _LinearCrossEntropy.apply(a, b, y, CHUNK, torch.float32), h, w)
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)
    assert ref_gh.abs().max() > 0.1 and ref_gw.abs().max() > 0.1  # the comparison is not of zeros


@pytest.mark.parametrize("need_h,need_w", [(True, False), (False, True)])
def test_fp32_one_gradient_only(need_h, need_w):
    # Frozen output layer (LoRA) or frozen input: the other gradient alone, still exact.
    h, w, y = _inputs(1)
    ref_loss, ref_gh, ref_gw = _oracle(h, w, y)
    loss, gh, gw = _ours(lambda a, b: _LinearCrossEntropy.apply(a, b, y, CHUNK, torch.float32), h, w, need_h, need_w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert (gh is None) != need_h and (gw is None) != need_w
    if need_h:
        torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)


def test_public_function_at_tp1_is_the_fused_path():
    # linear_cross_entropy on a bias-free nn.Linear goes through _LinearCrossEntropy, same numbers.
    h, w, y = _inputs(2)
    out = _projection(w)
    ref_loss, ref_gh, ref_gw = _oracle(h, w, y)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, out, y, chunk=CHUNK)
    assert loss.grad_fn is not None and "LinearCrossEntropy" in type(loss.grad_fn).__name__
    (loss * UPSTREAM).backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hh.grad, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weight.grad, ref_gw, rtol=1e-5, atol=1e-5)


def _assert_bf16_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); allow a few roundings' worth of the
    # tensor's scale, far below the error of a wrong softmax, onehot or scale (all O(scale)).
    scale = ref.abs().max().item()
    err = (ours.float() - ref).abs().max().item()
    assert err <= 0.03 * scale, f"max abs error {err:.4g} vs scale {scale:.4g}"


def test_bf16_under_autocast_matches_fp32_oracle():
    h, w, y = _inputs(3)
    out = _projection(w)
    ref_loss, ref_gh, ref_gw = _oracle(h, w, y)
    hh = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hh, out, y, chunk=CHUNK)
    (loss * UPSTREAM).backward()
    assert loss.dtype == torch.float32  # the loss itself is accumulated in fp32
    assert hh.grad.dtype == torch.float32 and out.weight.grad.dtype == torch.float32  # the inputs' dtypes
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=2e-3, atol=0.0)
    _assert_bf16_close(hh.grad, ref_gh)
    _assert_bf16_close(out.weight.grad, ref_gw)
    # bf16 really ran: the fp32 result differs from it by more than fp32 rounding.
    assert (hh.grad - ref_gh).abs().max() > 1e-4


def test_bf16_hidden_states_matches_fp32_oracle():
    # As in training under autocast: bf16 hidden states, an fp32 master weight.
    h, w, y = _inputs(4)
    hb = h.to(torch.bfloat16)
    ref_loss, ref_gh, ref_gw = _oracle(hb, w, y)  # same (rounded) inputs, fp32 math
    loss, gh, gw = _ours(lambda a, b: _LinearCrossEntropy.apply(a, b, y, CHUNK, torch.bfloat16), hb, w)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0.0)
    _assert_bf16_close(gh, ref_gh)
    _assert_bf16_close(gw, ref_gw)


def test_linear_logprobs_and_entropy_match_autograd_of_log_softmax():
    """PPO's per-token path: log-probs and entropies, and the gradient of any weighting of both
    (advantages on one, an entropy bonus on the other), against the plain [N, V] computation."""
    from llama_rlhf.scoring import linear_logprobs
    h, w, y = _inputs(1)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    out = _projection(w)
    hh = h.clone().requires_grad_()
    lp, ent = linear_logprobs(hh, out, y, chunk=CHUNK)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp_all = torch.log_softmax(h2 @ w2.t(), dim=-1)
    lp2 = logp_all.gather(1, y[:, None])[:, 0]
    ent2 = -(logp_all.exp() * logp_all).sum(-1)
    ((lp2 * g_lp).sum() + (ent2 * g_ent).sum()).backward()
    torch.testing.assert_close(lp, lp2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.weight.grad, w2.grad, rtol=1e-4, atol=1e-5)
    assert ent2.mean() > 1.0 and h2.grad.abs().max() > 1e-2  # a real distribution, a real gradient

    # Log-probs alone (no entropy bonus: its upstream gradient is None), as PPO's usual loss.
    hh.grad = out.weight.grad = h2.grad = w2.grad = None
    (linear_logprobs(hh, out, y, chunk=CHUNK)[0] * g_lp).sum().backward()
    (torch.log_softmax(h2 @ w2.t(), dim=-1).gather(1, y[:, None])[:, 0] * g_lp).sum().backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.weight.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_action_logprobs_match_a_full_forward():
    """`scoring.action_logprobs` (only action positions projected) against the model's full
    logits: log_softmax, gather of the next token, at the action positions; 0 elsewhere."""
    from llama_rlhf.models import build_model, preset_args
    from llama_rlhf.scoring import action_logprobs, pair_batch
    model = build_model(preset_args("llama-tiny", vocab_size=V), init_seed=3)
    batch = pair_batch([[1, 5, 9, 4], [1, 7]], [[11, 12, 2], [13, 14, 15, 16, 2]], pad_id=0)
    logps, ents = action_logprobs(model, batch, with_entropy=True)
    with torch.no_grad():
        logp_all = torch.log_softmax(model(batch.tokens).float(), dim=-1)[:, :-1]  # [B, T-1, V]
    want = logp_all.gather(2, batch.tokens[:, 1:, None])[..., 0] * batch.action_mask
    want_ent = -(logp_all.exp() * logp_all).sum(-1) * batch.action_mask
    torch.testing.assert_close(logps.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ents.detach(), want_ent, rtol=1e-5, atol=1e-5)
    assert (logps[~batch.action_mask] == 0).all() and logps[batch.action_mask].lt(0).all()
