"""`longformer`: a dilated sliding window plus global tokens (Beltagy et al., 2020).

Query i attends to key j when abs(i - j) <= window * dilation and (i - j) % dilation == 0,
and to every key when i < n_global or j < n_global; causal keeps j <= i.
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
from attn_zoo.cache import RingCache, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.registry import register
from attn_zoo.variants.local import local_pattern

MAX_DILATION = 1024
"""Upper bound of `dilation`: the torch engine folds the sequence into `dilation` residue
classes, padded to equal length (Longformer uses 1-3)."""


@dataclass
class LongformerParams(Params):
    window: int = 256
    dilation: int = at_most(1, MAX_DILATION)
    n_global: int = 0

    def validate(self) -> None:
        require(self.window >= 0, "window", self.window, ">= 0")
        require(self.dilation >= 1, "dilation", self.dilation, ">= 1")
        require(self.n_global >= 0, "n_global", self.n_global, ">= 0")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"window": 3, "dilation": 2, "n_global": 2}


def dilated_band(window: int, dilation: int) -> Pattern:
    """abs(i - j) <= window * dilation and (i - j) % dilation == 0 (both directions)."""

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        offset = i - j
        return (offset.abs() <= window * dilation) & (offset % dilation == 0)

    return allowed


def longformer_pattern(window: int, dilation: int, n_global: int, causal: bool) -> Pattern:
    band = dilated_band(window, dilation)

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        pairs = band(i, j) | (i < n_global) | (j < n_global)
        return pairs & (j <= i) if causal else pairs

    return allowed


def longformer_pairs(n: int, window: int, dilation: int, n_global: int, causal: bool) -> int:
    """Allowed pairs of `longformer_pattern`, one term per band offset: O(window)."""
    n_global = min(n_global, n)
    global_rows = n_global * (n_global + 1) // 2 if causal else n_global * n
    pairs = global_rows + (n - n_global) * n_global
    reach = min(window, (n - 1) // dilation)
    for step in range(0 if causal else -reach, reach + 1):
        offset = step * dilation  # pairs (i, i - offset) with both in 0 .. n - 1
        first, end = max(0, offset), n + min(0, offset)
        # Of those, the ones with i < n_global or j < n_global are counted above already.
        with_global = max(0, min(end, n_global + first) - first)
        pairs += end - first - with_global
    return pairs


@register("longformer")
class LongformerAttention(Attention):
    """Dilated window + global tokens: O(N * (window + n_global)) work and memory.

    Each residue class mod `dilation` is an ordinary window over a strided subsequence,
    so a dilated band costs what an undilated one does. Keys j < n_global outside the band
    are a second partial attention merged by log-sum-exp; the global rows i < n_global,
    which see every key, run apart so the other rows' key-block tables stay narrow.
    """

    Params = LongformerParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def pattern(self, n: int, causal: bool) -> Pattern:
        p = self.params
        return longformer_pattern(p.window, p.dilation, p.n_global, causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        n, p = q.shape[3], self.params
        n_global = min(p.n_global, n)
        parts = [self._band(q, k, v, causal, key_padding_mask, scale)]
        if n_global == 0:
            return parts[0][0]
        # Keys j < n_global outside the band: disjoint from it, so the merge is exact.
        band = dilated_band(p.window, p.dilation)

        def global_keys(i: Tensor, j: Tensor) -> Tensor:
            pairs = (j < n_global) & ~band(i, j)
            return pairs & (j <= i) if causal else pairs

        block = tile_block(n_global)
        query_blocks = torch.arange(-(-n // block), device=q.device)
        last = torch.full_like(query_blocks, (n_global - 1) // block)
        key_blocks = span_key_blocks(torch.zeros_like(query_blocks),
                                     last.minimum(query_blocks) if causal else last)
        parts.append(block_sparse_attention(q, k, v, key_blocks, global_keys, block=block,
                                            scale=scale, key_padding_mask=key_padding_mask))
        out = merge_partial_attentions(parts)[0]
        rows = self._global_rows(q, k, v, n_global, causal, key_padding_mask, scale)
        return torch.cat([rows, out[:, :, :, n_global:]], dim=3)

    def _band(self, q, k, v, causal, key_padding_mask, scale) -> tuple[Tensor, Tensor]:
        """The dilated band alone: (out (B, Hkv, G, N, D), lse (B, Hkv, G, N))."""
        n, window, dilation = q.shape[3], self.params.window, self.params.dilation
        if key_padding_mask is None and n % dilation:
            key_padding_mask = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        real = None if key_padding_mask is None else fold_residues(key_padding_mask,
                                                                   dilation, 1)
        length = -(-n // dilation)
        block, key_blocks = window_key_blocks(length, window, causal, q.device)
        out, lse = block_sparse_attention(
            fold_residues(q, dilation, 3), fold_residues(k, dilation, 2),
            fold_residues(v, dilation, 2), key_blocks, local_pattern(window, causal),
            block=block, scale=scale, key_padding_mask=real,
        )
        return unfold_residues(out, dilation, 3, n), unfold_residues(lse, dilation, 3, n)

    def _global_rows(self, q, k, v, n_global, causal, key_padding_mask, scale) -> Tensor:
        """Rows i < n_global, which see every key: (B, Hkv, G, n_global, D)."""
        n = q.shape[3]
        block = tile_block(n_global)
        query_blocks = torch.arange(-(-n_global // block), device=q.device)
        last = torch.full_like(query_blocks, -(-n // block) - 1)
        key_blocks = span_key_blocks(torch.zeros_like(query_blocks),
                                     last.minimum(query_blocks) if causal else last)
        out, _ = block_sparse_attention(
            q[:, :, :, :n_global], k, v, key_blocks, self.pattern(n, causal),
            block=block, scale=scale, key_padding_mask=key_padding_mask,
        )
        return out

    def scored_pairs(self, n: int, causal: bool) -> int:
        p = self.params
        return longformer_pairs(n, p.window, p.dilation, p.n_global, causal)


# -- decoding cache -------------------------------------------------------------------------


@register_cache("longformer")
class LongformerCache(RingCache):
    """The `n_global` global tokens kept as sinks plus a rolling buffer of the last
    `window * dilation + 1` positions (the reach of the dilated band; the band's dilation is
    applied by the pattern): memory independent of the length. A global row i < n_global sees
    every key up to itself, all of them sinks."""

    bounded = True

    def __init__(self, attention: Attention) -> None:
        p = attention.params
        super().__init__(attention, sinks=p.n_global, ring=p.window * p.dilation + 1)

    def pattern(self) -> Pattern:
        p = self.attention.params
        return longformer_pattern(p.window, p.dilation, p.n_global, True)
