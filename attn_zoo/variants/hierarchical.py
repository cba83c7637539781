"""`hierarchical`: exact attention near the query, one pooled key per block farther away.

Positions fall into blocks of `block` (the last one may be partial), I = i // block. Query i
attends exactly to the keys of the blocks J with abs(I - J) <= window_blocks (causal:
I - window_blocks <= J <= I, and j <= i), and to every other block J (causal:
J < I - window_blocks) as one pooled key/value: the mean of its keys and of its values, scored
`scale * q·k_mean + log(block_len)`, so a far block weighs as its block_len keys would if they
all equalled their mean. With a key padding mask a block pools its real keys only (block_len =
their count) and a block without any is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attn_zoo.attention import Attention, PatternAttention
from attn_zoo.cache import RingCache, register_cache, split_at_multiples
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
)
from attn_zoo.registry import register


@dataclass
class HierarchicalParams(Params):
    block: int = 64
    window_blocks: int = 2

    def validate(self) -> None:
        require(self.block >= 1, "block", self.block, ">= 1")
        require(self.window_blocks >= 0, "window_blocks", self.window_blocks, ">= 0")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"block": 3, "window_blocks": 1}


def hierarchical_exact_pattern(block: int, window_blocks: int, causal: bool) -> Pattern:
    """Pairs (i, j) scored exactly: j in a block within `window_blocks` of i's block; causal
    keeps j <= i (the decoding cache's form)."""
    pattern = block_band(block, window_blocks)
    return and_(pattern, causal_pattern()) if causal else pattern


def block_means(x: Tensor, real: Tensor | None, block: int) -> tuple[Tensor, Tensor]:
    """Mean of each block's real rows, and their count.

    x: (B, H, N, D); real: (B, N) bool or None (every row real). Returns the means
    (B, H, ceil(N / block), D), zero for a block without real rows, and the counts
    (B or 1, ceil(N / block)) in x's dtype.
    """
    batch, heads, n, dim = x.shape
    missing = -n % block
    if real is None:
        real = torch.ones(1, n, dtype=torch.bool, device=x.device)
    else:  # where, not a product: padded rows may hold anything, inf included
        x = torch.where(real[:, None, :, None], x, 0.0)
    sums = F.pad(x, (0, 0, 0, missing)).view(batch, heads, -1, block, dim).sum(3)
    counts = F.pad(real, (0, missing)).view(real.shape[0], -1, block).sum(2).to(x.dtype)
    return sums / counts.clamp_min(1)[:, None, :, None], counts


@register("hierarchical")
class HierarchicalAttention(PatternAttention):
    """Window of blocks, plus the N / block pooled keys (their log(block_len) as a per-key
    score bias) as a second part, merged by log-sum-exp.

    Work O(N * ((2 * window_blocks + 1) * block + N / block)), the pattern's own count;
    memory O(N * D) plus one chunk of tiles.
    """

    Params = HierarchicalParams
    backends = ("torch", "triton")
    pooled_keys = True

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        block, window_blocks = self.params.block, self.params.window_blocks

        def window(i: Tensor) -> tuple[Tensor, Tensor]:
            own = i // block
            return (own - window_blocks) * block, (own + window_blocks + 1) * block - 1

        def far(i: Tensor, pooled: Tensor) -> Tensor:  # pooled key J stands for block J
            return (i // block - pooled).abs() > window_blocks

        parts = [Part("window", block_band(block, window_blocks), window, block)]
        n_blocks = -(-n // block)
        if n_blocks - 1 > window_blocks:  # some query has a block outside its window
            pool = Pool(self._pool, lambda pooled: pooled * block + block - 1, group=block)
            parts.append(Part("pooled", far, every_key, n_blocks, pool=pool))
        return parts

    def _pool(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Pooled:
        """One key per block: the means of its real keys and values, scored + log(count)."""
        block = self.params.block
        pooled_k, counts = block_means(k, key_padding_mask, block)
        pooled_v, _ = block_means(v, key_padding_mask, block)
        return Pooled(pooled_k, pooled_v, counts.clamp_min(1).log(),
                          None if key_padding_mask is None else counts > 0)

    def scored_pairs(self, n: int, causal: bool) -> int:
        block, window_blocks = self.params.block, self.params.window_blocks
        n_blocks = -(-n // block)
        pairs = 0
        for i in range(n_blocks):
            rows = min(block, n - i * block)
            first = max(0, i - window_blocks)
            if causal:  # row r of the block sees keys first * block ... i * block + r
                pairs += rows * (i - first) * block + rows * (rows + 1) // 2 + rows * first
            else:
                last = min(n_blocks - 1, i + window_blocks)
                exact = min(n, (last + 1) * block) - first * block
                pairs += rows * (exact + n_blocks - (last - first + 1))
        return pairs


# -- decoding cache -------------------------------------------------------------------------


@register_cache("hierarchical")
class HierarchicalCache(RingCache):
    """The exact window, a rolling buffer of the last (window_blocks + 1) * block positions,
    plus one pooled key/value per older block (their means, scored with + log(block), as the
    forward scores a complete far block): the pooled part grows by one key per block.

    New positions are taken block by block: when block I starts, block I - window_blocks - 1
    leaves the window and is pooled, exactly as the forward pools it.
    """

    def __init__(self, attention: Attention) -> None:
        p = attention.params
        super().__init__(attention, sinks=0, ring=(p.window_blocks + 1) * p.block)

    def pattern(self) -> Pattern:
        p = self.attention.params
        return hierarchical_exact_pattern(p.block, p.window_blocks, True)

    def __len__(self) -> int:
        pooled = self.buffers.get("pooled_k")
        return super().__len__() + (0 if pooled is None else pooled.shape[2])

    def _pool_leaving_block(self, start: int) -> None:
        """At the start of the block at position `start`, pool the block leaving the window."""
        block, window_blocks = self.attention.params.block, self.attention.params.window_blocks
        leaving = start // block - window_blocks - 1
        if leaving < 0:
            return
        positions = torch.arange(leaving * block, (leaving + 1) * block,
                                 device=self.position.device)
        means = [block_means(x, None, block)[0] for x in self.held_positions(positions)]
        for name, mean in zip(("pooled_k", "pooled_v"), means, strict=True):
            old = self.buffers.get(name)
            self.buffers[name] = mean if old is None else torch.cat([old, mean], dim=2)

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        block, outs = self.attention.params.block, []
        start = self.seen
        for a, b in split_at_multiples(start, q.shape[2], block):
            self.seen = start + a
            if self.seen % block == 0:
                self._pool_leaving_block(self.seen)
            pooled = None
            if "pooled_k" in self.buffers:
                pooled = (self.buffers["pooled_k"], self.buffers["pooled_v"], math.log(block))
            outs.append(self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pooled))
        self.seen = start
        return torch.cat([out for out, _ in outs], dim=2), torch.cat([lse for _, lse in outs], 2)
