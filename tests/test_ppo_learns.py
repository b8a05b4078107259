"""Rule-reward PPO raises held-out accuracy over the SFT model it starts from.

A small arithmetic task: "Ann has 3 bags with 4 plums each. How many plums does Ann have?"
The SFT data multiplies only 30% of the time and adds the two numbers otherwise (a classic
wrong-operation slip), so the SFT model samples the right solution often but its greedy answer
is mostly wrong. Only the reward (GSM8K answer correctness against the label) says which
operation is right: PPO has to find it, and it has to carry over to held-out sentences.
"""
import random

import pytest
import torch

from llama_rlhf.checkpoint import save_meta
from llama_rlhf.records import write_json_atomic
from llama_rlhf.models import ModelArgs, build_model
from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.run import heldout_accuracy, train_ppo
from llama_rlhf.tokenizers import load_tokenizer, train_sentencepiece

CORRECT_SHARE = 0.3
NAMES = ["Ann", "Tom", "Sam", "Mia", "Max", "Eve", "Bob", "Zoe"]
ITEMS = [("plums", "bags"), ("pens", "packs"), ("coins", "jars"), ("books", "boxes"), ("nuts", "cups")]
NUMBERS = range(2, 7)


def _records(rows: list[tuple], rng: random.Random | None) -> list[dict]:
    out = []
    for name, (item, box), a, b in rows:
        right = rng is None or rng.random() < CORRECT_SHARE
        step = f"{a} * {b} = {a * b}" if right else f"{a} + {b} = {a + b}"
        out.append({"instruction": f"{name} has {a} {box} with {b} {item} each. How many {item} does {name} have?",
                    "output": [f"{step} {item}. Therefore, the answer is {a * b if right else a + b}."],
                    "label": str(a * b)})
    return out


@pytest.fixture(scope="module")
def sft_actor(tmp_path_factory):
    from llama_rlhf.trainers.sft import SFTConfig, setup_sft
    root = tmp_path_factory.mktemp("ppo-learns")
    rng = random.Random(0)
    rows = [(n, i, a, b) for n in NAMES for i in ITEMS for a in NUMBERS for b in NUMBERS]
    rng.shuffle(rows)
    train, test = _records(rows[:800], rng), _records(rows[800:], None)
    write_json_atomic(train, str(root / "train.json"))
    write_json_atomic(test, str(root / "test.json"))
    sp = train_sentencepiece([r["instruction"] + "\n" + r["output"][0] for r in train], str(root / "sp"), 420)
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                     vocab_size=load_tokenizer(sp).vocab_size, max_seq_len=64)
    save_meta(build_model(args, init_seed=0).state_dict(), args, str(root / "init"), n=1, tokenizer_path=sp)
    sft = setup_sft(SFTConfig(ckpt_dir=str(root / "init"), save_dir=str(root / "sft"), train_file=str(root / "train.json"),
                    max_batch_size=32, lr=3e-3, warmup_steps=10, max_steps=250, epochs=10, max_seq_len=64,
                    seed=0, progress=False, log_steps=50))
    return root, sft.fit()


def _ppo(root, actor_dir, save_dir, **kw) -> PPOConfig:
    base = dict(actor_ckpt_dir=actor_dir, actor_save_dir=str(save_dir), train_file=str(root / "train.json"),
                label_file=str(root / "test.json"), reward="rule", estimator="grpo", num_samples=4,
                max_buffer_size=16, max_batch_size=32, rollout_batch_size=64, max_new_tokens=24, t=1.0,
                actor_lr=3e-4, kl_coef=0.0, max_rounds=12, seed=0, log_samples=0, eval_max_batch_size=200)
    return PPOConfig(**{**base, **kw})


def test_rule_reward_ppo_beats_its_sft_start(sft_actor, tmp_path):
    from llama_rlhf.checkpoint import load_model
    root, sft_dir = sft_actor
    cfg = _ppo(root, sft_dir, tmp_path / "ppo")
    actor = load_model(sft_dir, role="solver")
    before = heldout_accuracy(cfg, actor, load_tokenizer(sft_dir))
    stats = train_ppo(cfg)
    after = stats["heldout_accuracy"]
    # The SFT model mostly gives the wrong code; PPO must flip it on sentences it never saw.
    assert before < 0.5, before
    assert after >= before + 0.3, f"held-out accuracy {before:.3f} after SFT, {after:.3f} after PPO"
    assert stats["reward/mean"] > CORRECT_SHARE + 0.2, stats["reward/mean"]
