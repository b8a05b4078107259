"""What every entry script shares: flags -> config, one-line errors and exit 2 for bad input.

    main = command(SFTConfig, train_sft, __doc__)   # in solver_train.py
    fire.Fire(main)

`command` gives `main` the config's fields as its typed signature (what `--help` shows and
fire parses), so each flag is spelled once, in the config dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from typing import Any, Callable

from .config import from_flags
from .errors import UsageError
from .log import get_logger


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(...)`; a UsageError is logged as one line and exits 2. Other errors are bugs: they
    keep their traceback."""
    try:
        return fn(*args, **kwargs)
    except UsageError as e:
        get_logger().error(f"error: {e}")
        sys.exit(2)


def command(config_cls: type, fn: Callable[[Any], Any], doc: str = "") -> Callable[..., Any]:
    """An entry point `main(**flags)`: builds `config_cls` from the flags and calls `fn(cfg)`,
    both inside `run_cli`. `doc`: the script's docstring, shown by `--help`."""
    def main(**flags: Any) -> Any:
        return run_cli(lambda: fn(from_flags(config_cls, flags)))

    hints = typing.get_type_hints(config_cls)
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                **({} if f.default is dataclasses.MISSING else {"default": f.default}))
              for f in dataclasses.fields(config_cls) if f.init]
    main.__signature__ = inspect.Signature(params, return_annotation=None)
    main.__doc__ = doc or fn.__doc__
    main.__name__ = "main"
    return main
