"""The engine description and the torch engine: combinators, key-block tables from a part's
reach, workspace memory, and keys outside the pattern that hold inf or NaN."""

from __future__ import annotations

import math

import pytest
import torch
from attn_zoo.kernels.layout import build_layout
from conftest import call, causal_modes, qkv

import attn_zoo
from attn_zoo import blocksparse
from attn_zoo.attention import PatternAttention
from attn_zoo.blocksparse import CHUNK_ELEMENTS, block_sparse_attention, reach_key_blocks
from attn_zoo.patterns import Part, and_, band, causal_pattern, not_, or_, union_reach
from attn_zoo.reference import dense_mask
from attn_zoo.registry import get
from experiments.measure import peak_memory

CASES = [(name, causal) for name in attn_zoo.available() for causal in causal_modes(name)]


def test_combinators_compose_patterns():
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    near, later = band(2)(i, j), j > i
    assert torch.equal(and_(band(2), not_(causal_pattern()))(i, j), near & later)
    assert torch.equal(or_(band(2), causal_pattern())(i, j), near | ~later)


def test_every_described_variant_intersects_causality_once():
    """Parts are written without causality: the causal pairs are the bidirectional ones with
    j <= i (BigBird aside: its random blocks are drawn among earlier blocks when causal)."""
    for name in attn_zoo.available():
        cls = get(name)
        if not issubclass(cls, PatternAttention) or cls.causal_only or name == "bigbird":
            continue
        attn = attn_zoo.build(name, **get(name).Params.tiny())
        both, causal = (dense_mask(attn.exact_pattern(40, c), 40) for c in (False, True))
        assert torch.equal(causal, both & dense_mask(causal_pattern(), 40)), name


def test_reach_table_lists_exactly_the_blocks_with_pairs():
    def pattern(i, j):  # a band with a hole: no block of keys 16..31 is reached
        return ((i - j).abs() <= 20) & ((j < 16) | (j >= 32))

    table = reach_key_blocks(pattern, lambda i: (i - 20, i + 20), 50, 50, 16)
    mask = dense_mask(pattern, 50)
    for row, blocks in enumerate(table.tolist()):
        expected = [b for b in range(4) if mask[row * 16:(row + 1) * 16, b * 16:(b + 1) * 16].any()]
        assert [b for b in blocks if b >= 0] == expected


def test_a_loose_reach_changes_nothing():
    """The reach only bounds where to look: a wider one gives the same table."""
    part = Part("band", band(5), lambda i: (i - 5, i + 5), 5)
    tight = reach_key_blocks(part.pattern, part.reach, 70, 70, part.block)
    loose = reach_key_blocks(part.pattern, lambda i: (i - 40, i + 40), 70, 70, part.block)
    assert torch.equal(tight, loose)


def _out(attn, q, k, v, causal):
    with torch.no_grad():
        return call(attn, q, k, v, causal=causal)


@pytest.mark.parametrize(("name", "causal"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_keys_reach_only_the_rows_that_attend_to_them(name, causal, value):
    """inf or NaN in one key's k or v changes only the rows whose output depends on that key
    (found by giving it two finite values); every other row stays finite and unchanged."""
    attn = attn_zoo.build(name, **get(name).Params.tiny()).eval()
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=48, dim=8)
    for key in (47, 20):
        other = v.clone()
        other[..., key, :] += 3.0
        base = _out(attn, q, k, v, causal)
        reached = (base - _out(attn, q, k, other, causal)).abs().amax(-1) > 0  # (B, H, N)
        for target in ("k", "v"):
            bad_k, bad_v = k.clone(), v.clone()
            (bad_k if target == "k" else bad_v)[..., key, :] = value
            out = _out(attn, q, bad_k, bad_v, causal)
            if target == "k" and attn.content_based:
                # Keys chosen by content: the rows a finite change of this key moves (none
                # for the shared-QK variants, which ignore k).
                moved = k.clone()
                moved[..., key, :] += 3.0
                reached_k = (base - _out(attn, q, moved, v, causal)).abs().amax(-1) > 0
            else:
                reached_k = reached
            assert out[~reached_k].isfinite().all(), (name, key, target)
            torch.testing.assert_close(out[~reached_k], base[~reached_k])


def test_out_of_pattern_nan_value_leaves_the_tile_finite():
    """local(window=4), causal, NaN in v[63]: row 63 alone sees it; rows 48..62 share its
    tile and must stay finite."""
    attn = attn_zoo.build("local", window=4)
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=2, n=64, dim=16)
    v[..., 63, :] = math.nan
    out = attn(q, k, v, causal=True)
    assert out[:, :, :63].isfinite().all()
    assert out[:, :, 63].isnan().all()


def test_gradients_stay_finite_away_from_non_finite_keys():
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=40, dim=8, requires_grad=True)
    bad_k, bad_v = k.detach().clone(), v.detach().clone()
    bad_k[..., 39, :], bad_v[..., 39, :] = math.inf, math.nan
    bad_k.requires_grad_(), bad_v.requires_grad_()
    attn = attn_zoo.build("local", window=4)
    # Only rows 0..30 count in the loss: none of them reaches key 39.
    attn(q, bad_k, bad_v, causal=True)[:, :, :31].sum().backward()
    for x in (q, bad_k, bad_v):
        assert x.grad[..., :35, :].isfinite().all()
    expected = torch.autograd.grad(attn(q, k, v, causal=True)[:, :, :31].sum(), (q, k, v))
    torch.testing.assert_close(q.grad[..., :35, :], expected[0][..., :35, :])
    torch.testing.assert_close(bad_v.grad[..., :35, :], expected[2][..., :35, :])


