"""DPO: held-out chosen-over-rejected margin rises, the reference is scored once and cached,
ipo / label smoothing run, bad input fails early. (Loss formulas: tests/test_losses.py.)"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from llama_rlhf.checkpoint import CheckpointError, load_model
from llama_rlhf.data.pairs import load_pair_dataset
from llama_rlhf.scoring import action_logprobs, pair_batch
from llama_rlhf.tokenizers import load_tokenizer
from llama_rlhf.trainers import dpo
from llama_rlhf.trainers.dpo import DPOConfig, pair_logps, setup_dpo, sequence_logps
from tests.helpers import ROOT
from tests.test_verifier import QUIET, build_env


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return build_env(tmp_path_factory.mktemp("dpo"))


def _kw(env, tmp_path, **kw) -> dict:
    base = dict(ckpt_dir=str(env / "solver-tp1"), save_dir=str(tmp_path / "out"), train_file=str(env / "train.json"),
                label_file=str(env / "test.json"), max_batch_size=8, lr=1e-3, max_seq_len=128, **QUIET)
    return {**base, **kw}


def _plain_logps(model, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """Oracle: summed log p(response | prompt) per row from the model's full logits (forward,
    log_softmax, gather of the response tokens, masked sum), no project scoring code."""
    rows = [p + r for p, r in zip(prompts, responses)]
    T = max(map(len, rows))
    tokens = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: causal rows never see it
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True  # position j predicts token j + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).double(), dim=-1)[:, :-1]  # [B, T-1, V]
    picked = logp.gather(2, tokens[:, 1:, None])[..., 0]
    return (picked * mask).sum(1).float()


def test_sequence_logps_match_scoring_alignment(env):
    tok = load_tokenizer(str(env / "solver-tp1"))
    ds = load_pair_dataset(str(env / "test.json"), tok)
    model = load_model(str(env / "solver-tp1"))
    pairs = ds.pairs[:3]
    prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = pair_batch(prompts, responses, tok.pad_id)
    with torch.no_grad():
        ref = (action_logprobs(model, b) * b.action_mask).sum(1)
        ours = sequence_logps(model, ds.collate([0, 1, 2]))
    assert torch.allclose(ours, ref, atol=1e-4)
    oracle = _plain_logps(model, prompts, responses)
    assert oracle.abs().min() > 1.0  # real sums over several tokens, not zeros
    assert torch.allclose(ours, oracle, rtol=1e-5, atol=1e-4)


def test_dpo_raises_held_out_margin_with_a_cached_reference(env, tmp_path, monkeypatch):
    calls = []
    real = dpo._cached_reference_logps
    monkeypatch.setattr(dpo, "_cached_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = setup_dpo(DPOConfig(**_kw(env, tmp_path, epochs=2, beta=0.1, lr=3e-3)))
    before = trainer.run_eval()
    trainer.fit()
    after = trainer.eval_history[-1]
    assert len(calls) == 1  # once, before training; never during steps
    # Reference = initial policy: the first step sees h = 0 exactly (loss log 2, zero margin).
    first = trainer.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(first["rewards/margin"]) < 1e-5
    assert before["eval/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["eval/logp_margin"] > before["eval/logp_margin"] + 2  # measured: 7.5 -> 11.3
    assert after["eval/reward_accuracy"] > 0.9 and after["eval/reward_margin"] > 0.1
    rows = [json.loads(line) for line in open(tmp_path / "out/metrics.jsonl")]
    assert any({"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= r.keys() for r in rows)
    assert any("eval/logp_margin" in r for r in rows)
    # The cache holds the initial policy's log-probs and is what the steps used.
    initial = load_model(str(env / "solver-tp1"))
    fresh = pair_logps(initial, [trainer.dataset, trainer.held_out], 16)
    for cached, new in zip(trainer.reference_logps, fresh):
        assert torch.allclose(cached, new, atol=1e-4)
    # ... and equals the initial policy's log-probs computed by hand, pair by pair.
    for ds, cached in zip([trainer.dataset, trainer.held_out], trainer.reference_logps):
        prompts = [p.prompt for p in ds.pairs]
        chosen = _plain_logps(initial, prompts, [p.chosen for p in ds.pairs])
        rejected = _plain_logps(initial, prompts, [p.rejected for p in ds.pairs])
        assert torch.allclose(cached, torch.stack([chosen, rejected], 1), rtol=1e-5, atol=1e-4)
    saved = json.loads((tmp_path / "out/epoch-2/params.json").read_text())
    assert saved["reward_head"] == 0  # DPO checkpoints are solvers


@pytest.mark.parametrize("loss,smoothing,first_loss", [("ipo", 0.0, 25.0), ("sigmoid", 0.2, math.log(2))])
def test_ipo_and_label_smoothing_run(env, tmp_path, loss, smoothing, first_loss):
    # Every step's global batch is the whole train set (48 x 2 accumulation = 96 pairs), so
    # consecutive losses are comparable; LoRA adapters only.
    trainer = setup_dpo(DPOConfig(**_kw(env, tmp_path, loss=loss, label_smoothing=smoothing, beta=0.1, max_steps=2,
                              label_file=None, lora_rank=4, lr=3e-3, max_batch_size=48, accumulation_steps=2)))
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert losses[0] == pytest.approx(first_loss, rel=1e-4)  # ipo: (0 - 1/(2 beta))^2
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]


def test_reference_dir_and_bad_input(env, tmp_path):
    # An explicit reference equal to the initial policy gives the same cache.
    a = setup_dpo(DPOConfig(**_kw(env, tmp_path, max_steps=1, label_file=None)))
    b = setup_dpo(DPOConfig(**_kw(env, tmp_path, max_steps=1, label_file=None, reference_ckpt_dir=str(env / "solver-tp1"))))
    assert torch.allclose(a.reference_logps[0], b.reference_logps[0], atol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='sigmoid' only"):
        setup_dpo(DPOConfig(**_kw(env, tmp_path, loss="ipo", label_smoothing=0.1)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        setup_dpo(DPOConfig(**_kw(env, tmp_path, beta=0.0)))
    with pytest.raises(CheckpointError, match="is a verifier checkpoint"):
        setup_dpo(DPOConfig(**_kw(env, tmp_path, ckpt_dir=str(env / "verifier-tp1"))))
    with pytest.raises(ValueError, match="has 2 shards but --ckpt_dir has 1"):
        setup_dpo(DPOConfig(**_kw(env, tmp_path, reference_ckpt_dir=str(env / "solver-tp2"))))
    # The CLI wiring: bad input exits 2 with a one-line error.
    spec = importlib.util.spec_from_file_location("dpo_train", ROOT / "dpo_train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as e:
        cli.main(ckpt_dir=str(env / "solver-tp1"), save_dir=str(tmp_path / "c"), train_file=str(env / "train.json"),
                 loss="kto")
    assert e.value.code == 2
