"""The one logger: rank 0 speaks, other ranks only report warnings and errors."""
from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str = "llama_rlhf") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("llama_rlhf").handlers:
        root = logging.getLogger("llama_rlhf")
        handler = logging.StreamHandler(sys.stderr)
        rank = int(os.environ.get("RANK", 0))
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
    return logger
