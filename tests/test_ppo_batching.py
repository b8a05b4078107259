"""How PPO batches its rollouts. Packed rows (`scoring.packed_batch`: the samples of one prompt
share a row, the prompt once) against the oracle of each sequence alone through the model's
plain forward: action log-probs, entropies and critic values in the unpacked [S, T-1] layout,
and their gradients; the summed sequence log-probs of DPO and the verifier's LM term on the same
rows. Gradient accumulation (`--accumulation_steps`): micro-batches of any
size give the gradient of the whole step at once (the token mean over all its rows)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llama_rlhf.checkpoint import load_model
from llama_rlhf.models import build_model, preset_args
from llama_rlhf.ppo.buffer import RolloutBuffer
from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.trainer import PPOModels, PPOTrainer
from llama_rlhf.scoring import (action_logprobs, action_values, forward_hidden, packed_batch, prompt_rows,
                                sequence_logprobs)
from llama_rlhf.trainers.optim import build_optimizer
from tests.helpers import ppo_checkpoints

V = 50
PROMPTS = [[1, 5, 9, 4, 7], [1, 8, 3]]
# prompt 0 has three samples of different lengths, prompt 1 one sample, interleaved
SEQS = [(0, [11, 12, 2]), (1, [13, 14, 15, 16, 17, 18, 2]), (0, [19, 2]), (0, [21, 22, 23, 24, 2])]


def _alone(model, prompt: list[int], response: list[int]):
    """Oracle: the sequence alone, full logits, log_softmax / gather / entropy at its response."""
    tokens = torch.tensor([prompt + response])
    logp_all = torch.log_softmax(model(tokens).float(), dim=-1)[0, :-1]  # [T-1, V]
    j = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    logp = logp_all[j].gather(1, tokens[0, j + 1, None])[:, 0]
    ent = -(logp_all[j].exp() * logp_all[j]).sum(-1)
    values = model.values(model.hidden(tokens))[0, j]
    return j, logp, ent, values


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny"])
def test_packed_rows_score_as_each_sequence_alone(preset):
    extra = {"sliding_window": 6} if preset == "mistral-tiny" else {}  # the window cuts into the prompt
    model = build_model(preset_args(preset, vocab_size=V, reward_head=1, **extra), init_seed=5)
    prompts, responses = [PROMPTS[p] for p, _ in SEQS], [r for _, r in SEQS]
    rows = prompt_rows(prompts, responses, max_tokens=1024)
    assert rows == [[0, 2, 3], [1]]
    batch = packed_batch(prompts, responses, rows, pad_id=0)
    assert batch.tokens.shape[0] == 2 and batch.n_tokens == 5 + 3 + 2 + 5 + 3 + 7

    logps, ents = action_logprobs(model, batch, with_entropy=True)
    values = action_values(model, batch)
    assert logps.shape == (4, 3 + 7 - 1) == values.shape
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    ((logps + 0.3 * ents) * weights).sum().add(values.sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = 0.0
    for s, (p, r) in enumerate(SEQS):
        j, logp, ent, val = _alone(model, PROMPTS[p], r)
        off = torch.ones(logps.shape[1], dtype=torch.bool)
        off[j] = False
        torch.testing.assert_close(logps[s, j].detach(), logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ents[s, j].detach(), ent.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[s, j].detach(), val.detach(), rtol=1e-5, atol=1e-5)
        assert (logps[s, off] == 0).all() and (values[s, off] == 0).all()
        total = total + ((logp + 0.3 * ent) * weights[s, j]).sum() + val.sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_sequence_logprobs_of_packed_rows_sum_each_sequence_alone():
    """DPO's `sequence_logps` and the verifier's `chosen_lm_nll` sum these; a response that
    follows another in its row is predicted from the prompt, not from the other's end."""
    model = build_model(preset_args("llama-tiny", vocab_size=V, reward_head=1), init_seed=3)
    prompts, responses = [PROMPTS[p] for p, _ in SEQS], [r for _, r in SEQS]
    batch = packed_batch(prompts, responses, prompt_rows(prompts, responses, 1024), pad_id=0)
    with torch.no_grad():
        h = forward_hidden(model, batch)
        sums, counts = sequence_logprobs(model, h, batch)
        first3, counts3 = sequence_logprobs(model, h, batch, n=3)
        alone = torch.stack([_alone(model, PROMPTS[p], r)[1].sum() for p, r in SEQS])
    assert counts.tolist() == [len(r) for _, r in SEQS]
    assert alone.abs().min() > 1.0  # sums over several tokens, not zeros
    torch.testing.assert_close(sums, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first3, alone[:3], rtol=1e-5, atol=1e-5)
    assert counts3.tolist() == counts[:3].tolist()


