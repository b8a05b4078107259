"""PPO: rollout and training log-probs agree (ratio 1 on the first minibatch), the
buffer round-trips through disk, and bad input fails before any work."""
import json

import pytest
import torch

from llama_rlhf.data.records import write_json_atomic
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


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_run_without_critic(ckpts, tmp_path, estimator):
    stats = train_ppo(_cfg(ckpts, actor_save_dir=str(tmp_path / "a"), estimator=estimator, num_samples=2,
                           critic_ckpt_dir=None, reward="rule", kl_in="loss", kl_estimator="k3"))
    assert stats["first/ratio_max_abs_dev"] <= 1e-5


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
