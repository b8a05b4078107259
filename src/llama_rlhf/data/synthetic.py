"""Synthetic arithmetic word problems in the GSM8K project format, sized for a tiny model.

Every problem is a chain of `steps` operations on one count of items; the solution states
each operation as "a op b = c", so a small model can learn to copy and compute, and the
vocabulary stays small enough for a few-hundred-piece SentencePiece tokenizer."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from .records import write_json_atomic

_PEOPLE = [("Tom", "he", "his"), ("Ann", "she", "her"), ("Sam", "he", "his"), ("Mia", "she", "her")]
_ITEMS = [("apples", "bags"), ("coins", "jars"), ("books", "boxes"), ("pens", "packs")]
_MAX = 99  # keep every count two-digit so answers stay short
_LO, _HI = 2, 20  # operands

# Templates are filled in two passes, numbers here (%) and the person/item last (str.format),
# so each operation serves every story.


def _add(rng: random.Random, c: int) -> tuple[str, str, int] | None:
    if _MAX - c < _LO:
        return None
    b = rng.randint(_LO, min(_HI, _MAX - c))
    return "{P} buys %d more {item}." % b, "{P} buys %d more, so %d + %d = %d {item}." % (b, c, b, c + b), c + b


def _sub(rng: random.Random, c: int) -> tuple[str, str, int] | None:
    if c <= _LO:  # leave at least one item: a zero count makes later steps degenerate
        return None
    b = rng.randint(_LO, min(_HI, c - 1))
    return ("{P} gives away %d {item}." % b,
            "{P} gives away %d, so %d - %d = %d {item} are left." % (b, c, b, c - b), c - b)


def _mul(rng: random.Random, c: int) -> tuple[str, str, int] | None:
    k = rng.choice([2, 3])
    if c * k > _MAX:
        return None
    word = {2: "double", 3: "triple"}[k]
    return "Then {pos} {item} %s." % word, "The {item} %s, so %d * %d = %d {item}." % (word, c, k, c * k), c * k


_OPS: list[Callable[[random.Random, int], tuple[str, str, int] | None]] = [_add, _sub, _mul]


def _start(rng: random.Random) -> tuple[str, list[str], int, int]:
    """Opening sentence, its solution steps, the count, and how many operations it used."""
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return ("{N} has %d {box} with %d {item} each." % (a, b),
                ["{N} has %d {box} with %d {item} each, so {p} has %d * %d = %d {item}." % (a, b, a, b, a * b)],
                a * b, 1)
    a = rng.randint(_LO, _HI)
    return "{N} has %d {item}." % a, [], a, 0


def _problem(rng: random.Random, steps: int) -> dict:
    name, pron, pos = rng.choice(_PEOPLE)
    item, box = rng.choice(_ITEMS)
    question, solution, count, used = _start(rng)
    question = [question]
    while used < steps:
        done = rng.choice(_OPS)(rng, count)
        if done is None:
            continue
        q, s, count = done
        question.append(q)
        solution.append(s)
        used += 1
    question.append("How many {item} does {N} have now?")
    solution.append(f"Therefore, the answer is {count}.")
    fill = dict(N=name, p=pron, P=pron.capitalize(), pos=pos, item=item, box=box)
    return {"instruction": " ".join(question).format(**fill),
            "output": [" ".join(solution).format(**fill)], "label": str(count)}


def make_problems(n: int, seed: int, steps: int = 2) -> list[dict]:
    """`n` distinct problems of `steps` operations each; the same seed gives the same list."""
    if n < 0 or steps < 1:
        raise ValueError(f"make_problems: need n >= 0 and steps >= 1, got n={n}, steps={steps}")
    rng = random.Random(seed)
    seen: dict[str, dict] = {}
    for _ in range(50 * n + 1000):
        if len(seen) == n:
            break
        problem = _problem(rng, steps)
        seen.setdefault(problem["instruction"], problem)
    if len(seen) < n:
        raise ValueError(f"make_problems: could not find {n} distinct problems (got {len(seen)})")
    return list(seen.values())


def make_splits(n_train: int, n_test: int, seed: int, steps: int = 2) -> tuple[list[dict], list[dict]]:
    """Train and test sets drawn from one stream of distinct problems, so no question is in both."""
    problems = make_problems(n_train + n_test, seed, steps)
    return problems[:n_train], problems[n_train:]


def write_synthetic(dst_dir: str, n_train: int, n_test: int, seed: int, steps: int = 2) -> None:
    """Write `train.json` and `test.json` under `dst_dir`."""
    train, test = make_splits(n_train, n_test, seed, steps)
    write_json_atomic(train, Path(dst_dir) / "train.json")
    write_json_atomic(test, Path(dst_dir) / "test.json")
