"""`longformer` beyond its defaults: against the dense float64 reference (forward and gradients,
GQA and padding), dilation and global tokens, pair counts, bad parameters, linear memory."""

from __future__ import annotations

import pytest
import torch
from conftest import case_id, check_memory_is_linear, check_static_pattern, qkv

import attn_zoo
from attn_zoo.reference import dense_mask

CASES = [
    ("longformer", {"window": 3, "dilation": 2, "n_global": 0}),
    ("longformer", {"window": 3, "dilation": 2, "n_global": 5}),
    ("longformer", {"window": 4, "dilation": 3, "n_global": 17}),
    ("longformer", {"window": 0, "dilation": 3, "n_global": 2}),
    ("longformer", {"window": 5, "dilation": 1, "n_global": 20}),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 23, 97, 300])
def test_matches_dense_reference_and_counts_its_pairs(case, n):
    name, params = case
    check_static_pattern(attn_zoo.build(name, **params), n)


def test_longformer_dilation_skips_the_keys_between():
    attn = attn_zoo.build("longformer", window=2, dilation=3, n_global=1)
    allowed = dense_mask(attn.pattern(20, False), 20)
    assert allowed[10].nonzero().flatten().tolist() == [0, 4, 7, 10, 13, 16]
    assert allowed[0].all() and allowed[:, 0].all()
    causal = dense_mask(attn.pattern(20, True), 20)
    assert causal[10].nonzero().flatten().tolist() == [0, 4, 7, 10]
    assert causal[0].nonzero().flatten().tolist() == [0]


def test_longformer_without_dilation_or_globals_is_local():
    q, k, v = qkv(n=150)
    for causal in (False, True):
        out = attn_zoo.build("longformer", window=20)(q, k, v, causal=causal)
        expected = attn_zoo.build("local", window=20)(q, k, v, causal=causal)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("name", "params", "match"), [
    ("longformer", {"window": -1}, "window must be >= 0, got -1"),
    ("longformer", {"dilation": 0}, "dilation must be >= 1, got 0"),
    ("longformer", {"n_global": -2}, "n_global must be >= 0, got -2"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("longformer", {"window": 1.5}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("longformer", {"window": 32, "dilation": 3, "n_global": 16}),
])
def test_forward_memory_is_linear(name, params):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn)
