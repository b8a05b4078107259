"""Verifier: TP=1 == TP=2 scores and training, packing == no packing, learning a held-out
preference, bad input, make_pairs and the best-of-N report."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from llama_rlhf.checkpoint import CheckpointError, load_model, save_meta
from llama_rlhf.data.pairs import DataError, PairDataset, load_pair_dataset, make_pairs, slip_solution
from llama_rlhf.records import write_json_atomic
from llama_rlhf.data.synthetic import make_splits
from llama_rlhf.errors import UsageError
from llama_rlhf.evaluation.best_of_n import best_of_n_report, rerank_with_verifier, score_samples
from llama_rlhf.models import attach_reward_head, build_model, preset_args
from llama_rlhf.scoring import pair_batch, sequence_scores
from llama_rlhf.tasks.gsm8k import grade
from llama_rlhf.tokenizers import load_tokenizer
from llama_rlhf.trainers.verifier import (
    VerifierConfig,
    score_dataset, setup_verifier, verifier_objective,
)
from tests.fakes import tiny_sentencepiece
from tests.helpers import ROOT, run_script, torchrun

QUIET = dict(progress=False, peak_flops=1e12, log_steps=1000)


def synthetic_pairs(problems: list[dict], seed: int) -> list[dict]:
    """chosen = the correct solution; rejected = the same solution ending on a wrong final
    number (a three-digit one: the problems' answers are < 100, so a tiny model can tell)."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        good = p["output"][0]
        bad = re.sub(r"the answer is \d+\.", f"the answer is {int(p['label']) + rng.randint(100, 800)}.", good)
        assert bad != good
        out.append({"instruction": p["instruction"], "chosen": [good], "rejected": [bad]})
    return out


def build_env(root: Path) -> Path:
    """Tokenizer, a solver and a verifier (TP 1 and 2), and synthetic train / held-out pairs."""
    sp = tiny_sentencepiece(root)
    tok = load_tokenizer(sp)
    args = preset_args("llama-tiny", vocab_size=tok.vocab_size)
    model = build_model(args, init_seed=0)
    for n in (1, 2):
        save_meta(model.state_dict(), args, str(root / f"solver-tp{n}"), n=n, tokenizer_path=sp)
    attach_reward_head(model, seed=7)
    for n in (1, 2):
        save_meta(model.state_dict(), model.args, str(root / f"verifier-tp{n}"), n=n, tokenizer_path=sp)
    train, test = make_splits(96, 48, seed=1, steps=1)
    write_json_atomic(synthetic_pairs(train, 0), root / "train.json")
    write_json_atomic(synthetic_pairs(test, 1), root / "test.json")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return build_env(tmp_path_factory.mktemp("verifier"))


def _tok(env):
    return load_tokenizer(str(env / "solver-tp1"))


# ----------------------------------------------------------------------------- heads & TP

def test_attach_reward_head_is_seeded_and_marks_a_verifier(env):
    a = load_model(str(env / "solver-tp1"), role="solver")
    b = load_model(str(env / "solver-tp1"), role="solver")
    attach_reward_head(a, 3), attach_reward_head(b, 3)
    assert a.args.reward_head == 1 and torch.equal(a.reward_head.weight, b.reward_head.weight)
    assert torch.all(a.reward_head.bias == 0)
    std = a.reward_head.weight.std().item()
    assert 0.5 / math.sqrt(a.args.dim) < std < 2 / math.sqrt(a.args.dim)
    with pytest.raises(ValueError, match="already has a reward head"):
        attach_reward_head(a, 3)


def test_tp1_equals_tp2_scores_and_training(env):
    records = json.loads((env / "test.json").read_text())[:5]
    samples = {"instructions": [r["instruction"] for r in records],
               "samples": [r["chosen"] + r["rejected"] + ["x"] for r in records]}
    (env / "samples.json").write_text(json.dumps(samples))
    kw = dict(train_file=str(env / "train.json"), label_file=str(env / "test.json"), max_batch_size=4,
              max_steps=3, lr=1e-3, packing=True, loss="logexpwithlm", lm_coef=0.5, max_seq_len=128, **QUIET)
    (env / "train_kwargs.json").write_text(json.dumps(kw))
    torchrun(ROOT / "tests/dist/verifier_worker.py", str(env), str(env / "tp2.pt"), nproc=2)
    tp2 = torch.load(env / "tp2.pt")

    tok = _tok(env)
    verifier = load_model(str(env / "verifier-tp1"), role="verifier")
    for reduce in ("last", "mean"):
        tp1 = score_samples(verifier, tok, samples["instructions"], samples["samples"], 4, reduce)
        assert torch.allclose(torch.tensor(tp1), torch.tensor(tp2[f"scores_{reduce}"]), atol=1e-5), reduce
    trainer = setup_verifier(VerifierConfig(**kw, ckpt_dir=str(env / "solver-tp1"), save_dir=str(env / "out-tp1")))
    trainer.fit()
    assert torch.allclose(torch.tensor([h["loss"] for h in trainer.history]), torch.tensor(tp2["loss"]), atol=1e-4)
    # Shift-invariant metrics only: a pairwise loss gives the head's bias a zero gradient, so
    # AdamW turns float noise (different at TP=1 and TP=2) into a small common offset.
    for k in ("eval/accuracy", "eval/margin", "eval/reward_std"):
        assert tp2["eval"][k] == pytest.approx(trainer.eval_history[-1][k], abs=1e-4), k
    for out in ("out-tp1", "out-tp2"):
        assert json.loads((env / out / "step-3/params.json").read_text())["reward_head"] == 1
    assert len(list((env / "out-tp2/step-3").glob("consolidated.*.pth"))) == 2


# ----------------------------------------------------------------------------- scoring & packing

def test_packed_pairs_equal_unpacked(env):
    tok = _tok(env)
    ds = load_pair_dataset(str(env / "test.json"), tok)
    model = load_model(str(env / "verifier-tp1"), role="verifier")
    idx = [0, 3, 5, 7]
    flat, packed = ds.collate(idx, 0, packing=False), ds.collate(idx, 0, packing=True)
    assert packed.tokens.shape[0] == 4 and flat.tokens.shape[0] == 8
    pairs = [ds.pairs[i] for i in idx]
    ref = pair_batch([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                     tok.pad_id)
    for reduce in ("last", "mean"):
        with torch.no_grad():
            a, b = sequence_scores(model, flat, reduce), sequence_scores(model, packed, reduce)
            assert torch.allclose(a, sequence_scores(model, ref, reduce), atol=1e-6)
        assert torch.allclose(a, b, atol=1e-5), reduce
    # Loss and gradients of every objective agree as well.
    for loss in ("logexpwithlm", "pointwise"):
        obj = verifier_objective(loss, lm_coef=0.3 if loss == "logexpwithlm" else 0.0)
        grads = []
        for batch in (flat, packed):
            model.zero_grad()
            value, n, _ = obj(model, batch)
            value.backward()
            grads.append((value.detach(), n, torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                                                for p in model.parameters()])))
        assert grads[0][1] == grads[1][1]
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
        assert torch.allclose(grads[0][2], grads[1][2], atol=1e-5)


