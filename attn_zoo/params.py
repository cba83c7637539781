"""Typed parameter dataclasses: every variant's parameters, checked once at `build()` time."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

BACKENDS = ("auto", "torch", "triton", "flex")

MAX_INT = 2**31 - 1
"""Upper bound of every integer parameter (sizes in positions, counts, seeds); a variant may
set a tighter one. No sequence is that long, and the product of two parameters
(`window * dilation`, `window_blocks * block`) stays well inside int64 position arithmetic."""


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def at_most(default: int, maximum: int) -> Any:
    """A dataclass field for an integer parameter whose upper bound is tighter than MAX_INT."""
    return dataclasses.field(default=default, metadata={"max": maximum})


def finite(value: float) -> bool:
    """True for a finite number (a Python int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def require(condition: bool, name: str, value: Any, expected: str) -> None:
    """Raise `ValueError` naming the parameter and its value unless `condition` holds."""
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclasses.dataclass
class Params:
    """Parameters every variant takes; subclasses add their own fields and `validate()`.

    `backend`: "auto" (fastest correct one for the device), "torch", "triton" or "flex".
    `scale`: score scale, finite and > 0; `None` means `head_dim ** -0.5`.
    `sinks`: the number of query heads for a learnable sink logit per head (0: none).
    Every integer field is at most `MAX_INT`, or the tighter bound its field sets (`at_most`).
    """

    backend: str = "auto"
    scale: float | None = None
    sinks: int = at_most(0, 1024)

    def __post_init__(self) -> None:
        hints, limits = get_type_hints(type(self)), self.limits()
        for field in dataclasses.fields(self):
            value, hint = getattr(self, field.name), hints[field.name]
            if not _matches(value, hint):
                raise TypeError(f"{field.name} must be {_describe(hint)}, got {value!r}")
            if isinstance(value, int) and field.name in limits:
                require(value <= limits[field.name], field.name, value,
                        f"<= {limits[field.name]}")
        require(self.backend in BACKENDS, "backend", self.backend, "one of " + ", ".join(BACKENDS))
        require(self.scale is None or (finite(self.scale) and self.scale > 0), "scale",
                self.scale, "finite and > 0, or None")
        require(self.sinks >= 0, "sinks", self.sinks, ">= 0 (the number of query heads, 0: none)")
        self.validate()

    def validate(self) -> None:
        """Range checks of the variant's own fields (raise via `require`)."""

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        """Keyword arguments for `build(name, **tiny)` small enough for tests at N <= 128 and
        exercising every part of the variant's pattern (windows shorter than N, global
        tokens, random blocks, several hashes...). A variant with parameters overrides it."""
        return {}

    @classmethod
    def limits(cls) -> dict[str, int]:
        """The upper bound of every integer parameter: MAX_INT unless its field sets one."""
        hints = get_type_hints(cls)
        return {field.name: field.metadata.get("max", MAX_INT) for field in dataclasses.fields(cls)
                if int in (get_args(hints[field.name]) or (hints[field.name],))}

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

