"""The SFT loss's hand-written backward (`_LinearCrossEntropy`: chunked, gradients formed in the
forward) against autograd of the plain loss F.cross_entropy(h @ W.T, y, reduction="sum"): the
loss and both gradients, in fp32 and in its bf16 branch, over several chunks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama_rlhf.trainers.sft import _LinearCrossEntropy, linear_cross_entropy

N, D, V, CHUNK = 37, 24, 61, 8  # 5 chunks, the last one partial
UPSTREAM = 0.37  # a loss scale (1 / tokens) as the trainer applies it: backward must honour it


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5  # logits of a few units: a peaked, not one-hot, softmax
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


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
    out = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        out.weight.copy_(w)
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
    out = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        out.weight.copy_(w)
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