# ----------------------------------------------------------------------------- learning

def test_verifier_learns_held_out_preference(env, tmp_path):
    trainer = setup_verifier(VerifierConfig(ckpt_dir=str(env / "solver-tp1"), save_dir=str(tmp_path / "v"),
                             train_file=str(env / "train.json"), label_file=str(env / "test.json"),
                             max_batch_size=16, epochs=2, lr=1e-3, warmup_steps=2, max_seq_len=128, **QUIET))
    before = trainer.run_eval()
    last = trainer.fit()
    after = trainer.eval_history[-1]
    assert before["eval/accuracy"] < 0.7
    assert after["eval/accuracy"] > 0.85 and after["eval/margin"] > before["eval/margin"] + 0.5
    rows = [json.loads(line) for line in open(tmp_path / "v/metrics.jsonl")]
    assert any("eval/accuracy" in r for r in rows) and any("accuracy" in r and "loss" in r for r in rows)
    # The saved checkpoint is a verifier and scores like the trained model.
    saved = load_model(last, role="verifier")
    ds = trainer.held_out
    assert torch.allclose(torch.tensor(score_dataset(saved, ds, 16)), torch.tensor(score_dataset(trainer.model, ds, 16)),
                          atol=1e-5)


def test_lora_verifier_resumes_with_its_head(env, tmp_path):
    kw = dict(ckpt_dir=str(env / "solver-tp1"), train_file=str(env / "train.json"), label_file=str(env / "test.json"),
              max_batch_size=4, lr=1e-2, lora_rank=4, schedule="constant", max_seq_len=128, **QUIET)
    straight = setup_verifier(VerifierConfig(save_dir=str(tmp_path / "a"), max_steps=3, **kw))
    straight.fit()
    assert straight.model.reward_head.weight.requires_grad
    setup_verifier(VerifierConfig(save_dir=str(tmp_path / "b"), max_steps=2, **kw)).fit()
    resumed = setup_verifier(VerifierConfig(save_dir=str(tmp_path / "b"), max_steps=3, resume=True, **kw))
    resumed.fit()
    assert resumed.eval_history[-1]["eval/margin"] == pytest.approx(straight.eval_history[-1]["eval/margin"], abs=1e-5)
    assert torch.allclose(resumed.model.reward_head.weight, straight.model.reward_head.weight, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def test_empty_chosen_or_rejected_is_an_error_naming_file_and_record(env, tmp_path):
    tok = _tok(env)
    for key in ("chosen", "rejected"):
        rec = {"instruction": "q", "chosen": ["a"], "rejected": ["b"]}
        rec[key] = []
        path = tmp_path / f"{key}.json"
        write_json_atomic([{"instruction": "q", "chosen": "a", "rejected": "b"}, rec], path)
        with pytest.raises(DataError, match=rf"{key}\.json: record 1: '{key}' is empty"):
            load_pair_dataset(str(path), tok)


def test_identical_chosen_and_rejected_are_skipped_and_counted(env):
    tok = _tok(env)
    ds = PairDataset([{"instruction": "q", "chosen": ["a", "b"], "rejected": ["a", "c"]},
                      {"instruction": "r", "chosen": "same", "rejected": "same"}], tok)
    assert ds.n_identical == 2 and ds.n_empty_records == 1 and len(ds) == 3  # (a,c) (b,a) (b,c)
    with pytest.raises(DataError, match="no usable pairs"):
        PairDataset([{"instruction": "r", "chosen": "same", "rejected": "same"}], tok)


def test_wrong_checkpoint_kind_is_a_clear_error(env, tmp_path):
    with pytest.raises(CheckpointError, match="is a verifier checkpoint.*solver checkpoint is expected"):
        setup_verifier(VerifierConfig(ckpt_dir=str(env / "verifier-tp1"), save_dir=str(tmp_path / "x"),
                       train_file=str(env / "train.json"), **QUIET))
    with pytest.raises(CheckpointError, match="is a solver checkpoint.*verifier checkpoint is expected"):
        rerank_with_verifier(str(env / "solver-tp1"), [{"instruction": "q", "label": "1", "outputs": ["1"]}])
    with pytest.raises(ValueError, match="no reward head"):
        score_samples(load_model(str(env / "solver-tp1")), _tok(env), ["q"], [["a"]])
    proc = run_script("verifier_train.py", "--ckpt_dir", env / "verifier-tp1", "--save_dir", tmp_path / "y",
                      "--train_file", env / "train.json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a verifier checkpoint" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- make_pairs & best-of-N

RESULTS = {"accuracy": 0.0, "items": [
    {"instruction": "Q1", "label": "5", "outputs": ["so the answer is 5.", "the answer is 6.", "the answer is 5.",
                                                    "the answer is 5.", "#### 7"]},
    {"instruction": "Q2", "label": "3", "outputs": ["the answer is 3.", "3"]},
    {"instruction": "Q3", "label": "1,000", "outputs": ["the answer is 9.", "the answer is 8."]},
    {"instruction": "Q4", "label": "1,000", "outputs": ["the answer is 1000.", "the answer is 10."]},
]}


def test_make_pairs_from_results(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(RESULTS))
    stats = make_pairs(str(src), str(tmp_path / "pairs.json"), max_pairs_per_question=3)
    assert stats == {"questions": 4, "pairs": 4, "used_questions": 2, "all_correct": 1, "all_wrong": 1}
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    q1 = [(p["chosen"][0], p["rejected"][0]) for p in pairs if p["instruction"] == "Q1"]
    # distinct correct {"so the answer is 5.", "the answer is 5."} x wrong {"... 6.", "#### 7"}: 3 of 4, spread
    assert len(q1) == 3 and len({c for c, _ in q1}) == 2 and len({r for _, r in q1}) == 2
    assert [(p["chosen"], p["rejected"]) for p in pairs if p["instruction"] == "Q4"] == \
        [(["the answer is 1000."], ["the answer is 10."])]
    spec = importlib.util.spec_from_file_location("make_pairs_cli", ROOT / "dataset/make_pairs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(results=str(src), dst=str(tmp_path / "cli.json"))
    assert len(json.loads((tmp_path / "cli.json").read_text())) == 5  # default max_pairs_per_question 4
    (tmp_path / "none.json").write_text(json.dumps({"items": RESULTS["items"][1:3]}))
    with pytest.raises(DataError, match="no question has both"):
        make_pairs(str(tmp_path / "none.json"), str(tmp_path / "p.json"))


class _FixedDraws:
    """An rng stub: step `index` slips, by `delta`."""

    def __init__(self, index: int, delta: int):
        self.index, self.delta = index, delta

    def randrange(self, n: int) -> int:
        return self.index

    def choice(self, options: list) -> int:
        assert self.delta in options
        return self.delta


def test_slip_solution_carries_one_wrong_sum_through():
    synthetic = "He buys 5 more, so 11 + 5 = 16 coins. The coins triple, so 16 * 3 = 48 coins. Therefore, the answer is 48."
    assert slip_solution(synthetic, _FixedDraws(0, 3)) == \
        "He buys 5 more, so 11 + 5 = 19 coins. The coins triple, so 19 * 3 = 57 coins. Therefore, the answer is 57."
    assert slip_solution(synthetic, _FixedDraws(1, -2)) == \
        "He buys 5 more, so 11 + 5 = 16 coins. The coins triple, so 16 * 3 = 46 coins. Therefore, the answer is 46."
    gsm8k = "She sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert slip_solution(gsm8k, _FixedDraws(0, 6)) == \
        "She sold 48/2 = <<48/2=30>>30 clips in May.\nShe sold 48+30 = <<48+30=78>>78 clips.\n#### 78"
    assert slip_solution("no arithmetic here", _FixedDraws(0, 1)) is None


def test_slipped_pairs_have_exactly_one_wrong_step(tmp_path):
    train, _ = make_splits(60, 1, seed=4)
    write_json_atomic(train, tmp_path / "train.json")
    src = tmp_path / "results.json"
    src.write_text(json.dumps(RESULTS))
    stats = make_pairs(str(src), str(tmp_path / "pairs.json"), gold_file=str(tmp_path / "train.json"),
                       slipped=50, seed=1)
    assert stats["pairs"] == 5 and stats["slipped_pairs"] == 50
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    labels = {r["instruction"]: r["label"] for r in train}
    slipped = [p for p in pairs if p["instruction"] in labels]
    assert len(slipped) == 50 and len(pairs) == 55
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for p in slipped:
        (gold,), (bad,) = p["chosen"], p["rejected"]
        assert grade(gold, labels[p["instruction"]]) and not grade(bad, labels[p["instruction"]])
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (-?\d+)", bad)
        wrong = [ops[op](int(a), int(b)) != int(c) for a, op, b, c in steps]
        assert sum(wrong) == 1, bad
        assert bad.endswith(f"the answer is {steps[-1][3]}.")  # the slip reaches the answer
    with pytest.raises(UsageError, match="--gold_file"):
        make_pairs(str(src), str(tmp_path / "p.json"), slipped=3)


def test_best_of_n_report():
    items = [dict(it, greedy=g) for it, g in zip(RESULTS["items"], ["the answer is 6.", "the answer is 3.",
                                                                     "the answer is 9.", "the answer is 10."])]
    good = [[1.0, 0.0, 0.5, 0.5, -1.0], [0.1, 0.2], [0.0, 0.0], [2.0, -2.0]]  # favour correct samples
    rep = best_of_n_report(items, good)
    assert rep["greedy_accuracy"] == 0.25 and rep["oracle_accuracy"] == 0.75
    assert rep["majority_accuracy"] == 0.75  # Q4 ties: the earliest answer (1000) wins
    assert rep["verifier_accuracy"] == 0.75 > rep["greedy_accuracy"]
    assert rep["sample_accuracy"] == pytest.approx((3 / 5 + 1 + 0 + 0.5) / 4)
    assert [p["index"] for p in rep["picks"]] == [0, 1, 0, 0]
    bad = best_of_n_report([{k: v for k, v in it.items() if k != "greedy"} for it in items],
                           [[-s for s in sc] for sc in good])
    assert bad["greedy_accuracy"] is None and bad["verifier_accuracy"] == 0.25
    with pytest.raises(ValueError, match="item 1 has 2 samples but 3 scores"):
        best_of_n_report(items[:2], [good[0], [0.0, 0.0, 0.0]])


def test_rerank_with_verifier_matches_score_samples(env):
    items = [{"instruction": "Tom has 5 pens.", "label": "5", "outputs": ["the answer is 5.", "the answer is 4."]},
             {"instruction": "Ann has 3 pens.", "label": "3", "outputs": ["the answer is 3."]}]
    rep = rerank_with_verifier(str(env / "verifier-tp1"), items, max_batch_size=2)
    tok, verifier = _tok(env), load_model(str(env / "verifier-tp1"), role="verifier")
    scores = score_samples(verifier, tok, [it["instruction"] for it in items], [it["outputs"] for it in items])
    assert rep == best_of_n_report(items, scores)
    assert rep["oracle_accuracy"] == 1.0 and rep["total"] == 2
