"""Tile layouts of the block-sparse kernel, built from a pattern `allowed(i, j)`.

Queries are cut into tiles of `block_m` rows and keys into tiles of `block_n` columns. A
`BlockLayout` lists, for each query tile, the key tiles holding at least one allowed pair, and
whether each is full (every in-range pair allowed: no masking) or partial (its (block_m,
block_n) mask is one row of `masks`). Identical partial masks are stored once: the patterns of
the zoo repeat a handful of tile shapes (band edges, causal diagonals, stride residues), so
`masks` stays small even when most tiles are partial. The transposed lists (for each key tile,
the query tiles visiting it, with the same mask ids) drive the dK/dV pass.

The pattern is evaluated over bounded chunks of query rows, never as one (N, M) tensor, and
`cached_layout` builds a layout once per (pattern key, N, M, tiles, device). The builder also
counts the allowed pairs, so `BlockLayout.stats()` says how much of the tile grid the kernel
visits and how full the visited tiles are (NATTEN's tile efficiency, before timing). Under
`torch.compile` a cached layout is a constant of the graph; building one is a graph break, so
`fullgraph=True` needs one eager call per shape first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from attn_zoo.patterns import Pattern, Reach

CHUNK_ELEMENTS = 1 << 24
"""Pattern evaluations per chunk of query tiles: bounds the builder's working memory."""

CACHE_SIZE = 64
"""Layouts kept by `cached_layout`, least recently used dropped first."""

FULL = -1
"""Mask id of a full tile (no masking)."""


