"""`sparse_fixed` beyond its defaults: against the dense float64 reference (forward and
gradients, GQA and padding), its pattern, pair counts, bad parameters, linear memory."""

from __future__ import annotations

import pytest
from conftest import case_id, check_memory_is_linear, check_static_pattern

import attn_zoo
from attn_zoo.reference import dense_mask

CASES = [
    ("sparse_fixed", {"stride": 1, "summary": 1}),
    ("sparse_fixed", {"stride": 5, "summary": 2}),
    ("sparse_fixed", {"stride": 16, "summary": 16}),
    ("sparse_fixed", {"stride": 24, "summary": 3}),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 23, 97, 300])
def test_matches_dense_reference_and_counts_its_pairs(case, n):
    name, params = case
    check_static_pattern(attn_zoo.build(name, **params), n)


def test_sparse_fixed_pattern():
    attn = attn_zoo.build("sparse_fixed", stride=5, summary=2)
    allowed = dense_mask(attn.pattern(20, False), 20)
    assert allowed[7].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8, 9, 13, 14, 18, 19]
    causal = dense_mask(attn.pattern(20, True), 20)
    assert causal[7].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(("name", "params", "match"), [
    ("sparse_fixed", {"stride": 0}, "stride must be >= 1, got 0"),
    ("sparse_fixed", {"summary": 0}, r"summary must be between 1 and stride \(128\), got 0"),
    ("sparse_fixed", {"stride": 4, "summary": 5},
     r"summary must be between 1 and stride \(4\), got 5"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
                                              ("sparse_fixed", {"summary": "8"}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("sparse_fixed", {"stride": 32}),
])
def test_forward_memory_is_linear(name, params):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn)
