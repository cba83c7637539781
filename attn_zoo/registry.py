"""Name -> attention class registry: `register`, `available`, `build`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from attn_zoo.attention import Attention

_REGISTRY: dict[str, type[Attention]] = {}

A = TypeVar("A", bound="type[Attention]")


def register(name: str):
    """Class decorator: make an `Attention` subclass buildable as `build(name, ...)`."""
    from attn_zoo.attention import Attention

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"register({name!r}): {cls!r} is not a subclass of attn_zoo.Attention")
        # The capability flags name the methods they promise.
        promised = [f"_forward_{backend}" for backend in cls.backends]
        promised += ["pattern"] * cls.static_pattern + ["exact_pattern"] * cls.pooled_keys
        missing = [*sorted(cls.__abstractmethods__),
                   *(method for method in promised if not callable(getattr(cls, method, None)))]
        if missing:
            raise TypeError(f"register({name!r}): {cls.__qualname__} lacks {', '.join(missing)}")
        if "flex" in cls.backends and not cls.static_pattern:
            raise TypeError(f"register({name!r}): backend 'flex' runs `pattern`, but "
                            f"{cls.__qualname__} does not declare static_pattern = True")
        if name in _REGISTRY:
            raise ValueError(
                f"register({name!r}): the name is already taken by {_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Sorted names of every registered attention variant."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Attention]:
    """The class registered as `name`; a `ValueError` listing the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, **params: Any) -> Attention:
    """Instantiate the variant `name` with its parameters (defaults apply; the README's contract
    section lists them)."""
    return get(name)(**params)
