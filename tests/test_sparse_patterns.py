"""`longformer`, `bigbird`, `sparse_strided`, `sparse_fixed` beyond their defaults: against the
dense float64 reference (forward and gradients, GQA and padding), layouts, pair counts,
bad parameters, linear memory; and the block-sparse helpers they are built on."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo.blocksparse import (
    fold_residues,
    layout_key_blocks,
    merge_partial_attentions,
    span_key_blocks,
    unfold_residues,
)
from attn_zoo.reference import dense_mask, reference_attention
from experiments.measure import peak_memory

CASES = [
    ("longformer", {"window": 3, "dilation": 2, "n_global": 0}),
    ("longformer", {"window": 3, "dilation": 2, "n_global": 5}),
    ("longformer", {"window": 4, "dilation": 3, "n_global": 17}),
    ("longformer", {"window": 0, "dilation": 3, "n_global": 2}),
    ("longformer", {"window": 5, "dilation": 1, "n_global": 20}),
    ("bigbird", {"block": 8, "window_blocks": 3, "n_global_blocks": 1, "n_random": 2}),
    ("bigbird", {"block": 7, "window_blocks": 1, "n_global_blocks": 0, "n_random": 1,
                 "seed": 3}),
    ("bigbird", {"block": 16, "window_blocks": 5, "n_global_blocks": 2, "n_random": 3}),
    ("sparse_strided", {"stride": 1}),
    ("sparse_strided", {"stride": 5}),
    ("sparse_strided", {"stride": 16}),
    ("sparse_fixed", {"stride": 1, "summary": 1}),
    ("sparse_fixed", {"stride": 5, "summary": 2}),
    ("sparse_fixed", {"stride": 16, "summary": 16}),
    ("sparse_fixed", {"stride": 24, "summary": 3}),
]


def case_id(case: tuple[str, dict]) -> str:
    return case[0] + "-" + "-".join(f"{key}{value}" for key, value in case[1].items())


def check_against_reference(attn, n: int, causal: bool, kv_heads: int = 2) -> None:
    """Forward and gradients of `attn` equal the dense float64 reference of its pattern."""
    q, k, v = qkv(q_heads=4, kv_heads=kv_heads, n=n, dtype=torch.float64, seed=n,
                  requires_grad=True)
    real = torch.rand(2, n, generator=torch.Generator().manual_seed(n + 1)) > 0.25
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    allowed = dense_mask(attn.pattern(n, causal), n)
    expected = reference_attention(q, k, v, allowed, key_padding_mask=real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 97, 300])
def test_matches_dense_reference(case, n):
    name, params = case
    attn = attn_zoo.build(name, **params)
    for causal, kv_heads in ((False, 2), (True, 1)):
        check_against_reference(attn, n, causal, kv_heads)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flops_count_the_pattern(case):
    name, params = case
    attn = attn_zoo.build(name, **params)
    for n in (1, 23, 97, 300):
        for causal in (False, True):
            pairs = int(dense_mask(attn.pattern(n, causal), n).sum())
            assert attn.scored_pairs(n, causal) == pairs, (n, causal)


def test_longformer_dilation_skips_the_keys_between():
    attn = attn_zoo.build("longformer", window=2, dilation=3, n_global=1)
    allowed = dense_mask(attn.pattern(20, False), 20)
    assert allowed[10].nonzero().flatten().tolist() == [0, 4, 7, 10, 13, 16]
    assert allowed[0].all() and allowed[:, 0].all()
    causal = dense_mask(attn.pattern(20, True), 20)
    assert causal[10].nonzero().flatten().tolist() == [0, 4, 7, 10]
    assert causal[0].nonzero().flatten().tolist() == [0]


def test_longformer_without_dilation_or_globals_is_local():
    q, k, v = qkv(n=150)
    for causal in (False, True):
        out = attn_zoo.build("longformer", window=20)(q, k, v, causal=causal)
        expected = attn_zoo.build("local", window=20)(q, k, v, causal=causal)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


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


def test_sparse_strided_pattern():
    allowed = dense_mask(attn_zoo.build("sparse_strided", stride=4).pattern(20, False), 20)
    assert allowed[10].nonzero().flatten().tolist() == [2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 18]


def test_sparse_fixed_pattern():
    attn = attn_zoo.build("sparse_fixed", stride=5, summary=2)
    allowed = dense_mask(attn.pattern(20, False), 20)
    assert allowed[7].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8, 9, 13, 14, 18, 19]
    causal = dense_mask(attn.pattern(20, True), 20)
    assert causal[7].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(("name", "params", "match"), [
    ("longformer", {"window": -1}, "window must be >= 0, got -1"),
    ("longformer", {"dilation": 0}, "dilation must be >= 1, got 0"),
    ("longformer", {"n_global": -2}, "n_global must be >= 0, got -2"),
    ("bigbird", {"block": 0}, "block must be >= 1, got 0"),
    ("bigbird", {"window_blocks": 2}, "window_blocks must be odd and >= 1, got 2"),
    ("bigbird", {"window_blocks": -1}, "window_blocks must be odd and >= 1, got -1"),
    ("bigbird", {"n_global_blocks": -1}, "n_global_blocks must be >= 0, got -1"),
    ("bigbird", {"n_random": -1}, "n_random must be >= 0, got -1"),
    ("bigbird", {"seed": -3}, "seed must be >= 0, got -3"),
    ("sparse_strided", {"stride": 0}, "stride must be >= 1, got 0"),
    ("sparse_fixed", {"stride": 0}, "stride must be >= 1, got 0"),
    ("sparse_fixed", {"summary": 0}, r"summary must be between 1 and stride \(128\), got 0"),
    ("sparse_fixed", {"stride": 4, "summary": 5},
     r"summary must be between 1 and stride \(4\), got 5"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [("longformer", {"window": 1.5}),
                                              ("bigbird", {"seed": None}),
                                              ("sparse_fixed", {"summary": "8"})])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("longformer", {"window": 32, "dilation": 3, "n_global": 16}),
    ("bigbird", {"block": 32}),
    ("sparse_strided", {"stride": 32}),
    ("sparse_fixed", {"stride": 32}),
])
def test_forward_memory_is_linear(name, params):
    attn = attn_zoo.build(name, **params)

    def peak(n: int) -> tuple[int, int]:
        q, k, v = (torch.randn(1, 8, n, 32) for _ in range(3))
        with torch.no_grad():
            return peak_memory(lambda: attn(q, k, v, causal=True)), q.numel() * q.element_size()

    small, _ = peak(1024)
    large, out_bytes = peak(4096)
    assert large / small < 4.5  # 4x the length: 4x the memory, not 16x
    assert large < 20 * out_bytes  # an N x N score matrix alone would be 128x


def test_span_and_layout_key_blocks():
    table = span_key_blocks(torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2]))
    assert table.tolist() == [[0, 1, -1], [2, 3, 4], [-1, -1, -1]]
    layout = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    assert layout_key_blocks(layout).tolist() == [[0, 2, -1], [-1, -1, -1], [0, 1, 2]]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n", [1, 9, 12])
def test_fold_residues_round_trip(batch, n):
    x = torch.arange(batch * 3 * n).view(batch, 3, n)
    folded = fold_residues(x, 4, 2)
    # Contiguous even where a view would do (batch 1): the engine gathers keys through views.
    assert folded.shape == (batch * 4, 3, -(-n // 4))
    members = x[-1, 1, 1::4].tolist()
    assert folded[-3, 1].tolist() == members + [0] * (folded.shape[2] - len(members))
    assert torch.equal(unfold_residues(folded, 4, 2, n), x)


def test_merge_has_finite_gradients_on_unreached_rows():
    out = torch.randn(3, 4).masked_fill(torch.tensor([False, True, True])[:, None], 0.0)
    parts = [(out.clone().requires_grad_(), torch.tensor([0.0, -torch.inf, -torch.inf])),
             (torch.zeros(3, 4, requires_grad=True), torch.tensor([1.0, -torch.inf, -torch.inf]))]
    for _, lse in parts:
        lse.requires_grad_()
    merged, lse = merge_partial_attentions(parts)
    assert torch.equal(merged[1:], torch.zeros(2, 4)) and torch.isneginf(lse[1:]).all()
    merged.sum().backward()
    for part_out, lse in parts:
        assert torch.isfinite(part_out.grad).all() and torch.isfinite(lse.grad).all()