def test_engine_rows_without_keys_and_a_table_with_holes():
    """A gathered (non-consecutive) table equals the dense rule."""
    q, k, v = qkv(batch=2, q_heads=2, kv_heads=1, n=48, dim=8, dtype=torch.float64)
    table = torch.tensor([[0, 2], [-1, -1], [2, 0]])

    def pattern(i, j):
        return (j % 3 == 0) | (i == j)

    out, lse = block_sparse_attention(q.unflatten(1, (1, 2)), k, v, table, pattern, block=16,
                                      scale=0.5)
    blocks = torch.zeros(3, 3, dtype=torch.bool)
    blocks[0, [0, 2]] = blocks[2, [0, 2]] = True
    allowed = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1) & dense_mask(pattern, 48)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, -math.inf)
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    torch.testing.assert_close(out.flatten(1, 2), expected)
    assert lse[..., 16:32].isneginf().all()


def _local_peak(n: int) -> tuple[int, int]:
    attn = attn_zoo.build("local", window=256)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v, causal=True)  # key-block table built and cached
        return peak_memory(lambda: attn(q, k, v, causal=True)), q.numel() * q.element_size()


def test_local_forward_workspace_is_one_chunk():
    """Beyond the output, the forward holds one chunk of scores (float32, and the pattern's
    int64 temporaries for a sixteenth of it) and the rows' log-sum-exps."""
    peak, out_bytes = _local_peak(8192)
    assert peak <= out_bytes + 4 * CHUNK_ELEMENTS + CHUNK_ELEMENTS + out_bytes // 32
    assert peak / out_bytes <= 1.25  # 1.1 at N = 16384, against 1.9 with gathered keys


def test_full_with_padding_builds_no_n_by_m_tensor():
    attn = attn_zoo.build("full")
    n = 4096
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    real = torch.rand(1, n) > 0.3
    with torch.no_grad():
        attn(q, k, v, key_padding_mask=real)
        peak = peak_memory(lambda: attn(q, k, v, key_padding_mask=real))
    assert peak < n * n  # a (1, 1, N, M) bool mask alone would be N * M bytes


DESCRIBED = [(name, causal) for name in attn_zoo.available()
             if issubclass(get(name), PatternAttention) for causal in causal_modes(name)]


@pytest.mark.parametrize(("name", "causal"), DESCRIBED, ids=[f"{n}-{c}" for n, c in DESCRIBED])
def test_every_part_reaches_all_its_pairs(name, causal):
    """A part's reach holds every pair its pattern allows, so the key-block tables and the
    kernel layout built inside the reach miss none."""
    n = 61
    attn = attn_zoo.build(name, **get(name).Params.tiny())
    parts = attn.engine_parts(n, n, causal)
    zeros = torch.zeros(1, 1, n, 4)
    for part in parts:
        if part.reach is None:
            continue
        m = -(-n // part.fold) if part.pool is None else part.pool.build(zeros, zeros,
                                                                          None).k.shape[2]
        rows = torch.arange(-(-n // part.fold))
        keys = torch.arange(m)
        allowed = part.pattern(rows[:, None], keys[None, :]).expand(len(rows), m)
        first, last = part.reach(rows)
        inside = (keys >= first[:, None]) & (keys <= last[:, None])
        assert not (allowed & ~inside).any(), part.name
    pattern = attn.exact_pattern(n, causal)
    bounded = build_layout(pattern, n, n, 16, 16, reach=union_reach(parts))
    assert torch.equal(bounded.kv_index, build_layout(pattern, n, n, 16, 16).kv_index)


@pytest.mark.parametrize("chunk", [64, 4000])  # runs of one kv head; runs of one batch entry
def test_engine_splits_calls_whose_query_block_exceeds_a_chunk(monkeypatch, chunk):
    monkeypatch.setattr(blocksparse, "CHUNK_ELEMENTS", chunk)
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=40, dim=8, dtype=torch.float64,
                  requires_grad=True)
    bias = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    real = torch.rand(2, 40, generator=torch.Generator().manual_seed(3)) > 0.3
    out, _ = block_sparse_attention(q.unflatten(1, (2, 2)), k, v,
                                    blocksparse.band_key_blocks(40, 16, 1, 1), band(12),
                                    block=16, scale=0.3, key_padding_mask=real, key_bias=bias)
    allowed = dense_mask(band(12), 40) & real[:, None, None, :]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3 + bias[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v.repeat_interleave(
        2, 1)
    weight = torch.randn(expected.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.flatten(1, 2) * weight).sum(), (q, k, v, bias))
    reference = torch.autograd.grad((expected * weight).sum(), (q, k, v, bias))
    torch.testing.assert_close(out.flatten(1, 2), expected)
    for grad, want in zip(got, reference, strict=True):
        torch.testing.assert_close(grad, want)
