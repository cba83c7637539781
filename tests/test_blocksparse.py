"""The block-sparse torch engine the variants are built on: log-sum-exps and their gradients,
empty rows, exact merges of partial attentions, per-key score bias, key-block tables and
residue folding."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gradients, padding_mask, qkv

from attn_zoo.blocksparse import (
    band_key_blocks,
    block_sparse_attention,
    fold_residues,
    layout_key_blocks,
    merge_partial_attentions,
    span_key_blocks,
    unfold_residues,
)
from attn_zoo.reference import PooledKeys, dense_mask, reference_attention
from attn_zoo.variants.local import local_pattern


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


@pytest.mark.parametrize("batched", [False, True])
def test_engine_key_bias_matches_dense_reference(batched):
    n, block = 45, 8
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=n, dim=8, dtype=torch.float64,
                  requires_grad=True)
    real = padding_mask(2, n, seed=1)
    bias = torch.randn(2 if batched else 1, n, dtype=torch.float64, requires_grad=True)

    def band(i, j):
        return (i - j).abs() <= 10

    out, lse = block_sparse_attention(
        q.unflatten(1, (2, 2)), k, v, band_key_blocks(n, block, 2, 2), band, block=block,
        scale=0.5, key_padding_mask=real, key_bias=bias)
    out = out.flatten(1, 2)
    # The reference adds a bias to pooled keys only: offer every key as a pooled one.
    allowed = dense_mask(band, n)
    expected = reference_attention(
        q, k, v, torch.zeros(n, n, dtype=torch.bool), scale=0.5,
        pooled=PooledKeys(k, v, allowed & real[:, None, None, :], bias[:, None, None, :]))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    check_gradients(out, expected, (q, k, v, bias))
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k.repeat_interleave(2, 1)) * 0.5
    scores = (scores + bias[:, None, None]).masked_fill(~(allowed & real[:, None, None]),
                                                        -torch.inf)
    torch.testing.assert_close(lse.flatten(1, 2), scores.logsumexp(-1))


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
