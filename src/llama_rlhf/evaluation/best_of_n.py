"""Best-of-N with a verifier: score the K sampled answers of each question and report,
side by side, greedy, majority-vote, verifier best-of-K and oracle pass@K accuracy.

Wiring into `solver_evaluate.py` is one call after the items are gathered (free the solver
first; the verifier must have the solver's TP size and tokenizer):

    results["best_of_n"] = rerank_with_verifier(verifier_ckpt_dir, results["items"], max_batch_size=...)

Texts are re-encoded as training does (data/encoding.py, in the prompt format the verifier
checkpoint records), so the verifier scores the same token sequences it was trained on.
"""
from __future__ import annotations

import gc
from typing import Optional, Sequence

import torch

from ..errors import UsageError
from .. import parallel
from ..checkpoint import load_model
from ..data.encoding import PLAIN, PromptFlags, PromptFormat, encode_prompt, encode_response, fit_length
from ..data.pairs import results_items
from ..log import get_logger
from ..scoring import pair_batch, sequence_scores
from ..tasks.gsm8k import extract_answer, is_correct, majority_vote
from ..tokenizers import load_tokenizer
from ..trainers.base import autocast


@torch.no_grad()
def score_samples(verifier, tokenizer, instructions: Sequence[str], samples: Sequence[Sequence[str]],
                  max_batch_size: int = 64, reduce: str = "last", fmt: PromptFormat = PLAIN) -> list[list[float]]:
    """Verifier score of every sample: `samples[i][k]` answers `instructions[i]`; returns the same
    nesting of floats. Every TP rank of a replica must call it with the same input (no DP split
    here: see `rerank_with_verifier`). Sequences longer than the model's max_seq_len lose
    prompt tokens from the left."""
    if len(instructions) != len(samples):
        raise ValueError(f"score_samples: {len(instructions)} instructions but {len(samples)} sample lists")
    if max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be >= 1, got {max_batch_size}")
    if not getattr(verifier.args, "reward_head", 0):
        raise ValueError("score_samples: the model has no reward head (a solver was given, a verifier is needed)")
    rows = []  # (i, k, prompt, response)
    for i, (ins, outs) in enumerate(zip(instructions, samples)):
        prompt = encode_prompt(tokenizer, ins, fmt)
        for k, text in enumerate(outs):
            p, r, _ = fit_length(prompt, encode_response(tokenizer, text, fmt, ins, prompt), verifier.args.max_seq_len,
                                 tokenizer.bos_id)
            rows.append((i, k, p, r))
    rows.sort(key=lambda x: -(len(x[2]) + len(x[3])))  # similar lengths share a batch
    out: list[list[float]] = [[0.0] * len(s) for s in samples]
    was_training = verifier.training
    verifier.eval()
    dev = parallel.device()
    for s in range(0, len(rows), max_batch_size):
        chunk = rows[s:s + max_batch_size]
        batch = pair_batch([c[2] for c in chunk], [c[3] for c in chunk], tokenizer.pad_id).to(dev)
        with autocast(dev):
            scores = sequence_scores(verifier, batch, reduce).float().cpu().tolist()
        for (i, k, _, _), v in zip(chunk, scores):
            out[i][k] = v
    verifier.train(was_training)
    return out


def _samples(item: dict) -> list[str]:
    outs = item.get("outputs")
    if outs is None and isinstance(item.get("output"), str):
        outs = [item["output"]]
    return list(outs or [])


