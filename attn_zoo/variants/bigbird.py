"""`bigbird`: block-level window, global and random attention (Zaheer et al., 2020).

Over blocks of `block` keys, `L[I, J]` holds when abs(I - J) <= window_blocks // 2, or
I < n_global_blocks, or J < n_global_blocks, or J is one of `n_random` blocks drawn (from
`seed`) for row I among the blocks not yet allowed (causal: among J < I). Query i attends to
key j when L[i // block, j // block]; causal keeps j <= i.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_zoo.attention import Attention, PatternAttention
from attn_zoo.cache import GrowingCache, attend, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.patterns import Part, Pattern, and_, causal_pattern, not_, queries_before
from attn_zoo.registry import register

MAX_BLOCK = 1024
"""Upper bound of `block`: the torch engine holds tiles of block x block scores (BigBird uses
64)."""


@dataclass
class BigBirdParams(Params):
    block: int = at_most(64, MAX_BLOCK)
    window_blocks: int = 3
    n_global_blocks: int = 1
    n_random: int = 2
    seed: int = 0

    def validate(self) -> None:
        require(self.block >= 1, "block", self.block, ">= 1")
        require(self.window_blocks >= 1 and self.window_blocks % 2 == 1, "window_blocks",
                self.window_blocks, "odd and >= 1")
        require(self.n_global_blocks >= 0, "n_global_blocks", self.n_global_blocks, ">= 0")
        require(self.n_random >= 0, "n_random", self.n_random, ">= 0")
        require(self.seed >= 0, "seed", self.seed, ">= 0")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"block": 4, "window_blocks": 3, "n_global_blocks": 1, "n_random": 2}


@functools.lru_cache(maxsize=16)
def bigbird_layout(n: int, block: int, window_blocks: int, n_global_blocks: int,
                   n_random: int, seed: int, causal: bool) -> Tensor:
    """The block layout L: (ceil(n / block),) * 2 bool on the CPU (causal: J <= I only).

    Cached, so callers must not modify it.
    """
    n_blocks = -(-n // block)
    rows = torch.arange(n_blocks)[:, None]
    cols = torch.arange(n_blocks)[None, :]
    layout = ((rows - cols).abs() <= window_blocks // 2) | (rows < n_global_blocks) | (
        cols < n_global_blocks)
    if causal:
        layout &= cols <= rows
    if n_random:
        candidates = ~layout & (cols < rows) if causal else ~layout
        # The n_random smallest of uniform draws over a row's candidates are a uniform
        # sample of them; rows with fewer candidates take them all.
        draws = torch.rand(n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed))
        drawn = draws.masked_fill(~candidates, 2.0).topk(
            min(n_random, n_blocks), dim=1, largest=False).indices
        chosen = torch.zeros_like(layout).scatter_(1, drawn, True)
        layout |= chosen & candidates
    return layout


def layout_pattern(layout: Tensor, block: int, causal: bool) -> Pattern:
    """Pairs whose blocks the layout allows; causal keeps j <= i (the decoding cache's form)."""
    pattern = block_layout(layout, block)
    return and_(pattern, causal_pattern()) if causal else pattern


def block_layout(layout: Tensor, block: int) -> Pattern:
    """Pairs whose blocks the layout allows. Positions outside the layout (an engine's
    padding, masked anyway) are clamped into it."""
    last = layout.shape[0] - 1

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        blocks = layout.to(i.device)
        return blocks[(i // block).clamp(0, last), (j // block).clamp(0, last)]

    return allowed


@register("bigbird")
class BigBirdAttention(PatternAttention):
    """Block-sparse attention over the BigBird layout.

    Non-global query blocks visit window_blocks + n_global_blocks + n_random key blocks
    (O(N * block) work and memory); the global rows, which see every key, are a part apart
    so the others' key-block table stays that narrow.
    """

    Params = BigBirdParams
    backends = ("torch", "flex", "triton")
    static_pattern = True

    def layout(self, n: int, causal: bool) -> Tensor:
        """The block layout L: (ceil(n / block), ceil(n / block)) bool; see the module doc."""
        return self._layout(n, causal).clone()

    def _layout(self, n: int, causal: bool) -> Tensor:
        p = self.params
        return bigbird_layout(n, p.block, p.window_blocks, p.n_global_blocks, p.n_random,
                              p.seed, causal)

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        block, layout = self.params.block, self._layout(n, causal)
        pattern = block_layout(layout, block)
        n_global = min(self.params.n_global_blocks, layout.shape[0])
        if n_global == 0:
            return [Part("layout", pattern, None, block, blocks=layout)]
        rows = torch.arange(layout.shape[0])[:, None] >= n_global
        global_rows = queries_before(n_global * block)
        return [Part("layout", and_(pattern, not_(global_rows)), None, block,
                     blocks=layout & rows),
                Part("global_rows", and_(pattern, global_rows), None, block,
                     blocks=layout & ~rows)]

    def pattern(self, n: int, causal: bool) -> Pattern:
        return self.exact_pattern(n, causal)

    def scored_pairs(self, n: int, causal: bool) -> int:
        block = self.params.block
        layout = self._layout(n, causal).long()
        sizes = torch.full((layout.shape[0],), block)
        sizes[-1] = n - (layout.shape[0] - 1) * block
        pairs = sizes @ layout @ sizes
        if causal:  # a diagonal tile holds only its lower triangle
            pairs -= (sizes * (sizes - 1) // 2).sum()
        return int(pairs)


# -- decoding cache -------------------------------------------------------------------------


def prefix_layout_row(attention: BigBirdAttention, row_block: int) -> Tensor:
    """Row `row_block` of the causal layout of a sequence that ends in that block:
    (row_block + 1,) bool, the key blocks a query of block I = row_block sees when decoding."""
    p = attention.params
    return bigbird_layout((row_block + 1) * p.block, p.block, p.window_blocks,
                          p.n_global_blocks, p.n_random, p.seed, True)[row_block]


@register_cache("bigbird")
class BigBirdCache(GrowingCache):
    """Every past key; the decode rule: query i reads the key blocks of row I = i // block of
    the causal layout of a sequence that ends in block I, `layout((I + 1) * block)[I]`.

    The random blocks of a row are drawn from a (n_blocks x n_blocks) table, so row I of the
    teacher-forced layout changes with the total length N; only the layout of the prefix that
    ends at i is known when i is decoded. Decoding therefore equals, at every position, the
    last row of the forward over the prefix ending there (exactly the teacher-forced forward
    when n_random = 0, or for the rows of the last block). Memory grows with the sequence.
    """

    exact = False

    def __init__(self, attention: Attention) -> None:
        super().__init__(attention)
        self.rows: list[Tensor] = []  # rows[I]: prefix_layout_row(I), drawn once per block

    def _layout_rows(self, last_block: int, device: torch.device) -> Tensor:
        """Rows 0 .. last_block of the decode layout, zero-padded: (last_block + 1,) * 2."""
        while len(self.rows) <= last_block:
            self.rows.append(prefix_layout_row(self.attention, len(self.rows)))
        n = last_block + 1
        table = torch.zeros(n, n, dtype=torch.bool)
        for index, row in enumerate(self.rows[:n]):
            table[index, :row.shape[0]] = row
        return table.to(device)

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._append(k=k, v=v)
        block, end = self.attention.params.block, self.seen + q.shape[2]
        rows = torch.arange(self.seen, end, device=q.device)
        keys = torch.arange(end, device=q.device)
        layout = self._layout_rows((end - 1) // block, q.device)

        def allowed(t0: int, t1: int) -> Tensor:
            i = rows[t0:t1, None]
            return layout[i // block, keys // block] & (keys <= i)

        return attend(q, self.held("k", end), self.held("v", end), allowed,
                      self.scale(q.shape[3]))
