"""Key/value caches for incremental (causal) decoding, one cache class per attention variant.

A self-attention layer's cache lives through one generation:

    cache = cache_for(attention)           # None: the variant has no cache (decode uncached)
    out = attention(q, k, v, causal=True)  # prefill: the prompt through the variant itself,
    cache.prefill(k, v)                    # then its keys/values go into the cache
    out = cache.step(q1, k1, v1)           # each new position, (B, H, 1, D), against the cache

`step` returns exactly what the variant computes for that last position of the whole
sequence (up to float rounding). Keys arrive as the attention sees them, i.e. after RoPE.
A variant gets a cache by registering a `KVCache` subclass (`fill`, `append`, `__len__`) under
its name, in its own file:

    @register_cache("myvariant")
    class MyCache(KVCache): ...

A cache whose newest query also reads pooled keys (hierarchical, compressive) overrides `step`
(and `reorder` for any extra state). A variant without a cache makes `cache_for` return None,
and generation then re-runs the whole prefix every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.registry import build

_CACHES: dict[str, type[KVCache]] = {}

C = TypeVar("C", bound="type[KVCache]")


def register_cache(name: str) -> Callable[[C], C]:
    """Class decorator: `cache_for` an attention registered as `name` builds this class."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, KVCache)):
            raise TypeError(f"register_cache({name!r}): {cls!r} is not a subclass of KVCache")
        if name in _CACHES:
            raise ValueError(f"register_cache({name!r}): the name is already taken by "
                             f"{_CACHES[name].__qualname__}")
        _CACHES[name] = cls
        return cls

    return decorator


def cache_for(attention: Attention) -> KVCache | None:
    """A fresh, empty cache for causal decoding with `attention`; None if its variant has none."""
    cls = _CACHES.get(type(attention).name)
    return None if cls is None else cls(attention)


class KVCache(ABC):
    """Keys and values of one causal self-attention layer, for decoding one position at a time.

    Buffers `k`, `v`: (B, Hkv, capacity, D), positions in the first `len(self)` slots (their
    order is the subclass's business: softmax attention does not depend on the key order).
    `seen`: positions consumed so far (prompt + generated); the next one is at `seen`.
    """

    def __init__(self, attention: Attention) -> None:
        # The decode step is plain softmax attention over the kept keys, at the variant's scale.
        self.attend = build("full", scale=attention.params.scale)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.seen = 0

    @abstractmethod
    def __len__(self) -> int:
        """Number of positions currently held."""

    @abstractmethod
    def fill(self, k: Tensor, v: Tensor) -> None:
        """Store what decoding needs of the prompt's keys/values (B, Hkv, P, D)."""

    @abstractmethod
    def append(self, k: Tensor, v: Tensor) -> None:
        """Store the keys/values (B, Hkv, 1, D) of position `seen` (the caller then advances it)."""

    def prefill(self, k: Tensor, v: Tensor) -> None:
        """Take the keys/values (B, Hkv, P, D) of a whole prompt (positions 0 .. P - 1)."""
        if self.seen:
            raise ValueError(f"prefill needs an empty cache, got one at position {self.seen}")
        self.fill(k, v)
        self.seen = k.shape[2]

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Output (B, Hq, 1, D) of the query at position `seen` (k, v: (B, Hkv, 1, D))."""
        if self.seen == 0:
            raise ValueError("step needs a prefilled cache, got an empty one")
        if q.shape[2] != 1 or k.shape[2] != 1:
            raise ValueError(f"a cache step takes one position, got q {tuple(q.shape)} and "
                             f"k {tuple(k.shape)}")
        self.append(k, v)
        self.seen += 1
        held = len(self)
        # Every held key is allowed for the newest query, so no causal mask is needed.
        return self.attend(q, self.k[:, :, :held], self.v[:, :, :held])

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order (beam search; may repeat rows)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


@register_cache("full")
class FullCache(KVCache):
    """Every past key: grows with the sequence (capacity doubles, so appends are amortised O(1))."""

    def __len__(self) -> int:
        return self.seen

    def fill(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def append(self, k: Tensor, v: Tensor) -> None:
        if self.seen == self.k.shape[2]:
            self.k, self.v = (torch.cat([x, torch.empty_like(x)], dim=2) for x in (self.k, self.v))
        self.k[:, :, self.seen] = k[:, :, 0]
        self.v[:, :, self.seen] = v[:, :, 0]


@register_cache("local")
class LocalCache(KVCache):
    """Rolling buffer of the last `window + 1` positions: memory independent of the length.

    Position p lives in slot `p % (window + 1)`, so after a step the buffer holds exactly the
    keys `seen - 1 - window .. seen - 1` that causal `local` lets the newest query see.
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__(attention)
        self.slots = attention.params.window + 1

    def __len__(self) -> int:
        return min(self.seen, self.slots)

    def fill(self, k: Tensor, v: Tensor) -> None:
        batch, heads, length, dim = k.shape
        self.k, self.v = (x.new_zeros(batch, heads, self.slots, dim) for x in (k, v))
        kept = torch.arange(max(0, length - self.slots), length, device=k.device)
        self.k[:, :, kept % self.slots] = k[:, :, kept]
        self.v[:, :, kept % self.slots] = v[:, :, kept]

    def append(self, k: Tensor, v: Tensor) -> None:
        slot = self.seen % self.slots
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]


class CrossKV:
    """Keys/values (B, Hkv, M, D) of a cross-attention's context, projected once per generation."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class DecodeCache:
    """The caches of a whole model: one `KVCache` per layer, one `CrossKV` per layer with
    cross-attention (encoder-decoder), all at the same position `seen`."""

    def __init__(self, layers: list[KVCache], cross: list[CrossKV] | None = None) -> None:
        self.layers = layers
        self.cross = cross

    @classmethod
    def for_attentions(cls, attentions: list[Attention], cross: bool = False) -> DecodeCache | None:
        """Caches for these self-attentions (one per layer); None if any variant has no cache."""
        layers = [cache_for(attention) for attention in attentions]
        if any(layer is None for layer in layers):
            return None
        return cls(layers, [CrossKV() for _ in layers] if cross else None)

    @property
    def seen(self) -> int:
        """Positions consumed so far; the next token is at this position."""
        return self.layers[0].seen

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order, in every layer."""
        for cache in [*self.layers, *(self.cross or [])]:
            cache.reorder(index)
