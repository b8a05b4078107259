"""Scoring GSM8K-style answers: pull the final number out of free text and compare numerically."""
from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation

# A number as models and GSM8K write it: optional minus (only when it cannot be a binary
# minus such as "12-5"), optional "$", thousands groups or plain digits, optional decimals.
# "5." at the end of a sentence keeps its period out because a decimal part needs a digit.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])-)?\$?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
)
# Markers after which a model states its final answer; the last one wins because
# solutions may quote "the answer is" while reasoning before settling.
_MARKER = re.compile(r"the answer is|####", re.IGNORECASE)
_PLAIN = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_number(s: str) -> str | None:
    """Canonical text of a number ("1,234.50" -> "1234.5", "$5.00" -> "5"), None if not one."""
    t = s.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    if not _PLAIN.fullmatch(t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))  # int() also turns "-0" into "0"
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a solution text, or None when it holds no number."""
    markers = list(_MARKER.finditer(text))
    if markers:
        m = _NUMBER.search(text, markers[-1].end())
        if m:
            return normalize_number(m.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(predict: str | None, label: str) -> bool:
    """Numeric equality of two answers, so "5" == "5.00" and "1,000" == "1000"."""
    if predict is None:
        return False
    p, q = normalize_number(predict), normalize_number(label)
    return p is not None and q is not None and Decimal(p) == Decimal(q)


def majority_vote(predicts: list[str | None]) -> str | None:
    """Most frequent answer (numbers compared after normalising); ties go to the earliest."""
    keys = [normalize_number(p) or p for p in predicts if p is not None]
    if not keys:
        return None
    counts = Counter(keys)
    best = max(counts.values())
    return next(k for k in keys if counts[k] == best)
