"""Learnable sinks (`build(name, sinks=Hq)`), for every variant: forward and gradients (d sink
included) against each variant's float64 reference with an explicit null key (score sink_h,
value 0) in every softmax, on the torch backend and on the Triton kernels (interpreter)."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANT_MODES, padding, qkv, variant_id
from test_compressive import compressive_reference
from test_hierarchical import hierarchical_reference
from test_lsh import lsh_reference
from test_moba import moba_reference
from test_nsa import nsa_reference
from test_routing import routing_reference
from test_topk import topk_reference

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.registry import get


def static_reference(attn, q, k, v, causal, real):
    allowed = dense_mask(attn.pattern(q.shape[2], causal), q.shape[2])
    return reference_attention(q, k, v, allowed, scale=attn.params.scale, key_padding_mask=real,
                               sink=attn.sink)


REFERENCES = {
    "hierarchical": lambda attn, q, k, v, causal, real: hierarchical_reference(
        q, k, v, real, attn.params.block, attn.params.window_blocks, causal, attn.params.scale,
        sink=attn.sink),
    "compressive": lambda attn, q, k, v, causal, real: compressive_reference(
        q, k, v, real, attn, sink=attn.sink),
    "lsh": lambda attn, q, k, v, causal, real: lsh_reference(attn, q, v, causal, real,
                                                             sink=attn.sink),
    "routing": lambda attn, q, k, v, causal, real: routing_reference(attn, q, v, causal, real,
                                                                     sink=attn.sink),
    "moba": lambda attn, q, k, v, causal, real: moba_reference(
        q, k, v, attn.params.block, attn.params.top_k, causal, real, attn.params.scale,
        sink=attn.sink),
    "topk": lambda attn, q, k, v, causal, real: topk_reference(attn, q, k, v, causal, real,
                                                               sink=attn.sink),
    "nsa": lambda attn, q, k, v, causal, real: nsa_reference(attn, q, k, v, causal, real,
                                                             sink=attn.sink),
}


def reference(attn, q, k, v, causal, real):
    """The variant's float64 reference with the module's sink as a null key."""
    if attn.name in REFERENCES:
        return REFERENCES[attn.name](attn, q, k, v, causal, real)
    assert get(attn.name).static_pattern and not get(attn.name).pooled_keys, attn.name
    return static_reference(attn, q, k, v, causal, real)


def with_sinks(name: str, dtype=torch.float64, **params):
    """A variant with 4 sinks set to distinct values, some far from 0, in eval mode."""
    attn = attn_zoo.build(name, **get(name).Params.tiny() | params, sinks=4).to(dtype).eval()
    with torch.no_grad():
        attn.sink.copy_(torch.tensor([0.0, 1.5, -2.0, 4.0]))
    return attn


def check_sinks(attn, causal: bool, dtype: torch.dtype, tolerance: float) -> None:
    """Forward and gradients of q, k, v and the sink (and the variant's own parameters) of a
    float64-rounded input, against the reference, at n = 37 with GQA and padding (the last
    row entirely padded: zeros, whatever the sink)."""
    q, k, v = qkv(batch=3, q_heads=4, kv_heads=2, n=37, dim=16, dtype=dtype, seed=3,
                  requires_grad=True)
    real = padding(3, 37, seed=4)
    torch.manual_seed(0)
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    exact = attn_zoo.build(attn.name, **attn.params.to_dict() | {"backend": "torch"})
    exact.load_state_dict(attn.state_dict())
    exact = exact.double().eval()
    expected = reference(exact, q64, k64, v64, causal, real)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    params = [p for p in attn.parameters()]
    got = torch.autograd.grad(out, (q, k, v, *params), grad.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(expected, (q64, k64, v64, *exact.parameters()), grad,
                               allow_unused=True)
    for label, g, w in zip(["q", "k", "v", *[n for n, _ in attn.named_parameters()]], got, want,
                           strict=True):
        if g is None and w is None:  # a weight the output never reaches (topk's indexer)
            continue
        g = torch.zeros_like(w if w is not None else g) if g is None else g
        w = torch.zeros_like(g, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(g.double(), w, atol=tolerance, rtol=tolerance,
                                   msg=lambda m, label=label: f"d{label}: {m}")


@pytest.mark.parametrize("case", VARIANT_MODES, ids=variant_id)
def test_sinks_match_the_null_key_reference(case):
    name, causal = case
    check_sinks(with_sinks(name, backend="torch"), causal, torch.float64, 1e-10)


TRITON_MODES = [case for case in VARIANT_MODES if "triton" in get(case[0]).backends]


@pytest.mark.parametrize("case", TRITON_MODES, ids=variant_id)
def test_sinks_on_the_kernels(case):
    name, causal = case
    # The interpreter runs a kernel's programs one by one: fewer, longer buckets for lsh.
    params = {"bucket_size": 8} if name == "lsh" else {}
    check_sinks(with_sinks(name, torch.float32, backend="triton", **params), causal,
                torch.float32, 2e-4)


def test_a_sink_is_a_learnable_logit_per_query_head_starting_at_zero():
    attn = attn_zoo.build("local", window=4, sinks=6)
    assert attn.sink.shape == (6,) and torch.equal(attn.sink, torch.zeros(6))
    assert "sink" in dict(attn.named_parameters()) and "sink" in attn.state_dict()
    assert attn_zoo.build("local", window=4).sink is None
    q, k, v = qkv(q_heads=6, kv_heads=3, n=20)
    out = attn(q, k, v, causal=True)
    # sink 0: a null key of weight 1 next to the row's exp-scores, so outputs shrink
    plain = attn_zoo.build("local", window=4)(q, k, v, causal=True)
    assert (out.norm(dim=-1) < plain.norm(dim=-1)).all()
    out.sum().backward()
    assert attn.sink.grad is not None and attn.sink.grad.abs().min() > 0


def test_sinks_must_match_the_query_heads():
    attn = attn_zoo.build("full", sinks=3)
    q, k, v = qkv(q_heads=4, kv_heads=2, n=8)
    with pytest.raises(ValueError, match="built with sinks=3 .* got q with 4 heads"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        attn_zoo.build("full", sinks=-1)
    with pytest.raises(TypeError, match="sinks must be int"):
        attn_zoo.build("full", sinks=True)
