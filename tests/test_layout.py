"""The tile layout of the block-sparse kernel visits exactly the pattern's pairs."""

from __future__ import annotations

import math

import pytest
import torch
from attn_zoo.kernels.layout import FULL, BlockLayout, build_layout, cached_layout
from conftest import STATIC_VARIANTS, causal_modes, variant_id

import attn_zoo
from attn_zoo.reference import dense_mask
from attn_zoo.registry import get

EXACT_VARIANTS = [name for name in attn_zoo.available() if get(name).pooled_keys]
CASES = [(name, causal) for name in [*STATIC_VARIANTS, *EXACT_VARIANTS]
         for causal in causal_modes(name)]


def pattern_of(name: str, n: int, causal: bool):
    # Tiny parameters, so that N = 61 crosses windows, blocks, strides and segments many times.
    attn = attn_zoo.build(name, **get(name).Params.tiny())
    return attn.exact_pattern(n, causal) if name in EXACT_VARIANTS else attn.pattern(n, causal)


def visited_pairs(layout: BlockLayout) -> torch.Tensor:
    """(N, M) bool: the pairs the kernel scores, from the forward lists."""
    bm, bn = layout.block_m, layout.block_n
    pairs = torch.zeros(layout.kv_index.shape[0] * bm, layout.q_index.shape[0] * bn,
                        dtype=torch.bool)
    for tile in range(layout.kv_index.shape[0]):
        for slot in range(int(layout.kv_count[tile])):
            key_tile, mask_id = int(layout.kv_index[tile, slot]), int(layout.kv_mask[tile, slot])
            block = pairs[tile * bm:(tile + 1) * bm, key_tile * bn:(key_tile + 1) * bn]
            assert not block.any(), "a key tile is listed twice"
            block |= True if mask_id == FULL else layout.masks[mask_id].bool()
    return pairs[:layout.n, :layout.m]


def listed_tiles(index, count, mask) -> set[tuple[int, int, int]]:
    return {(row, int(index[row, slot]), int(mask[row, slot]))
            for row in range(index.shape[0]) for slot in range(int(count[row]))}


@pytest.mark.parametrize(("name", "causal"), CASES, ids=[variant_id(case) for case in CASES])
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16)])
def test_layout_visits_exactly_the_pattern(name, causal, block_m, block_n):
    n = 61
    pattern = pattern_of(name, n, causal)
    # A tiny chunk makes the builder evaluate the pattern in many pieces.
    layout = build_layout(pattern, n, n, block_m, block_n, chunk_elements=700)
    assert torch.equal(visited_pairs(layout), dense_mask(pattern, n))
    assert layout.pairs == int(dense_mask(pattern, n).sum())  # summed over the chunks
    # Stored masks are distinct and each allows some pair (empty tiles are dropped).
    if (layout.kv_mask != FULL).any():
        assert layout.masks.flatten(1).any(1).all()
        assert torch.unique(layout.masks.flatten(1), dim=0).shape[0] == layout.masks.shape[0]
    forward = listed_tiles(layout.kv_index, layout.kv_count, layout.kv_mask)
    transposed = {(q_tile, k_tile, mask_id) for k_tile, q_tile, mask_id in
                  listed_tiles(layout.q_index, layout.q_count, layout.q_mask)}
    assert forward == transposed
    for index, count in ((layout.kv_index, layout.kv_count), (layout.q_index, layout.q_count)):
        for row in range(index.shape[0]):  # each list is increasing
            listed = index[row, :int(count[row])]
            assert torch.all(listed[1:] > listed[:-1])


