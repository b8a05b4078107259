"""Preference data for the verifier and DPO: pairwise and pointwise records, tokenised the
way SFT and generation do it, collated into batches, and `make_pairs` that builds pairwise
records from sampled solver answers.

Record formats (a JSON list or JSONL):

* pairwise:  ``{"instruction": str, "chosen": [str, ...], "rejected": [str, ...], "margin"?: float}``
  (a single string is accepted for ``chosen`` / ``rejected``). A record contributes every
  (chosen, rejected) combination; a combination whose two texts are equal carries no
  preference and is skipped (counted and logged). An empty ``chosen`` or ``rejected`` list
  is an error naming the file and record.
* pointwise: ``{"instruction": str, "output": str, "label": 0 | 1}`` (pointwise verifier loss
  only; pairwise files also serve the pointwise loss: chosen = 1, rejected = 0).

Tokenisation (tasks/gsm8k.py's template, identical to SFT and to generation):

    prompt   = encode(format_prompt(instruction), bos=True, eos=False)
    response = encode(text, bos=False, eos=False) + [eos]

The whole prompt + response is the model input (the verifier scores the EOS position, as it
does on PPO rollouts, which end on EOS). A sequence longer than ``max_seq_len`` loses prompt
tokens from the left first (BOS kept), then response tokens from the end; counted and logged.

Batches (``collate``) are `scoring.PairBatch`es of *sequences* (2 per pair: chosen then
rejected, or 1 per pointwise sample) laid out in *rows*, with `margin` / `labels` / `n_pairs`
set. Unpacked, every sequence has its own row, exactly `scoring.pair_batch` (row i = sequence i).
Packed (``packing=True``), a pair shares one row: ``prompt + chosen + rejected``, the rejected
tokens positioned right after the prompt and blind to the chosen ones (see `scoring.PackedAttention`), so
the prompt is computed once per pair and every score equals its unpacked value.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import UsageError
from ..config import flag
from ..log import get_logger
from ..scoring import PairBatch, packed_batch, pair_batch
from ..tasks.gsm8k import grade
from ..records import DataError, load_records, write_json_atomic
from .encoding import PLAIN, PromptFormat, encode_prompt, encode_response, fit_length

KINDS = ("pairwise", "pointwise")


# ----------------------------------------------------------------------------- tokenisation

# ----------------------------------------------------------------------------- records

@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


@dataclass
class Point:
    prompt: list[int]
    response: list[int]
    label: float


def _texts(record: dict, key: str, where: str) -> list[str]:
    v = record[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise DataError(f"{where}: '{key}' must be a string or a list of strings")
    if not v:
        raise DataError(f"{where}: '{key}' is empty (a pair needs at least one chosen and one rejected answer)")
    return v


def record_kind(record: dict, where: str) -> str:
    if "chosen" in record or "rejected" in record:
        missing = [k for k in ("instruction", "chosen", "rejected") if k not in record]
        if missing:
            raise DataError(f"{where}: pairwise record is missing key(s) {', '.join(missing)}")
        return "pairwise"
    if "output" in record and "label" in record:
        if "instruction" not in record:
            raise DataError(f"{where}: pointwise record is missing key(s) instruction")
        return "pointwise"
    raise DataError(f"{where}: expected a pairwise record (instruction, chosen, rejected) or a pointwise "
                    f"one (instruction, output, label); got keys {sorted(record)}")


def parse_record(record: dict, where: str) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of a validated record: pointwise -> output, label (float); pairwise ->
    chosen, rejected (lists of texts), margin (None when absent). Errors name `where`."""
    kind = record_kind(record, where)
    if not isinstance(record["instruction"], str):
        raise DataError(f"{where}: 'instruction' must be a string")
    if kind == "pointwise":
        label = record["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{where}: 'label' must be 0 or 1, got {label!r}")
        if not isinstance(record["output"], str):
            raise DataError(f"{where}: 'output' must be a string")
        return kind, {"output": record["output"], "label": float(label)}
    chosen, rejected = _texts(record, "chosen", where), _texts(record, "rejected", where)
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
    return kind, {"chosen": chosen, "rejected": rejected, "margin": margin}


