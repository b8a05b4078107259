"""Reading record files (a JSON list or JSONL) with errors that point at the bad line."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError


class DataError(UsageError):
    """Bad input data; the message names the file and the line or record index."""


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield (location, record); location ("file:LINE" or "file: record INDEX") is for errors.

    A file whose first non-blank character is "[" is one JSON list, anything else is JSONL
    (blank lines skipped, but still counted so line numbers match an editor's)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{p}: empty file, no records")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        located = ((f"{p}: record index {i}", r) for i, r in enumerate(records))
    else:
        located = ((f"{p}:{n}", _parse_json(line, f"{p}:{n}"))
                   for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def load_records(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """All records of a JSON list / JSONL file, each checked to hold the `required` keys."""
    records = []
    for where, record in iter_records(path):
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{where}: record is missing key(s) {', '.join(missing)}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a torn one."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