def tile_grid(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(ceil(N / block_m), ceil(M / block_n)) bool: the tiles of a dense (N, M) mask with a pair."""
    n, m = mask.shape
    padded = torch.nn.functional.pad(mask, (0, -m % block_n, 0, -n % block_m))
    return padded.view(padded.shape[0] // block_m, block_m, -1, block_n).any(3).any(1)


STATS_CASES = [("local", {"window": 7}, False), ("local", {"window": 7}, True),
               ("longformer", {"window": 4, "dilation": 2, "n_global": 5}, True),
               ("bigbird", {"block": 8, "window_blocks": 3, "n_global_blocks": 1,
                            "n_random": 2}, False),
               ("sparse_fixed", {"stride": 16, "summary": 3}, True),
               ("full", {}, True)]


@pytest.mark.parametrize(("name", "params", "causal"), STATS_CASES,
                         ids=[f"{c[0]}-{'causal' if c[2] else 'bidir'}" for c in STATS_CASES])
@pytest.mark.parametrize("n", [97, 131])
def test_stats_count_tiles_and_pairs_of_the_dense_mask(name, params, causal, n):
    pattern = attn_zoo.build(name, **params).pattern(n, causal)
    block_m, block_n = 32, 16
    layout = build_layout(pattern, n, n, block_m, block_n, chunk_elements=5000)
    mask = dense_mask(pattern, n)
    visited = int(tile_grid(mask, block_m, block_n).sum())
    dense = -(-n // block_m) * -(-n // block_n)
    assert (layout.visited_tiles, layout.dense_tiles, layout.pairs) == (
        visited, dense, int(mask.sum()))
    stats = layout.stats()
    assert stats == {"n": n, "m": n, "block_m": block_m, "block_n": block_n,
                     "visited_tiles": visited, "dense_tiles": dense, "pairs": int(mask.sum()),
                     "density": pytest.approx(visited / dense),
                     "pair_fill": pytest.approx(int(mask.sum()) / (visited * block_m * block_n))}
    assert 0 < stats["pair_fill"] <= 1 and 0 < stats["density"] <= 1


def test_stats_of_cross_lengths_and_of_an_empty_pattern():
    # M != N: the grid is ceil(45 / 16) x ceil(30 / 8); keys j <= i - 20.
    layout = build_layout(lambda i, j: j <= i - 20, 45, 30, 16, 8)
    mask = dense_mask(lambda i, j: j <= i - 20, 45, 30)
    assert (layout.dense_tiles, layout.pairs) == (3 * 4, int(mask.sum()))
    assert layout.visited_tiles == int(tile_grid(mask, 16, 8).sum())
    empty = build_layout(lambda i, j: i < 0, 20, 20, 16, 16).stats()
    assert (empty["visited_tiles"], empty["pairs"], empty["density"]) == (0, 0, 0.0)
    assert math.isnan(empty["pair_fill"])


def test_identical_partial_tiles_share_one_mask():
    # A band of width 3 at tiles of 16: every diagonal tile has the same mask.
    n = 16 * 40
    pattern = attn_zoo.build("local", window=3).pattern(n, True)
    layout = build_layout(pattern, n, n, 16, 16)
    assert layout.masks.shape[0] == 2  # the diagonal tile and the one below it
    assert layout.visited_tiles == 40 + 39


def test_cross_lengths_and_empty_rows():
    # Queries i see keys j <= i - 20: the first 20 rows see none; M != N.
    n, m = 45, 30

    def pattern(i, j):
        return j <= i - 20

    layout = build_layout(pattern, n, m, 16, 16)
    assert torch.equal(visited_pairs(layout), dense_mask(pattern, n, m))
    assert layout.kv_count[0] == 0  # rows 0..15 visit nothing
    assert layout.kv_index.dtype == torch.int32 and layout.masks.dtype == torch.uint8


def test_layout_is_cached_per_key_and_shape():
    pattern = attn_zoo.build("local", window=2).pattern(40, False)
    first = cached_layout(("test", 2), pattern, 40, 40, 16, 16, "cpu")
    assert cached_layout(("test", 2), pattern, 40, 40, 16, 16, "cpu") is first
    assert cached_layout(("test", 2), pattern, 41, 41, 16, 16, "cpu") is not first
    assert cached_layout(("test", 2), pattern, 40, 40, 32, 16, "cpu").block_m == 32


@pytest.mark.parametrize(("label", "value"), [("n", 0), ("block_m", 1.5)])
def test_bad_sizes_are_rejected(label, value):
    sizes = {"n": 8, "m": 8, "block_m": 16, "block_n": 16, label: value}
    with pytest.raises(ValueError, match=f"{label} must be an int >= 1"):
        build_layout(lambda i, j: i >= j, **sizes)
