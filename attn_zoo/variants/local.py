"""`local`: sliding-window attention (causal: i - window <= j <= i; else |i - j| <= window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attn_zoo.attention import Attention, PatternAttention
from attn_zoo.cache import RingCache, register_cache
from attn_zoo.params import Params, require
from attn_zoo.patterns import Part, Pattern, and_, band, band_pairs, causal_pattern
from attn_zoo.registry import register


@dataclass
class LocalParams(Params):
    window: int = 256

    def validate(self) -> None:
        require(self.window >= 0, "window", self.window, ">= 0")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"window": 5}


def local_pattern(window: int, causal: bool) -> Pattern:
    """The band abs(i - j) <= window; causal keeps j <= i (the decoding cache's form)."""
    return and_(band(window), causal_pattern()) if causal else band(window)


@register("local")
class LocalAttention(PatternAttention):
    """Sliding window: memory O(N * window) through key blocks of the band only."""

    Params = LocalParams
    backends = ("torch", "flex", "triton")
    static_pattern = True
    relative_parts = True

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        window = self.params.window
        return [Part("band", band(window), lambda i: (i - window, i + window), window)]

    def pattern(self, n: int, causal: bool) -> Pattern:
        return self.exact_pattern(n, causal)

    def scored_pairs(self, n: int, causal: bool) -> int:
        return band_pairs(n, self.params.window, causal)


# -- decoding cache -------------------------------------------------------------------------


@register_cache("local")
class LocalCache(RingCache):
    """Rolling buffer of the last `window + 1` positions: memory independent of the length
    (a new row needs keys back to its position - window only)."""

    bounded = True

    def __init__(self, attention: Attention) -> None:
        super().__init__(attention, sinks=0, ring=attention.params.window + 1)

    def pattern(self) -> Pattern:
        return local_pattern(self.attention.params.window, True)
