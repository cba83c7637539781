"""`sparse_strided`: the strided pattern of the Sparse Transformer (Child et al., 2019).

Query i attends to key j when abs(i - j) < stride or abs(i - j) % stride == 0; causal keeps
j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attn_zoo.attention import PatternAttention
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.params import Params, require
from attn_zoo.patterns import (
    Part,
    Pattern,
    and_,
    band,
    band_pairs,
    causal_pattern,
    every_key,
    or_,
    same_residue,
)
from attn_zoo.registry import register


@dataclass
class SparseStridedParams(Params):
    stride: int = 128

    def validate(self) -> None:
        require(self.stride >= 1, "stride", self.stride, ">= 1")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"stride": 4}


def strided_pattern(stride: int, causal: bool) -> Pattern:
    """The band abs(i - j) < stride or a multiple of stride apart; causal keeps j <= i (the
    decoding cache's form)."""
    pattern = or_(band(stride - 1), same_residue(stride))
    return and_(pattern, causal_pattern()) if causal else pattern


@register("sparse_strided")
class SparseStridedAttention(PatternAttention):
    """The band abs(i - j) < stride, plus the strided keys j = i -+ stride, i -+ 2 * stride,
    ... as a second part merged by log-sum-exp.

    The strided keys of i are the other positions of its residue class mod stride, so that
    part is dense attention within each residue class (a subsequence of N / stride): work
    O(N * (stride + N / stride)), the pattern's own size, memory O(N * D) plus a chunk.
    """

    Params = SparseStridedParams
    backends = ("torch", "flex", "triton")
    static_pattern = True
    # A shard longer than the stride reaches every residue class, so gathering its strided
    # keys gathers nearly the whole sequence: twice the all-to-all over heads at 4 ranks.
    parallel = "heads"

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        stride = self.params.stride
        reach = stride - 1
        parts = [Part("band", band(reach), lambda i: (i - reach, i + reach), reach)]
        if n > stride:
            # Indices a, b of one residue class: b == a is the band's diagonal.
            parts.append(Part("strided", lambda a, b: b != a, every_key, -(-n // stride),
                              fold=stride))
        return parts

    def pattern(self, n: int, causal: bool) -> Pattern:
        return self.exact_pattern(n, causal)

    def scored_pairs(self, n: int, causal: bool) -> int:
        stride = self.params.stride
        far = (n - 1) // stride  # offsets stride, 2 * stride, ..., far * stride fit
        one_sided = far * n - stride * far * (far + 1) // 2
        return band_pairs(n, stride - 1, causal) + (one_sided if causal else 2 * one_sided)


# -- decoding cache -------------------------------------------------------------------------


@register_cache("sparse_strided")
class SparseStridedCache(PatternCache):
    """Every past key (the strided keys reach back to position 0); a new row reads the band
    and its strided keys."""

    def pattern(self) -> Pattern:
        return strided_pattern(self.attention.params.stride, True)
