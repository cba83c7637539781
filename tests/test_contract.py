"""The attention contract (SPEC.md), checked for every registered variant."""

from __future__ import annotations

import pytest
import torch
from conftest import STATIC_VARIANTS, build, call, causal_modes, qkv

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.registry import get


@pytest.mark.parametrize("n", [1, 97, 1025])
def test_shape_dtype_and_finite(variant, n):
    name, causal = variant
    attn = build(name)
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=n, dim=32)
    out = call(attn, q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(variant, dtype):
    name, causal = variant
    attn = build(name)
    q, k, v = (x.to(dtype) for x in qkv(n=97))
    out = call(attn, q, k, v, causal=causal)
    expected = call(attn, q.float(), k.float(), v.float(), causal=causal)
    assert out.dtype == dtype
    # Only the final rounding to the input dtype may differ: the work runs in float32.
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_heads(variant, kv_heads):
    name, causal = variant
    attn = build(name)
    q, k, v = qkv(q_heads=4, kv_heads=kv_heads, n=70)
    out = call(attn, q, k, v, causal=causal)
    repeat = 4 // kv_heads
    expected = call(attn, q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                    causal=causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padded_keys_are_never_read(variant):
    name, causal = variant
    attn = build(name)
    q, k, v = qkv(n=61)
    real = torch.rand(2, 61, generator=torch.Generator().manual_seed(3)) > 0.4
    real[1] = False  # a batch row with no real key at all
    out = call(attn, q, k, v, causal=causal, key_padding_mask=real)
    noise = torch.randn_like(k) * 100
    k2 = torch.where(real[:, None, :, None], k, noise)
    v2 = torch.where(real[:, None, :, None], v, noise)
    out2 = call(attn, q, k2, v2, causal=causal, key_padding_mask=real)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("name", attn_zoo.available())
def test_no_causal_leakage(name):
    attn = build(name)
    q, k, v = qkv(n=150)
    out = call(attn, q, k, v, causal=True)
    # A content-based variant chooses its keys from all queries (buckets, clusters), so only
    # the values of future positions must stay unseen; a static pattern hides everything.
    changed = "v" if get(name).content_based else "qkv"
    for t in (0, 77, 149):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for label, x in zip("qkv", (q2, k2, v2), strict=True):
            if label in changed:
                x[:, :, t] += 5.0
        out2 = call(attn, q2, k2, v2, causal=True)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], atol=1e-6, rtol=1e-6)
        if not get(name).content_based:  # a routed key may go unread by every query
            assert not torch.allclose(out2[:, :, t], out[:, :, t])


def test_gradients_are_finite_with_empty_rows(variant):
    name, causal = variant
    attn = build(name)
    q, k, v = qkv(n=45, requires_grad=True)
    real = torch.ones(2, 45, dtype=torch.bool)
    real[1] = False
    call(attn, q, k, v, causal=causal, key_padding_mask=real).square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


@pytest.mark.parametrize("name", STATIC_VARIANTS)
@pytest.mark.parametrize("n", [1, 37, 130])
def test_static_pattern_matches_dense_reference(name, n):
    attn = build(name)
    for causal in causal_modes(name):
        q, k, v = qkv(n=n, dtype=torch.float64, seed=n, requires_grad=True)
        real = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) > 0.25
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        allowed = dense_mask(attn.pattern(n, causal), n)
        expected = reference_attention(q, k, v, allowed, key_padding_mask=real)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", STATIC_VARIANTS)
def test_flops_count_the_pattern(name):
    attn = build(name)
    for causal in causal_modes(name):
        for n in (1, 100, 700):
            pairs = int(dense_mask(attn.pattern(n, causal), n).sum())
            assert attn.flops(n, 64, causal) == 4 * 64 * pairs


def test_non_contiguous_inputs(variant):
    name, causal = variant
    attn = build(name)
    q, k, v = qkv(n=128)
    # (B, N, H, D) storage seen as (B, H, N, D), as projections split into heads produce.
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[1].is_contiguous()
    torch.testing.assert_close(call(attn, *strided, causal=causal),
                               call(attn, q, k, v, causal=causal))
