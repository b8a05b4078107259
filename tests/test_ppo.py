"""PPO: rollout and training log-probs agree (ratio 1 on the first minibatch), group (GRPO /
RLOO) advantages in the buffer equal a hand computation, the buffer round-trips through disk,
and bad input fails before any work."""
import json
import math

import pytest
import torch

from llama_rlhf.records import write_json_atomic
from llama_rlhf.ppo.buffer import RolloutBuffer
from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.run import train_ppo
from tests.helpers import ROOT, ppo_checkpoints, torchrun


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return ppo_checkpoints(tmp_path_factory.mktemp("ppo"), n_prompts=8)


def _cfg(root, tp=1, **kw) -> PPOConfig:
    base = dict(actor_ckpt_dir=str(root / f"actor-tp{tp}"), actor_save_dir=str(root / "out-actor"),
                critic_ckpt_dir=str(root / f"critic-tp{tp}"), critic_save_dir=str(root / "out-critic"),
                reward_model_ckpt_dir=str(root / f"critic-tp{tp}"), train_file=str(root / "prompts.json"),
                reward="rm+rule", max_batch_size=4, max_buffer_size=4, max_rounds=1, max_new_tokens=12,
                actor_lr=1e-4, critic_lr=1e-4)
    return PPOConfig(**{**base, **kw})


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def test_first_minibatch_ratio_is_one(ckpts, tmp_path):
    stats = train_ppo(_cfg(ckpts, actor_save_dir=str(tmp_path / "a"), critic_save_dir=str(tmp_path / "c")))
    assert stats["first/ratio_max_abs_dev"] <= 1e-5
    assert (tmp_path / "a/round-1/consolidated.00.pth").exists()
    assert (tmp_path / "c/round-1/params.json").exists()
    rows = _metrics(tmp_path / "a/metrics.jsonl")
    assert {"reward/mean", "kl", "actor/clipfrac", "critic/explained_variance", "time/rollout"} <= rows[0].keys()


def _group_advantages(scores: list[float], k: int, estimator: str) -> list[float]:
    """By hand: GRPO (r - mean) / (population std + 1e-6), RLOO r - mean of the other k - 1."""
    out = []
    for g in range(0, len(scores), k):
        r = scores[g:g + k]
        mean = sum(r) / k
        if estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / k)
            out += [(x - mean) / (std + 1e-6) for x in r]
        else:
            out += [x - (sum(r) - x) / (k - 1) for x in r]
    return out


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_run_without_critic(ckpts, tmp_path, estimator):
    # rm+rule: the verifier's score makes the samples of a prompt differ, so the advantages are not all 0.
    k = 3
    stats = train_ppo(_cfg(ckpts, actor_save_dir=str(tmp_path / "a"), estimator=estimator, num_samples=k,
                           critic_ckpt_dir=None, reward="rm+rule", kl_in="loss", kl_estimator="k3",
                           save_buffer=True))
    assert stats["first/ratio_max_abs_dev"] <= 1e-5
    buf = RolloutBuffer.load(str(tmp_path / "a/buffer.00.pt"))
    n = len(buf)
    assert n == 4 * k and all(buf.prompts[i] == buf.prompts[i - i % k] for i in range(n))  # groups contiguous
    scores = buf.scores.tolist()
    assert all(len({round(x, 6) for x in scores[g:g + k]}) > 1 for g in range(0, n, k))
    # KL in the loss: a response's reward is its score alone.
    assert torch.allclose(buf.rewards.sum(1), buf.scores, atol=1e-6)
    expected = torch.zeros(n, buf.width())
    for i, a in enumerate(_group_advantages(scores, k, estimator)):
        p, r = len(buf.prompts[i]), len(buf.responses[i])
        expected[i, p - 1:p - 1 + r] = a  # the same advantage on every action token, 0 elsewhere
    assert buf.advantages.shape == expected.shape
    torch.testing.assert_close(buf.advantages.float(), expected, rtol=1e-4, atol=1e-5)


