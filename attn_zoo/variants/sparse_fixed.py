"""`sparse_fixed`: the fixed pattern of the Sparse Transformer (Child et al., 2019).

Query i attends to key j when i // stride == j // stride (its own segment), or when
j % stride >= stride - summary (the summary columns closing every segment); causal keeps
j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_zoo.attention import PatternAttention
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.params import Params, require
from attn_zoo.patterns import (
    Part,
    Pattern,
    Pool,
    Pooled,
    and_,
    block_band,
    causal_pattern,
    every_key,
    or_,
)
from attn_zoo.registry import register


@dataclass
class SparseFixedParams(Params):
    stride: int = 128
    summary: int = 8

    def validate(self) -> None:
        require(self.stride >= 1, "stride", self.stride, ">= 1")
        require(1 <= self.summary <= self.stride, "summary", self.summary,
                f"between 1 and stride ({self.stride})")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"stride": 5, "summary": 2}


def fixed_pattern(stride: int, summary: int, causal: bool) -> Pattern:
    """Own segment or a summary column; causal keeps j <= i (the decoding cache's form)."""
    pattern = or_(block_band(stride, 0), summary_columns(stride, summary))
    return and_(pattern, causal_pattern()) if causal else pattern


def summary_columns(stride: int, summary: int) -> Pattern:
    """j % stride >= stride - summary: the last `summary` keys of every segment."""
    return lambda i, j: j % stride >= stride - summary


@register("sparse_fixed")
class SparseFixedAttention(PatternAttention):
    """Own segment, plus the summary columns of the other segments as one compact key set
    (N / stride * summary keys) merged by log-sum-exp.

    Work O(N * (stride + N / stride * summary)), the pattern's own size; memory O(N * D)
    plus one chunk of tiles.
    """

    Params = SparseFixedParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        stride, summary = self.params.stride, self.params.summary

        def segment(i: Tensor) -> tuple[Tensor, Tensor]:
            start = i // stride * stride
            return start, start + stride - 1

        parts = [Part("segment", block_band(stride, 0), segment, stride)]
        # Summary key c sits at position (c // summary) * stride + stride - summary + c % summary.
        n_summary = n // stride * summary + max(0, n % stride - (stride - summary))
        if n_summary:
            def position(c: Tensor) -> Tensor:
                return c // summary * stride + stride - summary + c % summary

            def pool(k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Pooled:
                positions = position(torch.arange(n_summary, device=k.device))
                real = None if key_padding_mask is None else key_padding_mask[:, positions]
                return Pooled(k.index_select(2, positions), v.index_select(2, positions),
                                  None, real)

            def other_segments(i: Tensor, c: Tensor) -> Tensor:
                # Summary keys in i's own segment are already in the first part.
                return c // summary != i // stride

            parts.append(Part("summary", other_segments, every_key, n_summary,
                              pool=Pool(pool, position)))
        return parts

    def pattern(self, n: int, causal: bool) -> Pattern:
        p = self.params
        return fixed_pattern(p.stride, p.summary, causal)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        # The kernel reads the summary columns in place: one layout over the whole pattern.
        return self.triton_attention(q, k, v, "pattern", self.pattern(q.shape[3], causal),
                                     causal, key_padding_mask, scale)

    def scored_pairs(self, n: int, causal: bool) -> int:
        stride, summary = self.params.stride, self.params.summary
        full, rest = divmod(n, stride)
        rest_summary = max(0, rest - (stride - summary))
        if causal:  # own segment up to i, plus every summary key of the earlier segments
            own = full * stride * (stride + 1) // 2 + rest * (rest + 1) // 2
            return own + summary * (stride * full * (full - 1) // 2 + rest * full)
        total = full * summary + rest_summary
        own = full * stride * stride + rest * rest
        return own + full * stride * (total - summary) + rest * (total - rest_summary)


# -- decoding cache -------------------------------------------------------------------------


@register_cache("sparse_fixed")
class SparseFixedCache(PatternCache):
    """Every past key (the summary columns reach back to position 0); a new row reads its own
    segment and every earlier summary column."""

    def pattern(self) -> Pattern:
        p = self.attention.params
        return fixed_pattern(p.stride, p.summary, True)
