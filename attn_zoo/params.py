"""Typed parameter dataclasses: every variant's parameters, checked once at `build()` time."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

BACKENDS = ("auto", "torch", "triton", "flex")


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


def require(condition: bool, name: str, value: Any, expected: str) -> None:
    """Raise `ValueError` naming the parameter and its value unless `condition` holds."""
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclasses.dataclass
class Params:
    """Parameters every variant takes; subclasses add their own fields and `validate()`.

    `backend`: "auto" (fastest correct one for the device), "torch", "triton" or "flex".
    `scale`: score scale; `None` means `head_dim ** -0.5`.
    """

    backend: str = "auto"
    scale: float | None = None

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, hint = getattr(self, field.name), hints[field.name]
            if not _matches(value, hint):
                raise TypeError(f"{field.name} must be {_describe(hint)}, got {value!r}")
        require(self.backend in BACKENDS, "backend", self.backend, "one of " + ", ".join(BACKENDS))
        require(self.scale is None or self.scale > 0, "scale", self.scale, "> 0 or None")
        self.validate()

    def validate(self) -> None:
        """Range checks of the variant's own fields (raise via `require`)."""

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