def test_ratio_is_one_at_tp2(ckpts, tmp_path):
    torchrun(ROOT / "ppo_train.py", "--actor_ckpt_dir", ckpts / "actor-tp2", "--actor_save_dir", tmp_path / "a",
             "--critic_ckpt_dir", ckpts / "critic-tp2", "--critic_save_dir", tmp_path / "c",
             "--reward_model_ckpt_dir", ckpts / "critic-tp2", "--train_file", ckpts / "prompts.json",
             "--max_batch_size", 4, "--max_buffer_size", 4, "--max_rounds", 1, "--max_new_tokens", 12)
    row = _metrics(tmp_path / "a/metrics.jsonl")[0]
    assert row["first/ratio_max_abs_dev"] <= 1e-5


def test_buffer_round_trips(tmp_path):
    buf = RolloutBuffer([[1, 5], [1, 6, 7]], [[8, 2], [9]], ["3", None], torch.tensor([True, False]),
                        [[-0.5, -1.0], [-2.0]], ["a", "b"], scores=torch.tensor([1.0, 0.0]))
    buf.save(str(tmp_path / "b.pt"))
    back = RolloutBuffer.load(str(tmp_path / "b.pt"))
    assert back.responses == buf.responses and torch.equal(back.scores, buf.scores)
    lp = back.generation_logprobs()
    assert lp.shape == (2, 3) and lp[0, 1].item() == -0.5 and lp[1, 2].item() == -2.0


def test_bad_input(ckpts, tmp_path):
    with pytest.raises(ValueError, match="max_buffer_size 2 x --num_samples 1 rollouts is smaller than --max_batch_size 4"):
        train_ppo(_cfg(ckpts, max_buffer_size=2))
    with pytest.raises(ValueError, match="--accumulation_steps must be >= 1, got 0"):
        train_ppo(_cfg(ckpts, accumulation_steps=0))
    write_json_atomic([{"question": "x"}], str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="instruction"):
        train_ppo(_cfg(ckpts, train_file=str(tmp_path / "bad.json")))
    write_json_atomic([{"instruction": "1 + 1 ="}], str(tmp_path / "nolabel.json"))
    with pytest.raises(ValueError, match="no 'label'"):
        train_ppo(_cfg(ckpts, train_file=str(tmp_path / "nolabel.json"), reward="rule"))
    with pytest.raises(ValueError, match="shards"):
        train_ppo(_cfg(ckpts, critic_ckpt_dir=str(ckpts / "critic-tp2")))
    with pytest.raises(ValueError, match="verifier checkpoint is expected"):
        train_ppo(_cfg(ckpts, critic_ckpt_dir=str(ckpts / "actor-tp1"), reward="rule"))


def test_nan_stops_like_the_trainer_and_resume_works(ckpts, tmp_path, monkeypatch):
    """A NaN loss in round 2 stops PPO with the trainer's TrainingError, through the same
    optimizer step: nothing stepped, round-1 (the last good checkpoint) untouched, and --resume
    from it runs on."""
    from llama_rlhf.ppo import trainer as ppo_trainer
    from llama_rlhf.trainers import TrainingError
    cfg = dict(actor_save_dir=str(tmp_path / "a"), critic_save_dir=str(tmp_path / "c"), max_rounds=3, save_rounds=1,
               max_buffer_size=2, max_batch_size=2)
    real = ppo_trainer.policy_loss

    def nan_in_round_2(*args, **kw):  # one minibatch per round: the second call is round 2
        calls.append(1)
        loss, stats = real(*args, **kw)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    calls: list = []
    monkeypatch.setattr(ppo_trainer, "policy_loss", nan_in_round_2)
    with pytest.raises(TrainingError, match=r"non-finite gradient norm.*round 2.*last good checkpoint: .*round-1"):
        train_ppo(_cfg(ckpts, **cfg))
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("round-")) == ["round-1"]
    before = torch.load(tmp_path / "a/round-1/consolidated.00.pth")
    monkeypatch.setattr(ppo_trainer, "policy_loss", real)
    stats = train_ppo(_cfg(ckpts, **cfg, resume=True))
    assert math.isfinite(stats["actor/pg_loss"])
    after = torch.load(tmp_path / "a/round-1/consolidated.00.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line)["step"] for line in open(tmp_path / "a/metrics.jsonl")]
    assert rows == [1, 2, 3]
    assert (tmp_path / "a/round-3").is_dir()