def best_of_n_report(items: Sequence[dict], scores: Sequence[Sequence[float]]) -> dict:
    """Accuracies over `items` (solver_evaluate results items: instruction, label, outputs
    [, predicts] [, greedy or greedy_correct]) with `scores[i][k]` for `outputs[k]`:

    * greedy: the item's greedy answer (key ``greedy``: text, or ``greedy_correct``: bool);
      None unless every item carries one
    * sample: mean correctness of a single sample (expected pass@1 at the sampling temperature)
    * majority: majority vote over the K extracted answers
    * verifier: the sample the verifier scores highest (first on ties), best-of-K
    * oracle: pass@K, some sample is correct (the ceiling of any reranker)

    Also `picks`: per item, the chosen sample index, its score and correctness."""
    if len(items) != len(scores):
        raise ValueError(f"best_of_n_report: {len(items)} items but {len(scores)} score lists")
    n = len(items)
    tot = {"sample": 0.0, "majority": 0, "verifier": 0, "oracle": 0, "greedy": 0}
    has_greedy = n > 0
    picks = []
    for i, (it, sc) in enumerate(zip(items, scores)):
        outs = _samples(it)
        if len(outs) != len(sc) or not outs:
            raise ValueError(f"best_of_n_report: item {i} has {len(outs)} samples but {len(sc)} scores")
        label = str(it["label"])
        predicts = it.get("predicts") or [extract_answer(t) for t in outs]
        ok = [is_correct(p, label) for p in predicts]
        best = max(range(len(sc)), key=lambda k: (sc[k], -k))
        tot["sample"] += sum(ok) / len(ok)
        tot["majority"] += is_correct(majority_vote(predicts), label)
        tot["verifier"] += ok[best]
        tot["oracle"] += any(ok)
        if "greedy_correct" in it:
            tot["greedy"] += bool(it["greedy_correct"])
        elif isinstance(it.get("greedy"), str):
            tot["greedy"] += is_correct(extract_answer(it["greedy"]), label)
        else:
            has_greedy = False
        picks.append({"index": best, "score": float(sc[best]), "correct": ok[best]})
    acc = {k: (v / n if n else 0.0) for k, v in tot.items()}
    k_max = max((len(s) for s in scores), default=0)
    return {"greedy_accuracy": acc["greedy"] if has_greedy else None, "sample_accuracy": acc["sample"],
            "majority_accuracy": acc["majority"], "verifier_accuracy": acc["verifier"],
            "oracle_accuracy": acc["oracle"], "num_samples": k_max, "total": n, "picks": picks}


def rerank_with_verifier(verifier_ckpt_dir: str, items: Sequence[dict], max_batch_size: int = 64,
                         reduce: str = "last", model_type: Optional[str] = None,
                         tokenizer_path: Optional[str] = None) -> dict:
    """Load the verifier of `verifier_ckpt_dir` (a solver dir is refused), score every item's
    samples (DP replicas take strided items), free the verifier and return `best_of_n_report`
    (identical on every rank). `items` must be the same on every rank. Samples are encoded in
    the prompt format the verifier was trained with (its prompt.json), never with exemplars."""
    items = results_items(list(items), "items")
    tokenizer = load_tokenizer(tokenizer_path or verifier_ckpt_dir)
    verifier = load_model(verifier_ckpt_dir, model_type, role="verifier").eval()
    mine = list(range(parallel.dp_rank(), len(items), parallel.dp_size()))
    local = score_samples(verifier, tokenizer, [items[i]["instruction"] for i in mine],
                          [_samples(items[i]) for i in mine], max_batch_size, reduce,
                          PromptFlags().prompt_format(verifier_ckpt_dir))
    del verifier
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scores: list = [None] * len(items)
    for part_idx, part in zip(_dp_slices(len(items)), parallel.all_gather_objects(local)):
        for i, s in zip(part_idx, part):
            scores[i] = s
    report = best_of_n_report(items, scores)
    get_logger().info(f"best-of-{report['num_samples']} on {report['total']} questions: verifier "
                      f"{report['verifier_accuracy']:.4f}, majority {report['majority_accuracy']:.4f}, oracle "
                      f"{report['oracle_accuracy']:.4f}, single sample {report['sample_accuracy']:.4f}"
                      + (f", greedy {report['greedy_accuracy']:.4f}" if report["greedy_accuracy"] is not None else ""))
    return report


def _dp_slices(n: int) -> list[list[int]]:
    return [list(range(r, n, parallel.dp_size())) for r in range(parallel.dp_size())]


__all__ = ["score_samples", "best_of_n_report", "rerank_with_verifier"]
