"""GSM8K (Cobbe et al. 2021): grade-school math word problems with a numeric final answer.

Everything the pipeline knows about the task lives here, in the order a sample goes through it:

1. Conversion. The official jsonl has {"question", "answer"}, the answer being a worked
   solution with calculator annotations ("<<48/2=24>>") and a final "#### N" line. The
   converter writes the project's record {"instruction", "output": [solution], "label"}: the
   annotations removed and the last line "Therefore, the answer is N." (what the model learns
   to write, and what `extract_answer` reads back).
2. Prompt. A sample is tokenised in two parts, and every trainer and the evaluator must do it
   the same way:

       prompt ids = tokenizer.encode(format_prompt(instruction), bos=True, eos=False)
       target ids = tokenizer.encode(output, bos=False, eos=False) + [tokenizer.eos_id]

   so the prompt text is the instruction followed by one newline, and the output starts right
   after it. At evaluation the model generates from the prompt ids; the new tokens are decoded
   on their own (EOS dropped), which gives back the output text as trained. The synthetic
   task (data/synthetic.py) writes GSM8K-format records and shares this template.
3. Answer extraction. The number after the last "the answer is" / "####", else the last
   number in the text; normalised ("1,234.50" -> "1234.5"). Evaluation also reports the two
   conventions of the field separately: strict (a marker is required) and flexible (the last
   number, whatever precedes it).
4. Grading. Numeric equality with the label ("5" == "5.00"); `majority_vote` for K samples.
"""
from __future__ import annotations

import os
import random
import re
from collections import Counter
from decimal import Decimal, InvalidOperation

from ..records import DataError, iter_records, write_json_atomic
from ..log import get_logger

# ----------------------------------------------------------------------------- prompt

SEPARATOR = "\n"


def format_prompt(instruction: str) -> str:
    """Prompt text of an instruction: the instruction (trailing whitespace dropped) + a newline."""
    return instruction.rstrip() + SEPARATOR


# ----------------------------------------------------------------------------- answers

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


def extract_strict(text: str) -> str | None:
    """The number right after the last "the answer is" / "####" marker, None without one."""
    markers = list(_MARKER.finditer(text))
    m = _NUMBER.search(text, markers[-1].end()) if markers else None
    return normalize_number(m.group()) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number of the text, None when it holds none."""
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a solution text: strict, else flexible; None without a number."""
    strict = extract_strict(text)
    return strict if strict is not None else extract_flexible(text)


# ----------------------------------------------------------------------------- grading

def is_correct(predict: str | None, label: str) -> bool:
    """Numeric equality of two answers, so "5" == "5.00" and "1,000" == "1000"."""
    if predict is None:
        return False
    p, q = normalize_number(predict), normalize_number(label)
    return p is not None and q is not None and Decimal(p) == Decimal(q)


def grade(text: str, label: str) -> bool:
    """Whether a solution text's final answer equals the label."""
    return is_correct(extract_answer(text), label)


def majority_vote(predicts: list[str | None]) -> str | None:
    """Most frequent answer (numbers compared after normalising); ties go to the earliest."""
    keys = [normalize_number(p) or p for p in predicts if p is not None]
    if not keys:
        return None
    counts = Counter(keys)
    best = max(counts.values())
    return next(k for k in keys if counts[k] == best)


# ----------------------------------------------------------------------------- conversion

# GSM8K solutions carry calculator annotations like "<<48/2=24>>" that the model should
# neither learn nor see; the visible result follows each one, so removal loses nothing.
_CALC = re.compile(r"<<[^<>]*>>")


def convert_record(record: dict, where: str) -> dict:
    """One GSM8K record -> {"instruction", "output": [solution], "label"}."""
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: '{key}' must be a string")
    body, sep, final = record["answer"].rpartition("####")
    if not sep:
        raise DataError(f"{where}: answer has no '#### N' final line")
    label = normalize_number(final)
    if label is None:
        raise DataError(f"{where}: final answer {final.strip()!r} is not a number")
    lines = [line.strip() for line in _CALC.sub("", body).splitlines() if line.strip()]
    lines.append(f"Therefore, the answer is {label}.")
    return {"instruction": record["question"].strip(), "output": ["\n".join(lines)], "label": label}


DEV_SEED = 0  # the dev split is the same on every machine and in every run


def convert_gsm8k(src_jsonl: str, dst_json: str, dev_size: int = 0, dev_json: str | None = None) -> int:
    """Convert `src_jsonl` and write `dst_json` atomically; returns the number of problems there.

    `dev_size` > 0 holds that many problems out into `dev_json` (default: dev.json beside
    `dst_json`), drawn with a fixed seed and kept in file order, for model selection and PPO's
    held-out accuracy, so the test split is left for final numbers."""
    converted = [convert_record(record, where) for where, record in iter_records(src_jsonl)]
    if not 0 <= dev_size < len(converted):
        raise DataError(f"--dev_size {dev_size}: must be >= 0 and below the {len(converted)} problems of {src_jsonl}")
    dev = set(random.Random(DEV_SEED).sample(range(len(converted)), dev_size))
    train = [r for i, r in enumerate(converted) if i not in dev]
    log = get_logger(__name__)
    if dev:
        dev_json = dev_json or os.path.join(os.path.dirname(os.path.abspath(dst_json)), "dev.json")
        write_json_atomic([r for i, r in enumerate(converted) if i in dev], dev_json)
        log.info(f"held out {len(dev)} GSM8K problems of {src_jsonl} -> {dev_json}")
    write_json_atomic(train, dst_json)
    log.info(f"converted {len(train)} GSM8K problems: {src_jsonl} -> {dst_json}")
    return len(train)
