"""`local`: sliding-window attention (causal: i - window <= j <= i; else |i - j| <= window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import Pattern, block_sparse_attention, window_key_blocks
from attn_zoo.cache import RingCache, register_cache
from attn_zoo.params import Params, require
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
    def allowed(i: Tensor, j: Tensor) -> Tensor:
        offset = i - j
        return (offset >= 0) & (offset <= window) if causal else offset.abs() <= window

    return allowed


def band_pairs(n: int, reach: int, causal: bool) -> int:
    """Pairs with 0 <= i - j <= reach (causal) or |i - j| <= reach among n positions."""
    head = min(n, reach + 1)
    one_sided = head * (head + 1) // 2 + (n - head) * (reach + 1)
    return one_sided if causal else 2 * one_sided - n


@register("local")
class LocalAttention(Attention):
    """Sliding window: memory O(N * window) through key blocks of the band only."""

    Params = LocalParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def pattern(self, n: int, causal: bool) -> Pattern:
        return local_pattern(self.params.window, causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        n = q.shape[3]
        block, key_blocks = window_key_blocks(n, self.params.window, causal, q.device)
        out, _ = block_sparse_attention(
            q, k, v, key_blocks, self.pattern(n, causal),
            block=block, scale=scale, key_padding_mask=key_padding_mask,
        )
        return out

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
