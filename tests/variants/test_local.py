"""`local` against the dense float64 reference: windows at and past block edges, gradients,
pair counts."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.variants.local import local_pattern


@pytest.mark.parametrize(("name", "params"), [("local", {"window": 3}),
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


def test_flops_closed_form():
    local = attn_zoo.build("local", window=256)
    assert local.flops(16384, 64, causal=True) == 4 * 64 * (257 * 258 // 2 + (16384 - 257) * 257)
