"""`bigbird` beyond its defaults: against the dense float64 reference (forward and gradients,
GQA and padding), its block layout, pair counts, bad parameters, linear memory."""

from __future__ import annotations

import pytest
import torch
from conftest import case_id, check_memory_is_linear, check_static_pattern, qkv

import attn_zoo
from attn_zoo.reference import dense_mask

CASES = [
    ("bigbird", {"block": 8, "window_blocks": 3, "n_global_blocks": 1, "n_random": 2}),
    ("bigbird", {"block": 7, "window_blocks": 1, "n_global_blocks": 0, "n_random": 1,
                 "seed": 3}),
    ("bigbird", {"block": 16, "window_blocks": 5, "n_global_blocks": 2, "n_random": 3}),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 23, 97, 300])
def test_matches_dense_reference_and_counts_its_pairs(case, n):
    name, params = case
    check_static_pattern(attn_zoo.build(name, **params), n)


def bigbird(**params):
    defaults = {"block": 8, "window_blocks": 3, "n_global_blocks": 1, "n_random": 2}
    return attn_zoo.build("bigbird", **(defaults | params))


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_layout_is_reproducible_from_the_seed(causal):
    layout = bigbird(seed=5).layout(200, causal)
    assert torch.equal(layout, bigbird(seed=5).layout(200, causal))
    assert not torch.equal(layout, bigbird(seed=6).layout(200, causal))
    q, k, v = qkv(n=200)
    first = bigbird(seed=5)(q, k, v, causal=causal)
    torch.testing.assert_close(bigbird(seed=5)(q, k, v, causal=causal), first)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_layout_rows(causal):
    n_blocks, n_random = 25, 2
    layout = bigbird(n_random=n_random, seed=1).layout(n_blocks * 8 - 3, causal)
    plain = bigbird(n_random=0).layout(n_blocks * 8 - 3, causal)
    assert layout.shape == (n_blocks, n_blocks)
    assert (layout >= plain).all()
    rows, cols = torch.arange(n_blocks)[:, None], torch.arange(n_blocks)
    assert torch.equal(plain, (((rows - cols).abs() <= 1) | (rows < 1) | (cols < 1))
                       & ((cols <= rows) if causal else True))
    extra = layout & ~plain
    if causal:  # drawn among the earlier blocks not yet allowed; all of them when too few
        assert not (extra & (cols >= rows)).any()
        candidates = (~plain & (cols < rows)).sum(1)
    else:
        candidates = (~plain).sum(1)
    assert torch.equal(extra.sum(1), candidates.clamp_max(n_random))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 64, 203])
def test_bigbird_layout_is_the_dense_mask_at_block_level(n, causal):
    attn = bigbird()
    n_blocks = -(-n // 8)
    mask = dense_mask(attn.pattern(n, causal), n)
    padded = torch.zeros(n_blocks * 8, n_blocks * 8, dtype=torch.bool)
    padded[:n, :n] = mask
    tiles = padded.view(n_blocks, 8, n_blocks, 8).any(3).any(1)
    assert torch.equal(tiles, attn.layout(n, causal))


def test_bigbird_layout_is_a_copy():
    attn = bigbird()
    attn.layout(100, False).fill_(False)
    assert attn.layout(100, False).any()


@pytest.mark.parametrize(("name", "params", "match"), [
    ("bigbird", {"block": 0}, "block must be >= 1, got 0"),
    ("bigbird", {"window_blocks": 2}, "window_blocks must be odd and >= 1, got 2"),
    ("bigbird", {"window_blocks": -1}, "window_blocks must be odd and >= 1, got -1"),
    ("bigbird", {"n_global_blocks": -1}, "n_global_blocks must be >= 0, got -1"),
    ("bigbird", {"n_random": -1}, "n_random must be >= 0, got -1"),
    ("bigbird", {"seed": -3}, "seed must be >= 0, got -3"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
                                              ("bigbird", {"seed": None}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("bigbird", {"block": 32}),
])
def test_forward_memory_is_linear(name, params):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn)
