"""`longformer`: a dilated sliding window plus global tokens (Beltagy et al., 2020).

Query i attends to key j when abs(i - j) <= window * dilation and (i - j) % dilation == 0,
and to every key when i < n_global or j < n_global; causal keeps j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attn_zoo.attention import Attention, PatternAttention
from attn_zoo.cache import RingCache, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.patterns import (
    Part,
    Pattern,
    and_,
    band,
    causal_pattern,
    dilated_band,
    keys_before,
    not_,
    or_,
    queries_before,
    rows_reach,
)
from attn_zoo.registry import register

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


def longformer_pattern(window: int, dilation: int, n_global: int, causal: bool) -> Pattern:
    """The dilated band, global rows and global keys; causal keeps j <= i (the decoding
    cache's form)."""
    pattern = or_(dilated_band(window, dilation), queries_before(n_global),
                  keys_before(n_global))
    return and_(pattern, causal_pattern()) if causal else pattern


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
class LongformerAttention(PatternAttention):
    """Dilated window + global tokens: O(N * (window + n_global)) work and memory.

    Each residue class mod `dilation` is an ordinary window over a strided subsequence,
    so a dilated band costs what an undilated one does. Keys j < n_global outside the band
    are a second part, the rest of the global rows i < n_global a third, merged by
    log-sum-exp, so every part's key-block table stays narrow.
    """

    Params = LongformerParams
    backends = ("torch", "flex", "triton")
    static_pattern = True
    relative_parts = True

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        window, dilation = self.params.window, self.params.dilation
        n_global = min(self.params.n_global, n)
        # The band runs per residue class mod dilation, as an ordinary window.
        parts = [Part("band", band(window), lambda a: (a - window, a + window), window,
                      fold=dilation)]
        if n_global:  # keys and rows j, i < n_global outside the band: disjoint parts
            outside = not_(dilated_band(window, dilation))
            parts.append(Part("global_keys", and_(keys_before(n_global), outside),
                              lambda i: (torch.zeros_like(i), torch.full_like(i, n_global - 1)),
                              n_global))
            parts.append(Part("global_rows", and_(queries_before(n_global), outside,
                                                  not_(keys_before(n_global))),
                              rows_reach(n_global), n_global))
        return parts

    def pattern(self, n: int, causal: bool) -> Pattern:
        return self.exact_pattern(n, causal)

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
