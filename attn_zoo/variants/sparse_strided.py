"""`sparse_strided`: the strided pattern of the Sparse Transformer (Child et al., 2019).

Query i attends to key j when abs(i - j) < stride or abs(i - j) % stride == 0; causal keeps
j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import (
    Pattern,
    block_sparse_attention,
    fold_residues,
    merge_partial_attentions,
    span_key_blocks,
    tile_block,
    unfold_residues,
    window_key_blocks,
)
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.params import Params, require
from attn_zoo.registry import register
from attn_zoo.variants.local import band_pairs, local_pattern


@dataclass
class SparseStridedParams(Params):
    stride: int = 128

    def validate(self) -> None:
        require(self.stride >= 1, "stride", self.stride, ">= 1")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"stride": 4}


def strided_pattern(stride: int, causal: bool) -> Pattern:
    def allowed(i: Tensor, j: Tensor) -> Tensor:
        offset = i - j
        pairs = (offset.abs() < stride) | (offset % stride == 0)
        return pairs & (offset >= 0) if causal else pairs

    return allowed


@register("sparse_strided")
class SparseStridedAttention(Attention):
    """The band abs(i - j) < stride through the block-sparse engine, plus the strided keys
    j = i -+ stride, i -+ 2 * stride, ... as a second partial attention merged by log-sum-exp.

    The strided keys of i are the other positions of its residue class mod stride, so that
    part is dense attention within each residue class (a subsequence of N / stride): work
    O(N * (stride + N / stride)), the pattern's own size, memory O(N * D) plus a chunk.
    """

    Params = SparseStridedParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def pattern(self, n: int, causal: bool) -> Pattern:
        return strided_pattern(self.params.stride, causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        n, stride = q.shape[3], self.params.stride
        block, key_blocks = window_key_blocks(n, stride - 1, causal, q.device)
        parts = [block_sparse_attention(q, k, v, key_blocks, local_pattern(stride - 1, causal),
                                        block=block, scale=scale,
                                        key_padding_mask=key_padding_mask)]
        if n > stride:
            parts.append(self._strided(q, k, v, causal, key_padding_mask, scale))
        return merge_partial_attentions(parts)[0]

    def _strided(self, q, k, v, causal, key_padding_mask, scale) -> tuple[Tensor, Tensor]:
        """Keys at offsets that are nonzero multiples of stride: (out, lse) like the engine."""
        n, stride = q.shape[3], self.params.stride
        if key_padding_mask is None and n % stride:
            key_padding_mask = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        real = None if key_padding_mask is None else fold_residues(key_padding_mask, stride, 1)
        length = -(-n // stride)
        block = tile_block(length)
        query_blocks = torch.arange(-(-length // block), device=q.device)
        last = torch.full_like(query_blocks, len(query_blocks) - 1)
        key_blocks = span_key_blocks(torch.zeros_like(query_blocks),
                                     query_blocks if causal else last)

        def other_members(a: Tensor, b: Tensor) -> Tensor:
            # Positions a, b of one residue class: b == a is the band's diagonal.
            return b < a if causal else b != a

        out, lse = block_sparse_attention(
            fold_residues(q, stride, 3), fold_residues(k, stride, 2),
            fold_residues(v, stride, 2), key_blocks, other_members,
            block=block, scale=scale, key_padding_mask=real,
        )
        return unfold_residues(out, stride, 3, n), unfold_residues(lse, stride, 3, n)

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
