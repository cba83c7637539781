"""The attention contract (the README's contract section), checked for every registered
variant at its tiny parameters (`Params.tiny()`), which exercise every part of its pattern."""

from __future__ import annotations

import pytest
import torch
from conftest import STATIC_VARIANTS, VARIANT_MODES, build, call, causal_modes, qkv, variant_id

import attn_zoo
from attn_zoo import flex
from attn_zoo.params import Params
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.registry import get

FLEX_VARIANTS = [name for name in attn_zoo.available() if "flex" in get(name).backends]


def tiny(name: str, **params):
    """The variant at its tiny parameters (and `params`), in evaluation mode."""
    return build(name, **get(name).Params.tiny() | params)


@pytest.fixture
def room_to_recompile():
    # Every flex pattern is its own compiled graph: more than dynamo's default allows.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize("name", attn_zoo.available())
def test_tiny_parameters_are_declared_beside_the_variant(name):
    cls = get(name)
    params = cls.Params.tiny()
    assert set(params) <= set(cls.Params.names())
    own = set(cls.Params.names()) - set(Params.names())
    if own:  # a variant with parameters declares small ones, and they make a sparse pattern
        assert "tiny" in vars(cls.Params), f"{cls.Params.__name__} does not override tiny()"
        attn = tiny(name)
        for causal in causal_modes(name):
            if cls.static_pattern or cls.pooled_keys:
                pattern = attn.pattern if cls.static_pattern else attn.exact_pattern
                allowed = dense_mask(pattern(128, causal), 128)
                full = torch.ones(128, 128, dtype=torch.bool)
                assert not torch.equal(allowed, full.tril() if causal else full)
            assert attn.scored_pairs(128, causal) < 128 * 128


@pytest.mark.parametrize("name", attn_zoo.available())
def test_declared_capabilities_hold(name):
    cls = get(name)
    # Every variant that is not content-based says which pairs it scores.
    assert cls.content_based or cls.static_pattern or cls.pooled_keys
    assert not (cls.static_pattern and cls.pooled_keys)
    attn = tiny(name)
    q, k, v = qkv(n=12)
    if cls.causal_only:
        with pytest.raises(ValueError, match="causal only"):
            attn(q, k, v, causal=False)
    if cls.supports_cross:
        assert attn(q, k[:, :, :9], v[:, :, :9], causal=True).shape == q.shape
    else:
        with pytest.raises(ValueError, match="key length 9"):
            attn(q, k[:, :, :9], v[:, :, :9], causal=True)


