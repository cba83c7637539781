"""Patterns, their combinators, and the engine description a static variant gives once.

A pattern `allowed(i, j) -> bool tensor` takes broadcastable integer tensors of query
positions i and key indices j. Variants write their patterns without causality, as
compositions of the shared pieces here (`and_`, `or_`, `not_`, `band`, `block_band`, ...);
causality is intersected once, by `Part.causal`, when the engine description is run.

A variant describes itself as a list of `Part`s, disjoint sets of (query, key) pairs whose
partial attentions merge exactly by their log-sum-exps:

    Part("band", band(window), reach=lambda i: (i - window, i + window), extent=window)

`pattern` is the exact rule; `reach(i) -> (first, last)` bounds the keys query i may reach
(inclusive, clamped to the keys there are; it may be loose, never tight), so an engine only
looks at the key blocks inside it; `extent` is about how far the pattern spreads (the tile
size follows it). A block-structured part (BigBird's layout) gives `blocks`, its (query
block, key block) layout at tiles of `extent`, instead of `reach`. A part over pooled keys
(block means, compressed memories) gives `pool`, which builds them from k and v; `fold`
runs a dilated part per residue class. The torch engine (`attn_zoo.blocksparse`) and the
Triton layout (`attn_zoo.kernels.layout`) are both built from these parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

Pattern = Callable[[Tensor, Tensor], Tensor]
"""`allowed(i, j) -> bool tensor` on broadcastable integer position tensors."""

Reach = Callable[[Tensor], tuple[Tensor, Tensor]]
"""`reach(i) -> (first, last)`: the inclusive key range query positions i may reach."""


# -- combinators ----------------------------------------------------------------------------


def and_(*patterns: Pattern) -> Pattern:
    """Pairs every pattern allows."""

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        result = patterns[0](i, j)
        for pattern in patterns[1:]:
            result = result & pattern(i, j)
        return result

    return allowed


def or_(*patterns: Pattern) -> Pattern:
    """Pairs some pattern allows."""

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        result = patterns[0](i, j)
        for pattern in patterns[1:]:
            result = result | pattern(i, j)
        return result

    return allowed


def not_(pattern: Pattern) -> Pattern:
    """Pairs the pattern does not allow."""
    return lambda i, j: ~pattern(i, j)


# -- shared pieces --------------------------------------------------------------------------


def everything() -> Pattern:
    """Every pair."""
    return lambda i, j: torch.ones_like(i - j, dtype=torch.bool)


def causal_pattern(offset: int = 0) -> Pattern:
    """j <= i + offset (offset = M - N aligns a cross-attention bottom-right)."""
    return lambda i, j: j <= i + offset


def band(reach: int) -> Pattern:
    """abs(i - j) <= reach."""
    return lambda i, j: (i - j).abs() <= reach


def dilated_band(reach: int, dilation: int) -> Pattern:
    """abs(i - j) <= reach * dilation and (i - j) % dilation == 0."""

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        offset = i - j
        return (offset.abs() <= reach * dilation) & (offset % dilation == 0)

    return allowed


def same_residue(stride: int) -> Pattern:
    """(i - j) % stride == 0: keys a multiple of stride away."""
    return lambda i, j: (i - j) % stride == 0


def block_band(block: int, reach: int) -> Pattern:
    """abs(i // block - j // block) <= reach: keys of the blocks within `reach` of i's."""
    return lambda i, j: (i // block - j // block).abs() <= reach


def keys_before(limit: int) -> Pattern:
    """j < limit (the first `limit` keys, e.g. global tokens)."""
    return lambda i, j: j < limit


def queries_before(limit: int) -> Pattern:
    """i < limit (the first `limit` queries, e.g. global rows)."""
    return lambda i, j: i < limit


def band_pairs(n: int, reach: int, causal: bool) -> int:
    """Pairs with 0 <= i - j <= reach (causal) or |i - j| <= reach among n positions."""
    head = min(n, reach + 1)
    one_sided = head * (head + 1) // 2 + (n - head) * (reach + 1)
    return one_sided if causal else 2 * one_sided - n


def every_key(i: Tensor) -> tuple[Tensor, Tensor]:
    """A reach of every key (the engine clamps `last` to the keys there are)."""
    return torch.zeros_like(i), torch.full_like(i, torch.iinfo(torch.int64).max // 4)


def rows_reach(limit: int) -> Reach:
    """Every key for queries i < limit, none for the others."""

    def reach(i: Tensor) -> tuple[Tensor, Tensor]:
        first, last = every_key(i)
        return first, torch.where(i < limit, last, -1)

    return reach


def tile_block(extent: int) -> int:
    """A block size near `extent` (a power of two in 16..64) for tiles spanning that many keys.

    Tiles close to the reach of a band or a span keep their masked share small; at least 16
    rows keep the matmuls efficient, at most 64 keep each tile's score matrix small.
    """
    return min(64, max(16, 1 << max(0, extent - 1).bit_length()))


# -- the engine description -----------------------------------------------------------------


class Pooled(NamedTuple):
    """Keys that stand for groups of positions, built from a call's k and v.

    k, v: (B, Hkv, P, D); bias: float broadcastable to (B, P), added to their scores, or
    None; real: (B, P) bool (False: the key is skipped), or None (every key real).
    """

    k: Tensor
    v: Tensor
    bias: Tensor | None
    real: Tensor | None


@dataclass(frozen=True)
class Pool:
    """How a part's pooled keys are built and where they sit.

    build(k, v, key_padding_mask) -> Pooled; position(J): the last position pooled key J
    stands for (causality keeps J when position(J) <= i); group: see below.
    """

    build: Callable[[Tensor, Tensor, Tensor | None], Pooled]
    position: Callable[[Tensor], Tensor]
    group: int = 0
    """What pooled key J is made of, so that it can be built where its keys are (context
    parallelism): > 0: the keys [J * group, (J + 1) * group) alone (the last group cut by the
    sequence's end), and `build` over keys that start at a group boundary gives the pooled
    keys of the groups there; 0: the call's own key at position(J), picked out (no bias)."""


@dataclass(frozen=True)
class Part:
    """A set of (query, key) pairs one engine call scores; see the module docstring.

    name: names the part among the variant's (layouts are cached by it). pattern: the exact
    pairs, without causality. reach: the key range each query may reach, or None with
    `blocks`: a (query block, key block) bool layout at tiles of `extent`. extent: the tile
    size follows it (`tile_block`), or is it exactly with `blocks`. pool: pooled keys (None:
    the call's own keys). fold: positions regrouped by residue mod `fold` first (a dilated
    part runs as an ordinary one per residue; pattern and reach then speak of indices in a
    residue class).
    """

    name: str
    pattern: Pattern
    reach: Reach | None
    extent: int
    blocks: Tensor | None = None
    pool: Pool | None = None
    fold: int = 1

    @property
    def block(self) -> int:
        """The engine's tile size for this part."""
        return self.extent if self.blocks is not None else tile_block(self.extent)

    def causal(self, offset: int) -> Part:
        """This part with causality intersected: key j (its last position, when pooled) at
        most i + offset."""
        position = (lambda j: j) if self.pool is None else self.pool.position
        pattern = and_(self.pattern, lambda i, j: position(j) <= i + offset)
        reach = self.reach
        if reach is not None and self.pool is None:
            inner = reach

            def reach(i: Tensor) -> tuple[Tensor, Tensor]:
                first, last = inner(i)
                return first, last.minimum(i + offset)

        blocks = self.blocks
        if blocks is not None:
            rows = torch.arange(blocks.shape[0], device=blocks.device)[:, None]
            blocks = blocks & (torch.arange(blocks.shape[1], device=blocks.device) <= rows)
        return Part(self.name, pattern, reach, self.extent, blocks, self.pool, self.fold)

    def within(self, starts: Tensor, ends: Tensor) -> Part:
        """This part inside documents, with positions counted from each document's start.

        starts, ends: (L,) long, the first position and one past the last of the document of
        each of L positions. Pair (i, j) is allowed when i and j share a document and the part
        allows (i - start, j - start); reach is clamped to the document. For parts over the
        call's own keys, without folding or a block layout.
        """
        last_position = starts.shape[0] - 1
        pattern, inner = self.pattern, self.reach

        def allowed(i: Tensor, j: Tensor) -> Tensor:
            # Engines evaluate padded query rows past L too: they read the last document.
            i, j = i.clamp(0, last_position), j.clamp(0, last_position)
            start_i, start_j = starts[i], starts[j]
            return (start_i == start_j) & pattern(i - start_i, j - start_j)

        def reach(i: Tensor) -> tuple[Tensor, Tensor]:
            inside = i.clamp(0, last_position)
            start, end = starts[inside], ends[inside]
            first, last = inner(i - start)
            return (first + start).maximum(start), (last + start).minimum(end - 1)

        return Part(self.name, allowed, reach, self.extent)


def union(parts: list[Part]) -> Pattern:
    """The pairs of the parts over the call's own keys (without folding), as one pattern."""
    patterns = []
    for part in parts:
        if part.pool is not None:
            continue
        if part.fold == 1:
            patterns.append(part.pattern)
        else:
            patterns.append(unfolded(part.pattern, part.fold))
    return or_(*patterns)


def union_reach(parts: list[Part]) -> Reach | None:
    """The key range of the parts over the call's own keys together (see `union`), or None
    when one of them gives a block layout instead."""
    own = [part for part in parts if part.pool is None]
    if any(part.reach is None for part in own):
        return None

    def reach(i: Tensor) -> tuple[Tensor, Tensor]:
        firsts, lasts = [], []
        for part in own:
            first, last = part.reach(i // part.fold)
            firsts.append(first * part.fold)
            lasts.append(last * part.fold + part.fold - 1)
        return torch.stack(firsts).amin(0), torch.stack(lasts).amax(0)

    return reach


def unfolded(pattern: Pattern, fold: int) -> Pattern:
    """A pattern over residue-class indices as a pattern over positions: positions of one
    residue class mod `fold` only, at their indices i // fold, j // fold."""
    return lambda i, j: ((i - j) % fold == 0) & pattern(i // fold, j // fold)
