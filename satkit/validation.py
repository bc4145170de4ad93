"""Declared valid values of a dataclass's fields, and their check: what every options object uses.

Apart from config.py so that modules config.py imports can use it without an import circle.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field, fields
from typing import Any, Sequence

from satkit.infra.runtime import UserError

__all__ = ["option", "check_fields"]


def option(default: Any = dataclasses.MISSING, *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its valid values: choices, or bounds min <= x <= max, above < x < below.
    Without a default the field is required (a command's required flag)."""
    # A registry (a dict) is kept as it is, so that names registered later are valid choices too.
    meta = {"choices": choices if isinstance(choices, dict) else tuple(choices) if choices else None,
            "min": min, "max": max, "above": above, "below": below}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def check_fields(obj: Any, as_flags: bool = False, prefix: str | None = None) -> None:
    """Raise UserError naming the first field of dataclass `obj` outside its declared choices or bounds,
    as `config key`, with as_flags as the command-line flag `--key`, or with a prefix as `{prefix}key`
    (satkit.serve's form fields). None (unset, the owner fills in its default later) is not checked."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        label = (f"{prefix}{f.name}" if prefix is not None else f"--{f.name.replace('_', '-')}" if as_flags
                 else f"config {f.name}")
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"{label}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{label}={value} must be a finite number")
        for name, ok, text in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                               ("above", lambda v, b: v > b, ">"), ("below", lambda v, b: v < b, "<")):
            if name in meta and not ok(value, meta[name]):
                raise UserError(f"{label}={value} must be {text} {meta[name]}")