class PairDataset:
    """Tokenised preference data. Units (what the trainer indexes): pairs for pairwise data,
    samples for pointwise data."""

    def __init__(self, records: Sequence[dict], tokenizer, max_seq_len: Optional[int] = None,
                 source: str = "train file", fmt: PromptFormat = PLAIN):
        if not records:
            raise DataError(f"{source}: no records")
        self.source, self.max_seq_len = source, max_seq_len
        self.pad_id, self.eos_id, bos = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id
        self.pairs: list[Pair] = []
        self.points: list[Point] = []
        self.n_identical = self.n_truncated = self.n_empty_records = 0
        self.has_margin = False
        kinds = set()
        cache: dict[tuple, list[int]] = {}

        def resp(text: str) -> list[int]:
            key = (text, rec["instruction"]) if fmt.template == "chat" else (text,)  # a turn depends on its question
            if key not in cache:
                cache[key] = encode_response(tokenizer, text, fmt, rec["instruction"], prompt)
            return cache[key]

        def fit(p: list[int], r: list[int]) -> tuple[list[int], list[int]]:
            p2, r2, cut = fit_length(p, r, max_seq_len, bos)
            self.n_truncated += cut
            return p2, r2

        for i, rec in enumerate(records):
            kind, fields = parse_record(rec, f"{source}: record {i}")
            kinds.add(kind)
            prompt = encode_prompt(tokenizer, rec["instruction"], fmt)
            if kind == "pointwise":
                p, r = fit(prompt, resp(fields["output"]))
                self.points.append(Point(p, r, fields["label"]))
                continue
            chosen, rejected, margin = fields["chosen"], fields["rejected"], fields["margin"]
            self.has_margin |= margin is not None
            before = len(self.pairs)
            for c, r in itertools.product(chosen, rejected):
                if c == r:
                    self.n_identical += 1
                    continue
                pc, rc = fit(prompt, resp(c))
                pr, rr = fit(prompt, resp(r))
                if pc != pr:  # truncation cut the shared prompt differently: both use the shorter one
                    pc = pc if len(pc) <= len(pr) else pr
                    rc, rr = resp(c)[:max_seq_len - len(pc)], resp(r)[:max_seq_len - len(pc)]
                self.pairs.append(Pair(pc, rc, rr, float(margin or 0.0)))
            self.n_empty_records += len(self.pairs) == before
        if len(kinds) > 1:
            raise DataError(f"{source}: mixes pairwise and pointwise records; use one kind per file")
        self.kind = kinds.pop()
        log = get_logger()
        if self.n_identical:
            log.warning(f"{source}: skipped {self.n_identical} pair(s) whose chosen and rejected texts are "
                        f"identical ({self.n_empty_records} record(s) left without any pair)")
        if self.n_truncated:
            log.warning(f"{source}: truncated {self.n_truncated} sequence(s) to --max_seq_len {max_seq_len}")
        if len(self) == 0:
            raise DataError(f"{source}: no usable pairs (every chosen text equals its rejected text)")
        log.info(f"{source}: {len(records)} {self.kind} records -> {len(self)} "
                 f"{'pairs' if self.kind == 'pairwise' else 'samples'}")

    def __len__(self) -> int:
        return len(self.pairs) if self.kind == "pairwise" else len(self.points)

    def collate(self, indices: Sequence[int], epoch: int = 0, packing: bool = False) -> PairBatch:
        if self.kind == "pointwise":
            pts = [self.points[i] for i in indices]
            b = pair_batch([p.prompt for p in pts], [p.response for p in pts], self.pad_id)
            return dataclasses.replace(b, labels=torch.tensor([p.label for p in pts]))
        pairs = [self.pairs[i] for i in indices]
        b = collate_pairs(pairs, self.pad_id, packing)
        return dataclasses.replace(b, margin=torch.tensor([p.margin for p in pairs]) if self.has_margin else None)


def load_pair_dataset(path: str, tokenizer, max_seq_len: Optional[int] = None,
                      fmt: PromptFormat = PLAIN) -> PairDataset:
    """Records of a JSON / JSONL file (errors name the file and record) -> PairDataset."""
    return PairDataset(load_records(path, ("instruction",)), tokenizer, max_seq_len, source=str(path), fmt=fmt)


# ----------------------------------------------------------------------------- collation

