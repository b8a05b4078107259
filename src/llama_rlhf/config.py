"""Flags -> typed config dataclasses, once for every entry script.

Each objective has one dataclass (`SFTConfig`, `PPOConfig`, ...) whose fields are its flags:
name, type, default and, in `flag(...)` metadata, the allowed choices or that the value is a
path that must exist. `from_flags` converts what `fire` hands over (strings, ints, bools),
checks choices and paths, and raises `UsageError` naming the flag, so a bad value is one line.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Optional, Sequence

from .errors import MissingPathError, UsageError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(default: Any = dataclasses.MISSING, *, choices: Optional[Sequence] = None,
         path: Optional[str] = None) -> Any:
    """A config field. `choices`: allowed values. `path`: "file", "dir" or "any" -- the value
    (when not None) must exist as such."""
    meta = {"choices": tuple(choices) if choices else None, "path": path}
    return dataclasses.field(default=default, metadata=meta)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X`, `Optional[X]` or `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(tp))
    return tp, False


def convert(name: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int / float / bool / str, optionally None), or UsageError."""
    inner, nullable = _optional(tp)
    if value is None or (nullable and isinstance(value, str) and value.lower() == "none"):
        if nullable:
            return None
        raise UsageError(f"--{name} needs a value")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise UsageError(f"--{name} must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UsageError(f"--{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} must be an integer, got {value!r}") from None
    if inner is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} must be a number, got {value!r}") from None
    if isinstance(value, (list, tuple, dict)):
        raise UsageError(f"--{name} must be a single value, got {value!r}")
    return str(value)


def _check(name: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UsageError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    kind = meta.get("path")
    if kind == "file" and not os.path.isfile(value) or kind == "dir" and not os.path.isdir(value) \
            or kind == "any" and not os.path.exists(value):
        what = {"file": "file", "dir": "directory"}.get(kind, "file or directory")
        raise MissingPathError(f"--{name} {value}: no such {what}")


def from_flags(cls: type, flags: dict) -> Any:
    """An instance of the dataclass `cls` from flag values; unknown or missing flags, bad
    types, choices and paths are UsageErrors. Checks across fields are the config's own
    `validate()`, which the function it is handed to calls first (library callers build
    configs directly), so they run once."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(flags) - set(fields))
    if unknown:
        raise UsageError(f"unknown flag --{unknown[0]} (see --help)")
    hints = typing.get_type_hints(cls)
    kw = {}
    for name, f in fields.items():
        if name not in flags:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"--{name} is required")
            continue
        kw[name] = convert(name, flags[name], hints[name])
        _check(name, kw[name], f.metadata)
    return cls(**kw)
