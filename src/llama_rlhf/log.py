"""The one logger: rank 0 speaks; other ranks report errors only.

Every rank runs the same code on the same data, so an info line or a warning (truncated
sequences, a resumed run) would otherwise appear once per rank; an error can be local to one
rank, so every rank still reports its own. The rank is asked at each record, not once, because
a logger made before the process group exists must still follow it afterwards.
"""
from __future__ import annotations

import logging
import os
import sys

from . import parallel

_ROOT = "llama_rlhf"


def _rank() -> int:
    # torchrun's RANK is there before the process group; in-process groups (tests) set only the group.
    return parallel.rank() if parallel.is_distributed() else int(os.environ.get("RANK", 0))


class _RankZero(logging.Filter):
    """Passes everything on rank 0 and only errors elsewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _rank() == 0


_FILTER = _RankZero()


def get_logger(name: str = _ROOT) -> logging.Logger:
    """The project logger `name` (under "llama_rlhf"): INFO and up on rank 0, errors elsewhere."""
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{_rank()}] %(message)s", "%H:%M:%S"))
        # On the handler too, for loggers made with logging.getLogger rather than get_logger.
        handler.addFilter(_FILTER)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    logger = logging.getLogger(name)
    # A logger's filters see the records made on it, before any handler (ours or a test's) does.
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
