"""The flex backend (FlexAttention over a variant's pattern) equals the torch backend."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.registry import get

FLEX_VARIANTS = [name for name in attn_zoo.available() if "flex" in get(name).backends]


@pytest.fixture(autouse=True)
def room_to_recompile():
    # Every pattern is its own compiled graph; the suite compiles more than dynamo's default
    # allows before it falls back to uncompiled FlexAttention.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize("name", FLEX_VARIANTS)
def test_flex_matches_torch(name):
    q, k, v = qkv(n=300)
    real = torch.rand(2, 300, generator=torch.Generator().manual_seed(0)) > 0.3
    real[1] = False
    causal = True  # one compile per variant keeps the suite fast; padding exercises mask_mod
    with torch.no_grad():  # FlexAttention has no backward on CPU
        expected = attn_zoo.build(name, backend="torch")(q, k, v, causal=causal,
                                                         key_padding_mask=real)
        got = attn_zoo.build(name, backend="flex")(q, k, v, causal=causal, key_padding_mask=real)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_auto_picks_torch_on_cpu_and_flex_is_only_for_patterns():
    assert attn_zoo.build("local").resolve_backend(torch.device("cpu"), torch.float32,
                                                   64) == "torch"
    with pytest.raises(ValueError, match="backend 'flex' is not supported by attention 'full'"):
        attn_zoo.build("full", backend="flex")


@pytest.mark.parametrize("name", ["local", "bigbird"])
def test_sinks_are_a_null_key(name):
    """A sink runs as a null key prepended to the keys, against the float64 reference."""
    attn = attn_zoo.build(name, **get(name).Params.tiny(), sinks=4, backend="flex")
    with torch.no_grad():
        attn.sink.copy_(torch.tensor([0.0, 1.5, -2.0, 4.0]))
    q, k, v = qkv(n=37, seed=1)
    real = torch.rand(2, 37, generator=torch.Generator().manual_seed(2)) > 0.3
    real[-1] = False
    with torch.no_grad():  # FlexAttention has no backward on CPU
        out = attn(q, k, v, causal=True, key_padding_mask=real)
    allowed = dense_mask(attn.pattern(37, True), 37)
    expected = reference_attention(q, k, v, allowed, key_padding_mask=real, sink=attn.sink)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("name", ["local", "longformer"])
def test_packed_rows_run_in_place_as_a_document_mask(name):
    """Rows end to end, the pattern kept inside each document: one compiled mask, equal to
    the torch engine's packed call."""
    params = get(name).Params.tiny() | ({"dilation": 1} if name == "longformer" else {})
    attn, engine = (attn_zoo.build(name, **params, backend=backend) for backend in ("flex",
                                                                                    "torch"))
    assert attn.runs_documents_in_place("flex", 45, True)
    q, k, v = qkv(n=45, seed=3)
    ids = torch.tensor([[0] * 7 + [1] * 30 + [2] * 8, [4] * 45])
    real = torch.rand(2, 45, generator=torch.Generator().manual_seed(4)) > 0.2
    with torch.no_grad():  # FlexAttention has no backward on CPU
        for causal in (False, True):
            torch.testing.assert_close(
                attn(q, k, v, causal=causal, key_padding_mask=real, document_ids=ids),
                engine(q, k, v, causal=causal, key_padding_mask=real, document_ids=ids),
                atol=1e-5, rtol=1e-5)
