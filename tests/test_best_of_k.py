"""End to end at TP = 1: best-of-K with a *trained* verifier beats greedy decoding.

The task: a question lists four distinct digits and asks for the even one (one even digit
among three odd ones) or the odd one (one odd digit among three even ones):

    Numbers: 3 8 5 7. Which number is even?      ->  The answer is 8.

The solver is a deliberately imperfect, real model: the SFT trainer fine-tunes it from a
random init on *guesses*, records whose ``output`` lists the answer and every other digit of
the asked parity (``["The answer is 8.", "The answer is 2.", ...]``). It learns the answer
format and the parity, but not which digit is in the list: greedy decoding hits the answer
about 1 time in 4 or 5, while K = 8 samples at temperature 1 usually contain it. Checking a
given answer (is this digit in the list?) is what the verifier learns, from the pairs that
`make_pairs` builds out of the solver's own samples on the training questions.

Every stage is the library's code path, in process at TP = 1:
`setup_sft` -> `evaluate(t=1, num_samples=K)` on the training questions -> `make_pairs` ->
`setup_verifier` (initialised from the solver checkpoint) -> `evaluate(verifier_ckpt_dir=...)`
on held-out questions (greedy, samples and the verifier's best-of-K side by side). A control
reranks the same held-out samples with the solver plus a fresh, untrained head.
"""
from __future__ import annotations

import random
from pathlib import Path

from llama_rlhf.checkpoint import load_model, save_meta
from llama_rlhf.data.pairs import make_pairs
from llama_rlhf.records import write_json_atomic
from llama_rlhf.evaluation.best_of_n import rerank_with_verifier
from llama_rlhf.evaluation.evaluate import EvalConfig, evaluate
from llama_rlhf.models import attach_reward_head, build_model, preset_args
from llama_rlhf.tokenizers import load_tokenizer, train_sentencepiece
from llama_rlhf.trainers.sft import SFTConfig, setup_sft
from llama_rlhf.trainers.verifier import VerifierConfig, setup_verifier

K = 8
EVEN, ODD = [2, 4, 6, 8], [1, 3, 5, 7, 9]
QUIET = dict(progress=False, peak_flops=1e12, log_steps=10_000)
REPORT_KEYS = ("greedy_accuracy", "sample_accuracy", "majority_accuracy", "verifier_accuracy", "oracle_accuracy")


def parity_questions(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct questions {"instruction", "output": [answer, other guesses...], "label"},
    split into train and held-out (no question in both)."""
    rng = random.Random(seed)
    seen: dict[str, dict] = {}
    while len(seen) < n_train + n_test:
        want = rng.choice(["even", "odd"])
        hit, miss = (EVEN, ODD) if want == "even" else (ODD, EVEN)
        answer = rng.choice(hit)
        digits = rng.sample(miss, 3)
        digits.insert(rng.randrange(4), answer)
        ins = f"Numbers: {' '.join(map(str, digits))}. Which number is {want}?"
        guesses = [answer] + [d for d in hit if d != answer]
        seen.setdefault(ins, {"instruction": ins, "output": [f"The answer is {d}." for d in guesses],
                              "label": str(answer)})
    items = list(seen.values())
    return items[:n_train], items[n_train:]


def run_pipeline(root: Path, seed: int = 0, n_train: int = 192, n_test: int = 64) -> dict:
    """Random init -> SFT solver -> K samples per training question -> pairs -> verifier ->
    held-out evaluation with best-of-K. Returns the checkpoints, the make_pairs counts and
    both evaluate() results."""
    train, test = parity_questions(n_train, n_test, seed)
    write_json_atomic(train, root / "train.json")
    write_json_atomic(test, root / "test.json")
    texts = [r["instruction"] for r in train + test] + [o for r in train for o in r["output"]]
    sp = train_sentencepiece(texts, str(root / "sp"), 360)
    args = preset_args("llama-tiny", vocab_size=load_tokenizer(sp).vocab_size, max_seq_len=64)
    save_meta(build_model(args, init_seed=seed).state_dict(), args, str(root / "init"), n=1, tokenizer_path=sp)

    solver = setup_sft(SFTConfig(ckpt_dir=str(root / "init"), save_dir=str(root / "solver"), train_file=str(root / "train.json"),
                       max_batch_size=16, lr=3e-3, warmup_steps=10, max_steps=300, max_seq_len=64, seed=seed,
                       **QUIET)).fit()

    gen = dict(max_new_tokens=12, max_batch_size=64, t=1.0, num_samples=K)
    samples = evaluate(EvalConfig(solver, str(root / "train.json"), str(root / "samples"), seed=seed + 1, **gen))
    pairs = make_pairs(str(root / "samples" / "results.json"), str(root / "pairs.json"), max_pairs_per_question=4)

    verifier = setup_verifier(VerifierConfig(ckpt_dir=solver, save_dir=str(root / "verifier"), train_file=str(root / "pairs.json"),
                              loss="logexpwithlm", lm_coef=3.0, max_batch_size=16, epochs=12, lr=3e-3,
                              warmup_steps=5, max_seq_len=64, seed=seed, **QUIET)).fit()

    held_out = evaluate(EvalConfig(solver, str(root / "test.json"), str(root / "eval"), seed=seed + 2,
                        verifier_ckpt_dir=verifier, **gen))
    return {"solver": solver, "verifier": verifier, "tokenizer": sp, "samples": samples, "pairs": pairs,
            "held_out": held_out}


def untrained_verifier(solver: str, dst: Path, tokenizer: str, seed: int) -> str:
    """The solver with a fresh reward head, as `setup_verifier` starts from, saved untrained."""
    model = load_model(solver, role="solver")
    attach_reward_head(model, seed)
    save_meta(model.state_dict(), model.args, str(dst), n=1, tokenizer_path=tokenizer)
    return str(dst)


def test_best_of_k_with_trained_verifier_beats_greedy(tmp_path):
    out = run_pipeline(tmp_path, seed=0)
    held_out = out["held_out"]
    rep = held_out["best_of_n"]
    control = rerank_with_verifier(untrained_verifier(out["solver"], tmp_path / "untrained", out["tokenizer"], 0),
                                   held_out["items"], max_batch_size=64)
    summary = {k: rep[k] for k in REPORT_KEYS}
    print(f"held-out best-of-{K}: {summary}; untrained head {control['verifier_accuracy']:.3f}; "
          f"pairs {out['pairs']}; training-question pass@{K} {out['samples']['pass@k']:.3f}")

    assert rep["total"] == 64 and rep["num_samples"] == K and held_out["missing"] == 0
    # The premise: the solver is mediocre greedily, but sampling usually finds the answer,
    # and make_pairs got pairs out of most training questions.
    assert rep["greedy_accuracy"] <= 0.45 and rep["sample_accuracy"] <= 0.4
    assert rep["oracle_accuracy"] >= rep["greedy_accuracy"] + 0.4
    assert out["pairs"]["used_questions"] >= out["pairs"]["questions"] // 2
    # The claim: the trained verifier's pick beats greedy and a single sample by a clear margin...
    assert rep["verifier_accuracy"] >= rep["greedy_accuracy"] + 0.3, summary
    assert rep["verifier_accuracy"] >= rep["sample_accuracy"] + 0.3, summary
    # ...because of its training: the same samples reranked by an untrained head do not.
    assert control["oracle_accuracy"] == rep["oracle_accuracy"]
    assert control["verifier_accuracy"] <= rep["verifier_accuracy"] - 0.3, (summary, control["verifier_accuracy"])
