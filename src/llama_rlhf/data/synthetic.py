"""Synthetic arithmetic word problems in the GSM8K project format, sized for a tiny model.

Every problem is a chain of `steps` operations on one count of items; the solution states
each operation as "a op b = c", so a small model can learn to copy and compute, and the
vocabulary stays small enough for a few-hundred-piece SentencePiece tokenizer."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..records import write_json_atomic

_PEOPLE = [("Tom", "he", "his"), ("Ann", "she", "her"), ("Sam", "he", "his"), ("Mia", "she", "her")]
_ITEMS = [("apples", "bags"), ("coins", "jars"), ("books", "boxes"), ("pens", "packs")]
_MAX = 99  # keep every count two-digit so answers stay short
_LO, _HI = 2, 20  # operands

# Templates are filled in two passes, numbers here (%) and the person/item last (str.format),
# so each operation serves every story. An operation is (kind, operand); the solution is
# rendered from the operations, so a slip can change how one step is computed.
_QUESTION = {"add": "{P} buys %d more {item}.", "sub": "{P} gives away %d {item}.", "mul": "Then {pos} {item} %s."}
_WORD = {2: "double", 3: "triple"}
_SIGN = {"add": "+", "sub": "-", "mul": "*"}


def _apply(kind: str, c: int, b: int) -> int:
    return {"add": c + b, "sub": c - b, "mul": c * b}[kind]


def _say(kind: str, done: str, c: int, b: int) -> str:
    """The solution sentence of a `kind` step, computed as `done` (a slip reads "double" as "2 more")."""
    value = _apply(done, c, b)
    if kind == "add":
        return "{P} buys %d more, so %d %s %d = %d {item}." % (b, c, _SIGN[done], b, value)
    if kind == "sub":
        return "{P} gives away %d, so %d %s %d = %d {item} are left." % (b, c, _SIGN[done], b, value)
    return "The {item} %s, so %d %s %d = %d {item}." % (_WORD[b], c, _SIGN[done], b, value)


def _pick(rng: random.Random, c: int) -> tuple[str, int] | None:
    """A random operation valid on count `c`, or None (the caller draws again)."""
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        return None if _MAX - c < _LO else (kind, rng.randint(_LO, min(_HI, _MAX - c)))
    if kind == "sub":  # leave at least one item: a zero count makes later steps degenerate
        return None if c <= _LO else (kind, rng.randint(_LO, min(_HI, c - 1)))
    k = rng.choice([2, 3])
    return None if c * k > _MAX else (kind, k)


def _start(rng: random.Random) -> tuple[str, list[str], int, int]:
    """Opening sentence, its solution steps, the count, and how many operations it used."""
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return ("{N} has %d {box} with %d {item} each." % (a, b),
                ["{N} has %d {box} with %d {item} each, so {p} has %d * %d = %d {item}." % (a, b, a, b, a * b)],
                a * b, 1)
    a = rng.randint(_LO, _HI)
    return "{N} has %d {item}." % a, [], a, 0


@dataclass(frozen=True)
class _Problem:
    instruction: str
    label: str
    first: tuple[str, ...]  # solution steps of the opening sentence
    start: int  # the count after the opening
    ops: tuple[tuple[str, int], ...]
    fill: tuple[tuple[str, str], ...]  # names for str.format

    def record(self, slip: float = 0.0, rng: random.Random | None = None) -> dict:
        """The project record; with probability `slip` each "double" / "triple" step adds 2 / 3
        instead of multiplying and the chain goes on from the wrong count, as a careless
        teacher's would. The label stays the true answer."""
        solution, count = list(self.first), self.start
        for kind, b in self.ops:
            done = "add" if kind == "mul" and slip > 0 and rng.random() < slip else kind
            solution.append(_say(kind, done, count, b))
            count = _apply(done, count, b)
        solution.append(f"Therefore, the answer is {count}.")
        return {"instruction": self.instruction, "output": [" ".join(solution).format(**dict(self.fill))],
                "label": self.label}


def _problem(rng: random.Random, steps: int) -> _Problem:
    name, pron, pos = rng.choice(_PEOPLE)
    item, box = rng.choice(_ITEMS)
    opening, first, start, used = _start(rng)
    ops, count = [], start
    while used < steps:
        op = _pick(rng, count)
        if op is not None:
            ops.append(op)
            count = _apply(op[0], count, op[1])
            used += 1
    fill = dict(N=name, p=pron, P=pron.capitalize(), pos=pos, item=item, box=box)
    question = [opening] + [_QUESTION[k] % (_WORD[b] if k == "mul" else b) for k, b in ops]
    question.append("How many {item} does {N} have now?")
    return _Problem(" ".join(question).format(**fill), str(count), tuple(first), start, tuple(ops),
                    tuple(fill.items()))


def _distinct(n: int, seed: int, steps: int) -> list[_Problem]:
    if n < 0 or steps < 1:
        raise ValueError(f"make_problems: need n >= 0 and steps >= 1, got n={n}, steps={steps}")
    rng = random.Random(seed)
    seen: dict[str, _Problem] = {}
    for _ in range(50 * n + 1000):
        if len(seen) == n:
            break
        problem = _problem(rng, steps)
        seen.setdefault(problem.instruction, problem)
    if len(seen) < n:
        raise ValueError(f"make_problems: could not find {n} distinct problems (got {len(seen)})")
    return list(seen.values())


def make_problems(n: int, seed: int, steps: int = 2) -> list[dict]:
    """`n` distinct problems of `steps` operations each, solved correctly; the same seed gives
    the same list."""
    return [p.record() for p in _distinct(n, seed, steps)]


def make_splits(n_train: int, n_test: int, seed: int, steps: int = 2,
                slip: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Train and test sets drawn from one stream of distinct problems, so no question is in both.
    `slip` > 0 puts the careless teacher's slips into the train solutions only (labels stay true)."""
    if not 0.0 <= slip <= 1.0:
        raise UsageError(f"make_splits: slip must be in [0, 1], got {slip}")
    problems, rng = _distinct(n_train + n_test, seed, steps), random.Random(seed + 1)
    return [p.record(slip, rng) for p in problems[:n_train]], [p.record() for p in problems[n_train:]]


def write_synthetic(dst_dir: str, n_train: int, n_test: int, seed: int, steps: int = 2, slip: float = 0.0) -> None:
    """Write `train.json` and `test.json` under `dst_dir`."""
    train, test = make_splits(n_train, n_test, seed, steps, slip)
    write_json_atomic(train, Path(dst_dir) / "train.json")
    write_json_atomic(test, Path(dst_dir) / "test.json")