def test_rows_close_at_the_token_limit_and_the_buffer_packs_shared_prompts():
    prompts, responses = [PROMPTS[p] for p, _ in SEQS], [r for _, r in SEQS]
    # prompt 0 (5 tokens) + 3 + 2 fit in 10; the third sample opens a second row of prompt 0
    assert prompt_rows(prompts, responses, max_tokens=10) == [[0, 2], [3], [1]]
    buf = RolloutBuffer(prompts, responses, [None] * 4, torch.ones(4, dtype=torch.bool), [[0.0]] * 4)
    assert buf.batch([0, 2, 3], pad_id=0).tokens.shape[0] == 1  # one prompt, three samples: one row
    unpacked = buf.batch([0, 1], pad_id=0)  # no shared prompt: plain rows
    assert unpacked.positions is None and unpacked.tokens.shape[0] == 2
    assert torch.equal(buf.batch([0, 1, 2, 3], 0).action_mask, unpacked.action_mask.new_tensor(
        [[j >= len(prompts[s]) - 1 and j < len(prompts[s]) + len(responses[s]) - 1 for j in range(9)]
         for s in range(4)]))


def _buffer(vocab: int, k: int = 2, n_prompts: int = 4) -> RolloutBuffer:
    """k samples of varied length per prompt, with made-up old / reference log-probs and
    advantages (some ratios clip: the same for every layout)."""
    g = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for p in range(n_prompts):
        prompt = torch.randint(3, vocab, (3 + 2 * p,), generator=g).tolist()
        for s in range(k):
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (2 + (5 * p + 3 * s) % 9,), generator=g).tolist())
    n = len(prompts)
    buf = RolloutBuffer(prompts, responses, [None] * n, torch.ones(n, dtype=torch.bool), [[0.0]] * n)
    mask = buf.batch(list(range(n)), 0).action_mask
    buf.logprobs = buf.generation_logprobs() - mask * torch.rand(mask.shape, generator=g)
    buf.ref_logprobs = buf.logprobs - mask * 0.2 * torch.randn(mask.shape, generator=g)
    buf.advantages = mask * torch.randn(mask.shape, generator=g)
    return buf


@pytest.mark.parametrize("micro,accum", [(2, 4), (3, 3)])
def test_accumulated_micro_batches_give_the_step_of_the_whole_batch(tmp_path, micro, accum):
    root = ppo_checkpoints(tmp_path, n_prompts=4)
    buf = _buffer(load_model(str(root / "actor-tp1"), role="solver").args.vocab_size)

    def one_step(max_batch_size: int, accumulation_steps: int):
        cfg = PPOConfig(actor_ckpt_dir=str(root / "actor-tp1"), actor_save_dir=str(tmp_path / "a"),
                        train_file=str(root / "prompts.json"), estimator="grpo", num_samples=2,
                        kl_in="loss", kl_estimator="k3", kl_coef=0.1, actor_lr=1e-3,
                        max_batch_size=max_batch_size, accumulation_steps=accumulation_steps)
        actor = load_model(str(root / "actor-tp1"), role="solver")
        opt = build_optimizer(list(actor.parameters()), cfg.actor_lr, 0.0)
        trainer = PPOTrainer(cfg, PPOModels(actor, None, None, None, opt, None, offload=False),
                             SimpleNamespace(pad_id=0))
        grads, step = {}, trainer._step

        def keep_grads(model, optimizer, replicas):  # the step's summed gradient, before AdamW
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
            return step(model, optimizer, replicas)
        trainer._step = keep_grads
        return grads, trainer.train_actor(buf)

    whole, whole_stats = one_step(8, 1)  # all 8 rollouts in one forward / backward
    acc, acc_stats = one_step(micro, accum)  # the same step in micro-batches (3, 3, 2 for micro 3)
    assert whole_stats["actor/grad_norm"] > 0
    assert acc_stats["actor/grad_norm"] == pytest.approx(whole_stats["actor/grad_norm"], rel=1e-5)
    for n, g in whole.items():
        assert (acc[n] - g).norm() <= 1e-5 * g.norm(), n
