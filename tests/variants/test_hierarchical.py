"""`hierarchical` against a dense float64 reference with pooled keys (forward and gradients,
GQA, padding masks with empty blocks and empty rows), pair counts, bad parameters, linear
memory."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gradients, check_memory_is_linear, padding_mask, qkv

import attn_zoo
from attn_zoo.reference import PooledKeys, dense_mask, reference_attention


def hierarchical_reference(q, k, v, real, block, window_blocks, causal, scale=None, sink=None):
    """Dense float64 hierarchical attention: exact window plus one mean key per far block."""
    n = q.shape[2]
    positions = torch.arange(n)
    rows, cols = (positions // block)[:, None], (positions // block)[None, :]
    exact = ((rows - cols <= window_blocks) & (positions[None, :] <= positions[:, None])
             if causal else (rows - cols).abs() <= window_blocks)
    blocks = torch.arange(-(-n // block))
    far = (rows - blocks > window_blocks) if causal else (rows - blocks).abs() > window_blocks
    members = (positions[None, :] // block == blocks[:, None])[None] & real[:, None, :]  # (B, P, N)
    counts = members.sum(-1).double()
    weights = members.double() / counts.clamp_min(1)[..., None]
    pooled = PooledKeys(
        torch.einsum("bpn,bhnd->bhpd", weights, k.double()),
        torch.einsum("bpn,bhnd->bhpd", weights, v.double()),
        far[None, None] & (counts > 0)[:, None, None, :],
        counts.clamp_min(1).log()[:, None, None, :],
    )
    return reference_attention(q, k, v, exact, scale=scale, key_padding_mask=real, pooled=pooled,
                               sink=sink)


HIERARCHICAL_CASES = [
    {"block": 5, "window_blocks": 1},
    {"block": 8, "window_blocks": 0},
    {"block": 3, "window_blocks": 2},
    {"block": 16, "window_blocks": 2, "scale": 0.3},
    {"block": 1, "window_blocks": 4},
]


def params_id(params: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in params.items())


@pytest.mark.parametrize("params", HIERARCHICAL_CASES, ids=params_id)
@pytest.mark.parametrize("n", [1, 97, 300])
def test_hierarchical_matches_dense_reference(params, n):
    attn = attn_zoo.build("hierarchical", **params)
    for causal, kv_heads in ((False, 2), (True, 1)):
        q, k, v = qkv(batch=3, q_heads=4, kv_heads=kv_heads, n=n, dim=8, dtype=torch.float64,
                      seed=n, requires_grad=True)
        real = padding_mask(3, n, seed=n)
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        expected = hierarchical_reference(q, k, v, real, params["block"],
                                          params["window_blocks"], causal, params.get("scale"))
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        check_gradients(out, expected, (q, k, v))


def test_hierarchical_far_block_weighs_as_its_keys():
    # Keys equal within each block: the pooled key scores exactly as its block_len keys would.
    q, k, v = qkv(batch=1, q_heads=2, kv_heads=2, n=50, dim=8)
    k = k[:, :, ::5].repeat_interleave(5, 2)
    v = v[:, :, ::5].repeat_interleave(5, 2)
    out = attn_zoo.build("hierarchical", block=5, window_blocks=1)(q, k, v)
    torch.testing.assert_close(out, attn_zoo.build("full")(q, k, v), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("params", HIERARCHICAL_CASES + [{}], ids=params_id)
def test_hierarchical_scored_pairs(params):
    attn = attn_zoo.build("hierarchical", **params)
    block, window_blocks = attn.params.block, attn.params.window_blocks
    for n in (1, 23, 97, 300):
        for causal in (False, True):
            exact = int(dense_mask(attn.exact_pattern(n, causal), n).sum())
            rows = torch.arange(n)[:, None] // block
            offset = rows - torch.arange(-(-n // block))
            pooled = int((offset > window_blocks if causal else offset.abs() > window_blocks)
                         .sum())
            assert attn.scored_pairs(n, causal) == exact + pooled, (n, causal)


@pytest.mark.parametrize(("name", "params", "match"), [
    ("hierarchical", {"block": 0}, "block must be >= 1, got 0"),
    ("hierarchical", {"window_blocks": -1}, "window_blocks must be >= 0, got -1"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("hierarchical", {"block": 2.0}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params", "causal"), [
    ("hierarchical", {"block": 16}, False),
])
def test_memory_is_linear(name, params, causal):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn, causal, backward=True)
