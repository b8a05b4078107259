"""Convert the official GSM8K jsonl into the project's {"instruction", "output", "label"} list."""
from __future__ import annotations

import re

from ..evaluation.gsm8k import normalize_number
from ..log import get_logger
from .records import DataError, iter_records, write_json_atomic

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


def convert_gsm8k(src_jsonl: str, dst_json: str) -> int:
    """Convert `src_jsonl` and write `dst_json` atomically; returns the number of problems."""
    converted = [convert_record(record, where) for where, record in iter_records(src_jsonl)]
    write_json_atomic(converted, dst_json)
    get_logger(__name__).info(f"converted {len(converted)} GSM8K problems: {src_jsonl} -> {dst_json}")
    return len(converted)
