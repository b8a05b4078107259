"""What every entry script shares: one-line errors and a non-zero exit for bad input."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

from .log import get_logger

# Errors that mean "the user's input is wrong": reported in one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError)


def run_cli(fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        get_logger().error(f"error: {msg}")
        sys.exit(2)
