"""`full` and `local` against the dense float64 reference, and the block-sparse engine."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo.blocksparse import (
    band_key_blocks,
    block_sparse_attention,
    merge_partial_attentions,
)
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.variants.full import full_pattern
from attn_zoo.variants.local import local_pattern


@pytest.mark.parametrize(("n", "m"), [(5, 12), (12, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_full_cross_lengths_align_bottom_right(n, m, causal):
    q, _, _ = qkv(n=n, dtype=torch.float64, requires_grad=True)
    _, k, v = qkv(n=m, dtype=torch.float64, seed=1, requires_grad=True)
    real = torch.rand(2, m, generator=torch.Generator().manual_seed(m)) > 0.3
    out = attn_zoo.build("full")(q, k, v, causal=causal, key_padding_mask=real)
    allowed = dense_mask(full_pattern(causal, m - n), n, m)
    expected = reference_attention(q, k, v, allowed, key_padding_mask=real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if causal and m < n:  # queries before the first key's diagonal see nothing
        assert torch.equal(out[:, :, : n - m], torch.zeros_like(out[:, :, : n - m]))


@pytest.mark.parametrize(("name", "params"), [("full", {}), ("local", {"window": 3}),
                                              ("local", {"window": 0})])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(name, params, causal):
    attn = attn_zoo.build(name, **params)
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=11, dim=4, dtype=torch.float64,
                  requires_grad=True)
    real = torch.ones(1, 11, dtype=torch.bool)
    real[0, 4] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: attn(q, k, v, causal=causal, key_padding_mask=real), (q, k, v),
        fast_mode=True,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_local_with_a_window_past_the_sequence_is_full(causal):
    q, k, v = qkv(n=90)
    local = attn_zoo.build("local", window=500)(q, k, v, causal=causal)
    full = attn_zoo.build("full")(q, k, v, causal=causal)
    torch.testing.assert_close(local, full, atol=1e-5, rtol=1e-5)


def test_local_with_window_zero_returns_own_value():
    q, k, v = qkv(q_heads=4, kv_heads=2, n=50)
    out = attn_zoo.build("local", window=0)(q, k, v, causal=False)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1))


@pytest.mark.parametrize("window", [1, 63, 64, 65, 200])
def test_local_windows_around_block_edges(window):
    q, k, v = qkv(n=300, dtype=torch.float64)
    for causal in (False, True):
        out = attn_zoo.build("local", window=window)(q, k, v, causal=causal)
        allowed = dense_mask(local_pattern(window, causal), 300)
        torch.testing.assert_close(out, reference_attention(q, k, v, allowed))


def test_engine_returns_the_log_sum_exp_and_its_gradient():
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=21, dim=4, dtype=torch.float64,
                  requires_grad=True)
    grouped = q.view(1, 1, 2, 21, 4)
    pattern = local_pattern(5, True)
    blocks = band_key_blocks(21, 16, 1, 0)

    def run(grouped, k, v):
        return block_sparse_attention(grouped, k, v, blocks, pattern, block=16, scale=0.5)

    out, lse = run(grouped, k, v)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k.expand(1, 2, 21, 4)) * 0.5
    allowed = dense_mask(pattern, 21)
    expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse.view(1, 2, 21), expected)
    for output in (lambda *x: run(*x)[1].sin().sum(), lambda *x: run(*x)[0]):
        assert torch.autograd.gradcheck(output, (grouped, k, v), fast_mode=True)


def test_engine_rows_without_keys_have_minus_infinite_lse():
    q, k, v = qkv(batch=1, q_heads=1, kv_heads=1, n=20, dtype=torch.float64)
    blocks = band_key_blocks(20, 16, 0, 0)
    out, lse = block_sparse_attention(q[:, :, None], k, v, blocks, lambda i, j: j > i + 100,
                                      block=16, scale=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_flops_closed_form():
    assert attn_zoo.build("full").flops(1000, 64, causal=False) == 4 * 64 * 1000 * 1000
    assert attn_zoo.build("full").flops(1000, 64, causal=True) == 4 * 64 * 1000 * 1001 // 2
    local = attn_zoo.build("local", window=256)
    assert local.flops(16384, 64, causal=True) == 4 * 64 * (257 * 258 // 2 + (16384 - 257) * 257)


def test_partial_attentions_merge_exactly():
    q, k, v = qkv(batch=1, q_heads=1, kv_heads=1, n=40, dim=8, dtype=torch.float64,
                  requires_grad=True)
    grouped = q[:, :, None]
    blocks = band_key_blocks(40, 16, 2, 2)
    near, far = (lambda i, j: (i - j).abs() <= 6), (lambda i, j: ((i - j).abs() > 6) & (j < 5))
    parts = [block_sparse_attention(grouped, k, v, blocks, p, block=16, scale=0.3)
             for p in (near, far)]
    out, _ = merge_partial_attentions(parts)
    allowed = dense_mask(lambda i, j: near(i, j) | far(i, j), 40)
    expected = reference_attention(q, k, v, allowed, scale=0.3)
    torch.testing.assert_close(out[:, :, 0], expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)