def collate_pairs(pairs: Sequence[Pair], pad_id: int, packing: bool = False) -> PairBatch:
    """Sequences 0..P-1 are the chosen answers, P..2P-1 the rejected ones; packed, pair i's
    row is its prompt, chosen, rejected."""
    P = len(pairs)
    prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if packing:
        b = packed_batch(prompts, responses, [[i, P + i] for i in range(P)], pad_id)
    else:
        b = pair_batch(prompts, responses, pad_id)
    return dataclasses.replace(b, n_pairs=P)


# ----------------------------------------------------------------------------- make_pairs

def _item_samples(item: dict, where: str) -> list[str]:
    outs = item.get("outputs")
    if outs is None:
        outs = [item["output"]] if isinstance(item.get("output"), str) else None
    if not isinstance(outs, list) or not all(isinstance(t, str) for t in outs):
        raise DataError(f"{where}: expected 'outputs' (a list of sampled answer texts)")
    return outs


def results_items(results: Any, source: str) -> list[dict]:
    """The per-question items of a solver_evaluate results.json (a dict with "items", or a list)."""
    items = results.get("items") if isinstance(results, dict) else results
    if not isinstance(items, list):
        raise DataError(f"{source}: expected a solver_evaluate results.json (an object with 'items')")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "instruction" not in it or "label" not in it:
            raise DataError(f"{source}: item {i}: expected an object with 'instruction' and 'label'")
    return items


def sample_correctness(item: dict, outputs: list[str]) -> list[bool]:
    label = str(item["label"])
    return [grade(t, label) for t in outputs]


def _spread(n_c: int, n_r: int) -> list[tuple[int, int]]:
    """All (chosen, rejected) index combinations, ordered so any prefix uses as many distinct
    answers as possible: (0,0), (1,1), ... before repeats."""
    return sorted(itertools.product(range(n_c), range(n_r)), key=lambda ij: ((ij[1] - ij[0]) % n_r, ij[0]))


