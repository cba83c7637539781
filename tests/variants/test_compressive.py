"""`compressive` against a dense float64 reference with pooled keys (forward and gradients,
GQA, padding masks with empty groups and empty rows, every compress mode), pair counts, bad
parameters, the conv's parameters, linear memory."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gradients, check_memory_is_linear, padding_mask, qkv

import attn_zoo
from attn_zoo.reference import PooledKeys, dense_mask, reference_attention


def compressive_reference(q, k, v, real, attn, sink=None):
    """Dense float64 compressive attention; group members gathered as strided slices."""
    segment, mem_len = attn.params.segment, attn.params.mem_len
    cmem_len, rate, mode = attn.params.cmem_len, attn.params.rate, attn.params.compress
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    exact = (j <= i) & (j >= i // segment * segment - mem_len)
    n_groups = n // rate
    end = (i // segment * segment - mem_len) // rate
    groups = torch.arange(n_groups)[None, :]
    recent = (groups < end) & (groups >= end - cmem_len)
    keep = real[:, None, :n_groups * rate, None]
    counts = sum(keep[:, :, r::rate] for r in range(rate))  # real members per group
    has_real = counts > 0

    def pool(x, taps):
        x = x[:, :, :n_groups * rate].double()
        if mode == "max":
            members = torch.where(keep, x, -torch.inf)
            pooled = torch.stack([members[:, :, r::rate] for r in range(rate)]).amax(0)
        else:
            members = torch.where(keep, x, 0.0)
            if mode == "conv":
                pooled = sum(members[:, :, r::rate] * taps[r].double() for r in range(rate))
            else:
                pooled = sum(members[:, :, r::rate] for r in range(rate)) / counts.clamp_min(1)
        return torch.where(has_real, pooled, 0.0)

    conv = mode == "conv"
    pooled = PooledKeys(pool(k, attn.key_conv if conv else None),
                        pool(v, attn.value_conv if conv else None),
                        recent[None, None] & has_real[:, :, :, 0][:, :, None, :], torch.zeros(()))
    return reference_attention(q, k, v, exact, key_padding_mask=real, pooled=pooled, sink=sink)


COMPRESSIVE_CASES = [
    {"segment": 6, "mem_len": 12, "cmem_len": 3, "rate": 2, "compress": "mean"},
    {"segment": 8, "mem_len": 0, "cmem_len": 5, "rate": 4, "compress": "max"},
    {"segment": 4, "mem_len": 8, "cmem_len": 100, "rate": 4, "compress": "conv"},
    {"segment": 5, "mem_len": 5, "cmem_len": 2, "rate": 1, "compress": "conv"},
    {"segment": 6, "mem_len": 6, "cmem_len": 0, "rate": 3, "compress": "mean"},
    {"segment": 32, "mem_len": 64, "cmem_len": 16, "rate": 4, "compress": "max"},
]


def params_id(params: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in params.items())


def compressive(params: dict):
    """A float64 compressive module; random conv taps so that they differ from the mean."""
    attn = attn_zoo.build("compressive", **params).double()
    if params.get("compress") == "conv":
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for taps in (attn.key_conv, attn.value_conv):
                taps.copy_(torch.randn(taps.shape, generator=gen))
    return attn


@pytest.mark.parametrize("params", COMPRESSIVE_CASES, ids=params_id)
@pytest.mark.parametrize("n", [1, 97, 300])
def test_compressive_matches_dense_reference(params, n):
    attn = compressive(params)
    for kv_heads in (1, 2):
        q, k, v = qkv(batch=3, q_heads=4, kv_heads=kv_heads, n=n, dim=8, dtype=torch.float64,
                      seed=n + kv_heads, requires_grad=True)
        real = padding_mask(3, n, seed=n)
        out = attn(q, k, v, causal=True, key_padding_mask=real)
        expected = compressive_reference(q, k, v, real, attn)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        check_gradients(out, expected, (q, k, v, *attn.parameters()))


def test_compressive_conv_starts_as_the_mean_and_learns():
    q, k, v = qkv(n=200, requires_grad=True)
    params = {"segment": 8, "mem_len": 16, "cmem_len": 10, "rate": 4}
    conv = attn_zoo.build("compressive", compress="conv", **params)
    mean = attn_zoo.build("compressive", compress="mean", **params)
    out = conv(q, k, v, causal=True)
    torch.testing.assert_close(out, mean(q, k, v, causal=True), atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    assert [name for name, _ in conv.named_parameters()] == ["key_conv", "value_conv"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())
    assert not list(mean.parameters())


def test_compressive_conv_state_dict_round_trip():
    params = {"segment": 8, "mem_len": 16, "cmem_len": 10, "rate": 4, "compress": "conv"}
    trained = compressive(params).float()
    fresh = attn_zoo.build("compressive", **params)
    fresh.load_state_dict(trained.state_dict())
    q, k, v = qkv(n=120)
    torch.testing.assert_close(fresh(q, k, v, causal=True), trained(q, k, v, causal=True))


def test_compressive_is_causal_only():
    q, k, v = qkv(n=20)
    with pytest.raises(ValueError, match="causal only, got causal=False"):
        attn_zoo.build("compressive")(q, k, v, causal=False)


@pytest.mark.parametrize("params", COMPRESSIVE_CASES + [{}], ids=params_id)
def test_compressive_scored_pairs(params):
    attn = attn_zoo.build("compressive", **params)
    segment, mem_len = attn.params.segment, attn.params.mem_len
    cmem_len, rate = attn.params.cmem_len, attn.params.rate
    for n in (1, 23, 97, 300, 1000):
        exact = int(dense_mask(attn.exact_pattern(n, True), n).sum())
        end = (torch.arange(n)[:, None] // segment * segment - mem_len) // rate
        groups = torch.arange(n // rate)
        pooled = int(((groups < end) & (groups >= end - cmem_len)).sum())
        assert attn.scored_pairs(n, True) == exact + pooled, n


@pytest.mark.parametrize(("name", "params", "match"), [
    ("compressive", {"segment": 0}, "segment must be >= 1, got 0"),
    ("compressive", {"mem_len": -128}, "mem_len must be >= 0, got -128"),
    ("compressive", {"cmem_len": -1}, "cmem_len must be >= 0, got -1"),
    ("compressive", {"rate": 0}, "rate must be >= 1, got 0"),
    ("compressive", {"rate": 3}, r"segment must be a multiple of rate \(3\), got 128"),
    ("compressive", {"mem_len": 200}, r"mem_len must be a multiple of segment \(128\), got 200"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
                                              ("compressive", {"compress": "sum"}),
                                              ("compressive", {"rate": None}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params", "causal"), [
    ("compressive", {"segment": 32, "mem_len": 64, "cmem_len": 16}, True),
])
def test_memory_is_linear(name, params, causal):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn, causal, backward=True)
