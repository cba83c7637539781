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

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import (
    Pattern,
    block_sparse_attention,
    merge_partial_attentions,
    span_key_blocks,
    tile_block,
)
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.params import Params, require
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
    def allowed(i: Tensor, j: Tensor) -> Tensor:
        pairs = (i // stride == j // stride) | (j % stride >= stride - summary)
        return pairs & (j <= i) if causal else pairs

    return allowed


@register("sparse_fixed")
class SparseFixedAttention(Attention):
    """Own segment through the block-sparse engine, plus the summary columns of the other
    segments as one compact key set (N / stride * summary keys) merged by log-sum-exp.

    Work O(N * (stride + N / stride * summary)), the pattern's own size; memory O(N * D)
    plus one chunk of tiles.
    """

    Params = SparseFixedParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def pattern(self, n: int, causal: bool) -> Pattern:
        return fixed_pattern(self.params.stride, self.params.summary, causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        n, stride, summary = q.shape[3], self.params.stride, self.params.summary
        parts = [self._own_segment(q, k, v, causal, key_padding_mask, scale)]
        # Summary key c sits at position (c // summary) * stride + stride - summary + c % summary.
        n_summary = n // stride * summary + max(0, n % stride - (stride - summary))
        if n_summary:
            index = torch.arange(n_summary, device=q.device)
            positions = index // summary * stride + stride - summary + index % summary

            def other_segments(i: Tensor, c: Tensor) -> Tensor:
                # Summary keys in i's own segment are already in the first part.
                return c // summary < i // stride if causal else c // summary != i // stride

            block = tile_block(n_summary)
            query_blocks = torch.arange(-(-n // block), device=q.device)
            if causal:  # summary keys of the segments before the block's last row
                last_row = (query_blocks * block + block - 1).clamp_max(n - 1)
                last = (last_row // stride * summary - 1).div(block, rounding_mode="floor")
            else:
                last = torch.full_like(query_blocks, (n_summary - 1) // block)
            key_blocks = span_key_blocks(torch.zeros_like(query_blocks), last)
            real = None if key_padding_mask is None else key_padding_mask[:, positions]
            parts.append(block_sparse_attention(
                q, k.index_select(2, positions), v.index_select(2, positions), key_blocks,
                other_segments, block=block, scale=scale, key_padding_mask=real,
            ))
        return merge_partial_attentions(parts)[0]

    def _own_segment(self, q, k, v, causal, key_padding_mask, scale) -> tuple[Tensor, Tensor]:
        """Keys of the query's own segment: (out, lse) like the engine."""
        n, stride = q.shape[3], self.params.stride
        block = tile_block(stride)
        first_row = torch.arange(0, n, block, device=q.device)
        last_row = (first_row + block - 1).clamp_max(n - 1)
        first_key = first_row // stride * stride
        last_key = last_row if causal else ((last_row // stride + 1) * stride).clamp_max(n) - 1
        key_blocks = span_key_blocks(first_key // block, last_key // block)

        def same_segment(i: Tensor, j: Tensor) -> Tensor:
            pairs = i // stride == j // stride
            return pairs & (j <= i) if causal else pairs

        return block_sparse_attention(q, k, v, key_blocks, same_segment, block=block,
                                      scale=scale, key_padding_mask=key_padding_mask)

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
