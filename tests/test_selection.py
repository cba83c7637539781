"""`selection_attention` (the torch engine of the selection variants) against a dense float64
reference built from the index: forward, lse, gradients (through lse too), chunking, values
that are not finite, bad input."""

from __future__ import annotations

import pytest
import torch

import attn_zoo.selection as selection
from attn_zoo.reference import reference_attention
from attn_zoo.selection import selection_attention


def selected_mask(index, unit, m, causal):
    """(B, H, N, M) bool: key j is in one of query i's listed units (and j <= i + M - N)."""
    batch, heads, n, _ = index.shape
    unit_of = torch.arange(m) // unit  # the unit holding key j
    listed = (index[..., None] == unit_of).any(-2)  # (B, H, N, M)
    if causal:
        listed &= torch.arange(m) <= torch.arange(n)[:, None] + m - n
    return listed


def random_index(batch, heads, n, units, slots, seed=0):
    """Distinct units per row, some slots empty (-1), one row with none."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(units, generator=gen)[:slots]
                         for _ in range(batch * heads * n)]).view(batch, heads, n, slots)
    index[..., 1, 0] = -1
    index[0, 0, 3] = -1
    return index


CASES = [  # unit, causal, (H, Hkv, G), padded
    (4, True, (2, 1, 3), False),
    (1, False, (2, 2, 1), True),
    (3, True, (4, 2, 2), True),
    (5, False, (1, 1, 1), False),
    (16, True, (2, 2, 2), False),  # one unit longer than the sequence
]


@pytest.mark.parametrize("chunk", [1 << 22, 40], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("case", CASES, ids=[f"unit{c[0]}-{'causal' if c[1] else 'bidir'}-"
                                                f"H{c[2][0]}x{c[2][2]}" for c in CASES])
def test_selection_matches_the_dense_reference(case, chunk, monkeypatch):
    monkeypatch.setattr(selection, "GATHER_ELEMENTS", chunk)
    unit, causal, (heads, kv_heads, groups), padded = case
    batch, n, dim = 2, 13, 8
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, groups, n, dim, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(batch, kv_heads, n, dim, dtype=torch.float64, generator=gen)
            for _ in range(2))
    for x in (q, k, v):
        x.requires_grad_(True)
    units = -(-n // unit)
    index = random_index(batch, heads, n, units, min(3, units))
    real = torch.rand(batch, n, generator=gen) > 0.3 if padded else None

    out, lse = selection_attention(q, k, v, index, unit=unit, scale=0.3, causal=causal,
                                   key_padding_mask=real)
    allowed = selected_mask(index, unit, n, causal)[:, :, None].expand(-1, -1, groups, -1, -1)
    flat = (batch, heads * groups, n)
    expected = reference_attention(q.reshape(*flat, dim), k, v, allowed.reshape(*flat, n),
                                   scale=0.3, key_padding_mask=real).view_as(out)
    scores = torch.einsum("bhgnd,bhmd->bhgnm", q, k.repeat_interleave(heads // kv_heads, 1))
    mask = allowed if real is None else allowed & real[:, None, None, None]
    expected_lse = (scores * 0.3).masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(lse.isinf(), expected_lse.isinf()) and lse.isinf().any()
    real_rows = expected_lse.isfinite()
    torch.testing.assert_close(lse[real_rows], expected_lse[real_rows])

    weights = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * weights[0]).sum() + (lse.where(real_rows, 0.0)
                                                          * weights[1]).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights[0]).sum() + (
        expected_lse.where(real_rows, 0.0) * weights[1]).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_float32_and_int32_index():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 2, 20, 16, generator=gen)
    k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
    index = random_index(1, 2, 20, 5, 2)
    out, lse = selection_attention(q, k, v, index.int(), unit=4, scale=0.25, causal=True)
    ref, ref_lse = selection_attention(q.double(), k.double(), v.double(), index, unit=4,
                                       scale=0.25, causal=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_keys_outside_the_selection_never_reach_an_output():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 8, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=gen)
    k[0, 0, 7], v[0, 0, 7] = float("inf"), float("nan")  # unit 3 (keys 6, 7): causal for row 6
    index = torch.tensor([0, 1, 2, 3]).view(1, 1, 1, 4).expand(1, 1, 8, 4)
    out, lse = selection_attention(q, k, v, index.contiguous(), unit=2, scale=0.5, causal=True)
    assert out[..., :7, :].isfinite().all() and lse[..., :7].isfinite().all()
    assert out[..., 7, :].isnan().any()  # the one row that attends to them
    grad, = torch.autograd.grad(out[..., :7, :].sum(), q)
    assert grad[..., :7, :].isfinite().all()


@pytest.mark.parametrize("bad, message", [
    (dict(index=torch.zeros(1, 2, 5, 1)), "index must be int32 or int64, got torch.float32"),
    (dict(index=torch.zeros(1, 1, 5, 1, dtype=torch.long)), "index must have shape"),
    (dict(unit=0), "unit must be an int >= 1, got 0"),
    (dict(k=torch.zeros(1, 2, 5, 3)), "k must have shape"),
    (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), "key_padding_mask must be a"),
])
def test_bad_input(bad, message):
    call = dict(q=torch.zeros(1, 2, 1, 5, 4), k=torch.zeros(1, 1, 5, 4),
                v=torch.zeros(1, 1, 5, 4), index=torch.zeros(1, 2, 5, 1, dtype=torch.long),
                unit=2, scale=1.0, causal=False)
    call.update(bad)
    if "k" in bad:
        call["v"] = bad["k"]
    with pytest.raises((ValueError, TypeError), match=message):
        selection_attention(**call)


def tile_path(monkeypatch, tile):
    """Every unit size takes the tile path, tiles of `tile` rows; the per-query path fails."""
    monkeypatch.setattr(selection, "TILE", tile)
    monkeypatch.setattr(selection, "FORWARD_RATIO", float("inf"))
    monkeypatch.setattr(selection, "BACKWARD_RATIO", float("inf"))
    monkeypatch.setattr(selection, "_Rows", None)


@pytest.mark.parametrize("chunk", [1 << 22, 40], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("case", CASES, ids=[f"unit{c[0]}-{'causal' if c[1] else 'bidir'}-"
                                                f"H{c[2][0]}x{c[2][2]}" for c in CASES])
def test_tile_path_matches_the_dense_reference(case, chunk, monkeypatch):
    """Tiles of 4 rows over N = 13: a short last tile, unions of different widths per head,
    one tile per chunk when chunked."""
    tile_path(monkeypatch, 4)
    test_selection_matches_the_dense_reference(case, chunk, monkeypatch)


def test_tile_path_with_a_tile_that_selects_nothing(monkeypatch):
    tile_path(monkeypatch, 4)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 2, 10, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, 10, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    index = random_index(1, 2, 10, 5, 2, seed=4)
    index[:, :, 4:8] = -1  # the second tile, in both heads
    out, lse = selection_attention(q, k, v, index, unit=2, scale=0.5, causal=False)
    allowed = selected_mask(index, 2, 10, False)[:, :, None].expand(-1, -1, 2, -1, -1)
    expected = reference_attention(q.reshape(1, 4, 10, 4), k, v, allowed.reshape(1, 4, 10, 10),
                                   scale=0.5).view_as(out)
    torch.testing.assert_close(out, expected)
    assert (out[..., 4:8, :] == 0).all() and lse[..., 4:8].isneginf().all()
    grad, = torch.autograd.grad(out.sum(), q)
    assert (grad[..., 4:8, :] == 0).all() and grad.isfinite().all()


def test_values_that_are_not_finite_take_the_per_query_path(monkeypatch):
    """A union key outside a row's own units would meet it with probability 0 (0 * inf is
    NaN): with keys or values not finite the op gathers per query, with the same guarantee."""
    monkeypatch.setattr(selection, "TILE", 2)
    monkeypatch.setattr(selection, "FORWARD_RATIO", float("inf"))
    monkeypatch.setattr(selection, "BACKWARD_RATIO", float("inf"))
    monkeypatch.setattr(selection, "_Tiles", None)
    test_keys_outside_the_selection_never_reach_an_output()


def test_the_path_follows_the_widest_unions_the_shapes_allow(monkeypatch):
    """Units of 8 keys over 16 keys: a tile's union holds at most 2 units, the tile path runs;
    single keys: 8 rows of one slot each may list 8 different keys, the rows gather per query."""
    monkeypatch.setattr(selection, "TILE", 8)
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 1, 1, 16, 4, generator=gen), *torch.randn(2, 1, 1, 16, 4,
                                                                       generator=gen)
    index = torch.zeros(1, 1, 16, 1, dtype=torch.long)
    monkeypatch.setattr(selection, "_Rows", None)
    selection_attention(q, k, v, index, unit=8, scale=1.0, causal=True)
    with pytest.raises(TypeError):
        selection_attention(q, k, v, index, unit=1, scale=1.0, causal=True)