@pytest.mark.parametrize("n", [1, 97, 1025])
def test_shape_dtype_and_finite(variant, n):
    name, causal = variant
    attn = tiny(name)
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=1, n=n, dim=32)
    out = call(attn, q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(variant, dtype):
    name, causal = variant
    attn = tiny(name)
    q, k, v = (x.to(dtype) for x in qkv(n=97))
    out = call(attn, q, k, v, causal=causal)
    expected = call(attn, q.float(), k.float(), v.float(), causal=causal)
    assert out.dtype == dtype
    # Only the final rounding to the input dtype may differ: the work runs in float32.
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_heads(variant, kv_heads):
    name, causal = variant
    if get(name).shared_selection:  # tested in tests/variants/test_<name>.py
        pytest.skip(f"{name}'s query heads of one kv head select their keys together")
    attn = tiny(name)
    q, k, v = qkv(q_heads=4, kv_heads=kv_heads, n=70)
    out = call(attn, q, k, v, causal=causal)
    repeat = 4 // kv_heads
    expected = call(attn, q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                    causal=causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padded_keys_are_never_read(variant):
    name, causal = variant
    attn = tiny(name)
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


@pytest.mark.parametrize("case", VARIANT_MODES, ids=variant_id)
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), float("-inf"), -3e38, 3e38])
def test_padded_keys_never_reach_an_output_whatever_they_hold(case, junk):
    name, causal = case
    attn = tiny(name)
    q, k, v = qkv(n=61)
    real = torch.rand(2, 61, generator=torch.Generator().manual_seed(4)) > 0.3
    out = call(attn, q, k, v, causal=causal, key_padding_mask=real)
    k2, v2 = (torch.where(real[:, None, :, None], x, junk) for x in (k, v))
    torch.testing.assert_close(call(attn, q, k2, v2, causal=causal, key_padding_mask=real), out,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", FLEX_VARIANTS)
@pytest.mark.usefixtures("room_to_recompile")
def test_flex_padded_keys_never_reach_an_output_whatever_they_hold(name):
    attn = tiny(name, backend="flex")
    q, k, v = qkv(n=61)
    real = torch.rand(2, 61, generator=torch.Generator().manual_seed(4)) > 0.3
    junk = torch.tensor([float("nan"), float("inf"), float("-inf"), -3e38])[
        torch.arange(61) % 4].view(1, 1, 61, 1)
    k2, v2 = (torch.where(real[:, None, :, None], x, junk) for x in (k, v))
    with torch.no_grad():  # FlexAttention has no backward on CPU
        out = attn(q, k2, v2, causal=True, key_padding_mask=real)
        expected = tiny(name, backend="torch")(q, k, v, causal=True, key_padding_mask=real)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", attn_zoo.available())
def test_no_causal_leakage(name):
    attn = tiny(name)
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
    attn = tiny(name)
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
    attn = tiny(name)
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
    attn = tiny(name)
    for causal in causal_modes(name):
        for n in (1, 100, 700):
            pairs = int(dense_mask(attn.pattern(n, causal), n).sum())
            assert attn.flops(n, 64, causal) == 4 * 64 * pairs


def test_non_contiguous_inputs(variant):
    name, causal = variant
    attn = tiny(name)
    q, k, v = qkv(n=128)
    # (B, N, H, D) storage seen as (B, H, N, D), as projections split into heads produce.
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[1].is_contiguous()
    torch.testing.assert_close(call(attn, *strided, causal=causal),
                               call(attn, q, k, v, causal=causal))


def test_each_backend_receives_its_declared_working_dtype(monkeypatch, room_to_recompile):
    """torch computes 16-bit inputs in float32; flex hands bfloat16 to FlexAttention itself,
    which accumulates in float32, at bfloat16 accuracy against the float64 reference."""
    received = []
    attn = tiny("local")
    run = attn._forward_torch

    def spy_torch(q, k, v, *args):
        received.append(("torch", q.dtype, k.dtype, v.dtype))
        return run(q, k, v, *args)

    monkeypatch.setattr(attn, "_forward_torch", spy_torch)
    create_block_mask, flex_attention = flex._compiled()

    def spy_flex(q, k, v, **kwargs):
        received.append(("flex", q.dtype, k.dtype, v.dtype))
        return flex_attention(q, k, v, **kwargs)

    monkeypatch.setattr(flex, "_compiled", lambda: (create_block_mask, spy_flex))
    q, k, v = (x.bfloat16() for x in qkv(n=97))
    real = torch.rand(2, 97, generator=torch.Generator().manual_seed(1)) > 0.2
    with torch.no_grad():
        attn(q, k, v, causal=True, key_padding_mask=real)
        out = tiny("local", backend="flex")(q, k, v, causal=True, key_padding_mask=real)
    f32, bf16 = torch.float32, torch.bfloat16
    assert received == [("torch", f32, f32, f32), ("flex", bf16, bf16, bf16)]
    assert attn.working_dtype("torch", bf16) == f32 and attn.working_dtype("flex", bf16) == bf16
    assert attn.working_dtype("flex", torch.float64) == torch.float64
    assert out.dtype == bf16
    allowed = dense_mask(attn.pattern(97, True), 97)
    expected = reference_attention(q, k, v, allowed, key_padding_mask=real)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
