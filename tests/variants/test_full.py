"""`full` against the dense float64 reference: cross lengths, gradients, pair counts."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.variants.full import full_pattern


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


@pytest.mark.parametrize(("name", "params"), [("full", {})])
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


def test_flops_closed_form():
    assert attn_zoo.build("full").flops(1000, 64, causal=False) == 4 * 64 * 1000 * 1000
    assert attn_zoo.build("full").flops(1000, 64, causal=True) == 4 * 64 * 1000 * 1001 // 2