def make_pairs(results_json: str, dst: str, max_pairs_per_question: int = 4, gold_file: Optional[str] = None,
               slipped: int = 0, seed: int = 0) -> dict:
    """`dataset/make_pairs.py`: solver_evaluate `--num_samples K` results -> pairwise records.

    Each question's distinct correct samples are chosen answers, its distinct wrong ones
    rejected answers; up to `max_pairs_per_question` pairs are written per question, one record
    per pair. Questions whose samples are all correct or all wrong give no pair (counted).
    `slipped` > 0 adds that many (gold solution, one wrong sum) pairs from `gold_file`
    (`slipped_pairs`), shuffled in with `seed`. Returns the counts (also logged)."""
    if max_pairs_per_question < 1:
        raise UsageError(f"--max_pairs_per_question must be >= 1, got {max_pairs_per_question}")
    if slipped < 0 or (slipped and gold_file is None):
        raise UsageError(f"--slipped_pairs {slipped}: needs a count >= 0 and, when > 0, --gold_file")
    try:
        with open(results_json, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError:
        raise DataError(f"--results {results_json}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{results_json}:{e.lineno}: malformed JSON ({e.msg})") from None
    items = results_items(results, results_json)
    out: list[dict] = []
    stats = {"questions": len(items), "pairs": 0, "used_questions": 0, "all_correct": 0, "all_wrong": 0}
    for i, it in enumerate(items):
        outputs = _item_samples(it, f"{results_json}: item {i}")
        ok = sample_correctness(it, outputs)
        good = list(dict.fromkeys(t for t, c in zip(outputs, ok) if c))
        bad = list(dict.fromkeys(t for t, c in zip(outputs, ok) if not c))
        if not bad:
            stats["all_correct"] += 1
            continue
        if not good:
            stats["all_wrong"] += 1
            continue
        stats["used_questions"] += 1
        for ci, ri in _spread(len(good), len(bad))[:max_pairs_per_question]:
            out.append({"instruction": it["instruction"], "chosen": [good[ci]], "rejected": [bad[ri]]})
    stats["pairs"] = len(out)
    if not out:
        raise DataError(f"{results_json}: no question has both a correct and a wrong sample "
                        f"({stats['all_correct']} all correct, {stats['all_wrong']} all wrong); "
                        f"sample more answers per question (--num_samples) or at a higher --t")
    if slipped:
        extra = slipped_pairs(gold_file, slipped, seed)
        stats["slipped_pairs"] = len(extra)
        out += extra
        random.Random(seed).shuffle(out)
    write_json_atomic(out, dst)
    get_logger().info(f"make_pairs: {stats['pairs']} pairs from {stats['used_questions']} of {stats['questions']} "
                      f"questions, {stats.get('slipped_pairs', 0)} slipped gold pairs -> {dst}; skipped "
                      f"{stats['all_correct']} all-correct and {stats['all_wrong']} all-wrong questions")
    return stats


# "a op b = c" as solutions state a step: "27 - 13 = 14", and GSM8K's "<<27-13=14>>".
_STEP = re.compile(r"(\d+)(\s*)([-+*/])(\s*)(\d+)(\s*=\s*)(\d+)")
_NUMBER = re.compile(r"\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "/": lambda a, b: a // b if b and a % b == 0 else None}


def slip_solution(text: str, rng: random.Random, max_delta: int = 10) -> Optional[str]:
    """`text` with one wrong sum: one stated step "a op b = c" gets c + d (0 < |d| <= max_delta,
    the result stays positive), and what follows is carried on from it as a consistent solver
    would: later steps take the changed values as operands and are recomputed, and later
    numbers equal to a changed value ("the answer is 14") change with it. None: no step.

    This is the mistake a small solver makes ("27 - 13 = 19 pens are left ... the answer is
    19"), which a verifier can only catch by redoing the arithmetic; pairs (solution, its
    slipped twin) differ in nothing else."""
    steps = list(_STEP.finditer(text))
    if not steps:
        return None
    slip = rng.randrange(len(steps))
    changed: dict[int, int] = {}

    def carry(part: str) -> str:
        return _NUMBER.sub(lambda m: str(changed.get(int(m[0]), m[0])), part) if changed else part

    out, end = [text[:steps[slip].start()]], steps[slip].start()
    for j, m in enumerate(steps[slip:], start=slip):
        out.append(carry(text[end:m.start()]))
        a, b, stated = (changed.get(int(m[i]), int(m[i])) for i in (1, 5, 7))
        if j == slip:
            value = stated + rng.choice([d for d in range(-max_delta, max_delta + 1) if d and stated + d > 0])
        else:
            value = _OPS[m[3]](a, b)
            value = stated if value is None else value  # a division that no longer divides stays as stated
        if value != int(m[7]):
            changed[int(m[7])] = value
        out.append(f"{a}{m[2]}{m[3]}{m[4]}{b}{m[6]}{value}")
        end = m.end()
    out.append(carry(text[end:]))
    return "".join(out)


def slipped_pairs(gold_file: str, n: int, seed: int) -> list[dict]:
    """Pairwise records (gold solution, `slip_solution` of it) for the first n records of an
    SFT file (instruction, output) whose solution states a step."""
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(load_records(gold_file, ("instruction", "output"))):
        if len(out) >= n:
            break
        gold = _texts(rec, "output", f"{gold_file}: record {i}")[0]
        bad = slip_solution(gold, rng)
        if bad is not None:
            out.append({"instruction": rec["instruction"], "chosen": [gold], "rejected": [bad]})
    return out


@dataclass
class PairsConfig:
    """`dataset/make_pairs.py`'s flags."""
    results: str = flag(path="file")  # solver_evaluate.py --num_samples K results.json
    dst: str = flag()
    max_pairs_per_question: int = 4
    gold_file: Optional[str] = flag(None, path="file")  # SFT records (instruction, output) for --slipped_pairs
    slipped_pairs: int = 0  # add this many (gold, gold with one wrong sum) pairs
    seed: int = 0


def make_pairs_command(cfg: PairsConfig) -> dict:
    return make_pairs(cfg.results, cfg.dst, cfg.max_pairs_per_question, cfg.gold_file, cfg.slipped_pairs, cfg.seed)


__all__ = ["PairsConfig", "make_pairs_command", "Pair", "Point", "PairDataset", "load_pair_dataset", "encode_prompt", "encode_response", "fit_length",
           "collate_pairs", "make_pairs", "results_items", "slip_solution", "slipped_pairs",
           "sample_correctness", "DataError"]