@dataclass(frozen=True)
class BlockLayout:
    """Visited tiles of a pattern over N queries and M keys, at tiles (block_m, block_n).

    kv_index: (ceil(N / block_m), KW) int32, key tiles of each query tile in increasing
    order, padded with 0 past kv_count; kv_count: (ceil(N / block_m),) int32;
    kv_mask: (ceil(N / block_m), KW) int32, FULL or a row of `masks`.
    q_index, q_count, q_mask: the same per key tile (ceil(M / block_n) rows), listing the
    query tiles that visit it.
    masks: (U, block_m, block_n) uint8, 1 = allowed, pairs past N or M are 0; U >= 1 (a
    zero mask stands in when no tile is partial, so the kernels always get a valid pointer).
    pairs: the allowed (query, key) pairs with i < n and j < m, counted while building.
    """

    n: int
    m: int
    block_m: int
    block_n: int
    kv_index: Tensor
    kv_count: Tensor
    kv_mask: Tensor
    q_index: Tensor
    q_count: Tensor
    q_mask: Tensor
    masks: Tensor
    pairs: int

    def tensors(self) -> tuple[Tensor, ...]:
        """(kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks), the kernels' order."""
        return (self.kv_index, self.kv_count, self.kv_mask, self.q_index, self.q_count,
                self.q_mask, self.masks)

    @property
    def visited_tiles(self) -> int:
        """Tiles the kernel visits (full and partial)."""
        return int(self.kv_count.sum())

    @property
    def dense_tiles(self) -> int:
        """Tiles of the whole grid: ceil(n / block_m) * ceil(m / block_n)."""
        return -(-self.n // self.block_m) * -(-self.m // self.block_n)

    def stats(self) -> dict[str, int | float]:
        """Sizes, tile and pair counts as a report row, with
        density = visited_tiles / dense_tiles (1 - density: the tile sparsity) and
        pair_fill = pairs / (visited_tiles * block_m * block_n), the share of the visited
        tiles' pairs that the pattern allows (NaN when no tile is visited)."""
        visited = self.visited_tiles
        tile_pairs = visited * self.block_m * self.block_n
        return {"n": self.n, "m": self.m, "block_m": self.block_m, "block_n": self.block_n,
                "visited_tiles": visited, "dense_tiles": self.dense_tiles, "pairs": self.pairs,
                "density": visited / self.dense_tiles,
                "pair_fill": self.pairs / tile_pairs if tile_pairs else math.nan}


def _pad_columns(rows: list[Tensor], width: int, value: int) -> Tensor:
    return torch.cat([torch.nn.functional.pad(row, (0, width - row.shape[1]), value=value)
                      for row in rows])


@torch.compiler.disable  # data-dependent host work: a graph break when first met in a trace
def build_layout(pattern: Pattern, n: int, m: int, block_m: int, block_n: int,
                 device: torch.device | str | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS, reach: Reach | None = None) -> BlockLayout:
    """The `BlockLayout` of `pattern` over n queries and m keys; see the module docstring.

    Empty tiles are dropped; a query tile with none has kv_count 0 (its rows get out = 0).
    reach: the key range each query may reach (`attn_zoo.patterns.Reach`), or None (every
    key): only the key tiles inside it are evaluated, so a band costs O(N * width), not
    O(N * M).
    """
    for label, value in (("n", n), ("m", m), ("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    device = torch.device("cpu" if device is None else device)
    n_query_tiles, n_key_tiles = -(-n // block_m), -(-m // block_n)
    first, last = _reached_tiles(reach, n, m, block_m, block_n, device)
    widest = max(1, int((last - first + 1).max()))
    step = max(1, chunk_elements // (block_m * widest * block_n))
    mask_ids: dict[bytes, int] = {}
    masks: list[Tensor] = []
    index_rows, mask_rows, count_rows = [], [], []
    pairs = 0
    for t0 in range(0, n_query_tiles, step):
        t1 = min(t0 + step, n_query_tiles)
        # Key tiles k0 .. k1 - 1 hold every key this chunk's rows reach.
        k0 = min(int(first[t0:t1].min()), n_key_tiles - 1)
        k1 = max(k0 + 1, int(last[t0:t1].max()) + 1)
        keys = torch.arange(k0 * block_n, k1 * block_n, device=device)
        rows = torch.arange(t0 * block_m, t1 * block_m, device=device)
        in_range = (rows < n)[:, None] & (keys < m)
        allowed = pattern(rows[:, None], keys[None, :]).expand_as(in_range) & in_range
        pairs += int(allowed.sum())
        # (tiles of this chunk, key tiles, block_m, block_n)
        tiles = allowed.view(t1 - t0, block_m, k1 - k0, block_n).transpose(1, 2)
        in_tiles = in_range.view(t1 - t0, block_m, k1 - k0, block_n).transpose(1, 2)
        visited = tiles.any(3).any(2)
        full = (tiles | ~in_tiles).all(3).all(2)
        partial = visited & ~full
        tile_mask = torch.full(visited.shape, FULL, dtype=torch.int32, device=device)
        if partial.any():
            shapes, inverse = torch.unique(tiles[partial].flatten(1).to(torch.uint8), dim=0,
                                           return_inverse=True)
            ids = []
            for shape in shapes:
                key = shape.cpu().numpy().tobytes()
                if key not in mask_ids:
                    mask_ids[key] = len(masks)
                    masks.append(shape.view(block_m, block_n))
                ids.append(mask_ids[key])
            tile_mask[partial] = torch.tensor(ids, dtype=torch.int32, device=device)[inverse]
        counts = visited.sum(1)
        width = max(1, int(counts.max()))
        # A stable sort of "not visited" flags lists the visited tiles first, in order.
        order = torch.sort((~visited).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        listed = torch.arange(width, device=device) < counts[:, None]
        index_rows.append(torch.where(listed, order + k0, 0).to(torch.int32))
        mask_rows.append(torch.where(listed, tile_mask.gather(1, order), FULL))
        count_rows.append(counts.to(torch.int32))
    width = max(row.shape[1] for row in index_rows)
    kv_index = _pad_columns(index_rows, width, 0)
    kv_mask = _pad_columns(mask_rows, width, FULL)
    kv_count = torch.cat(count_rows)
    q_index, q_count, q_mask = _transpose(kv_index, kv_count, kv_mask, n_key_tiles)
    if not masks:
        masks.append(torch.zeros(block_m, block_n, dtype=torch.uint8, device=device))
    return BlockLayout(n, m, block_m, block_n, kv_index, kv_count, kv_mask, q_index, q_count,
                       q_mask, torch.stack(masks).contiguous(), pairs)


def _reached_tiles(reach: Reach | None, n: int, m: int, block_m: int, block_n: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last key tile each query tile may reach: (ceil(n / block_m),) long each
    (last < first: none)."""
    n_query_tiles, n_key_tiles = -(-n // block_m), -(-m // block_n)
    if reach is None:
        return (torch.zeros(n_query_tiles, dtype=torch.long, device=device),
                torch.full((n_query_tiles,), n_key_tiles - 1, device=device))
    rows = torch.arange(n_query_tiles * block_m, device=device).clamp_max(n - 1)
    first, last = reach(rows)
    first, last = first.clamp(0, m), last.clamp(-1, m - 1)
    first = torch.where(last < first, m, first).view(n_query_tiles, block_m).amin(1)
    last = last.view(n_query_tiles, block_m).amax(1)
    return first // block_n, last.div(block_n, rounding_mode="floor")


def _transpose(kv_index: Tensor, kv_count: Tensor, kv_mask: Tensor,
               n_key_tiles: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each key tile, the query tiles listing it (increasing) and their mask ids."""
    device = kv_index.device
    listed = torch.arange(kv_index.shape[1], device=device) < kv_count[:, None].long()
    query_tiles = torch.arange(kv_index.shape[0], device=device)[:, None].expand_as(kv_index)
    key_tiles, query_tiles, ids = kv_index[listed].long(), query_tiles[listed], kv_mask[listed]
    order = torch.argsort(key_tiles * kv_index.shape[0] + query_tiles)
    key_tiles, query_tiles, ids = key_tiles[order], query_tiles[order], ids[order]
    counts = torch.bincount(key_tiles, minlength=n_key_tiles)
    width = max(1, int(counts.max())) if counts.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(key_tiles.numel(), device=device) - starts[key_tiles]
    q_index = torch.zeros(n_key_tiles, width, dtype=torch.int32, device=device)
    q_mask = torch.full((n_key_tiles, width), FULL, dtype=torch.int32, device=device)
    q_index[key_tiles, slots] = query_tiles.to(torch.int32)
    q_mask[key_tiles, slots] = ids
    return q_index, counts.to(torch.int32), q_mask


_CACHE: OrderedDict[tuple, BlockLayout] = OrderedDict()


def cached_layout(key: Hashable, pattern: Pattern, n: int, m: int, block_m: int, block_n: int,
                  device: torch.device | str, reach: Reach | None = None) -> BlockLayout:
    """`build_layout(pattern, ..., reach=reach)`, built once per (key, n, m, tiles, device).

    key: identifies the pattern, e.g. (variant name, its parameters, causal, which part);
    two patterns given the same key must allow the same pairs.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    full_key = (key, n, m, block_m, block_n, device)
    layout = _CACHE.get(full_key)
    if layout is None:
        layout = _CACHE[full_key] = build_layout(pattern, n, m, block_m, block_n, device,
                                                 reach=reach)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(full_key)
    return layout
