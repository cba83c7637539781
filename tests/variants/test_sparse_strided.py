"""`sparse_strided` beyond its defaults: against the dense float64 reference (forward and
gradients, GQA and padding), its pattern, pair counts, bad parameters, linear memory."""

from __future__ import annotations

import pytest
from conftest import case_id, check_memory_is_linear, check_static_pattern

import attn_zoo
from attn_zoo.reference import dense_mask

CASES = [
    ("sparse_strided", {"stride": 1}),
    ("sparse_strided", {"stride": 5}),
    ("sparse_strided", {"stride": 16}),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 23, 97, 300])
def test_matches_dense_reference_and_counts_its_pairs(case, n):
    name, params = case
    check_static_pattern(attn_zoo.build(name, **params), n)


def test_sparse_strided_pattern():
    allowed = dense_mask(attn_zoo.build("sparse_strided", stride=4).pattern(20, False), 20)
    assert allowed[10].nonzero().flatten().tolist() == [2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 18]


@pytest.mark.parametrize(("name", "params", "match"), [
    ("sparse_strided", {"stride": 0}, "stride must be >= 1, got 0"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("sparse_strided", {"stride": 4.0}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize(("name", "params"), [
    ("sparse_strided", {"stride": 32}),
])
def test_forward_memory_is_linear(name, params):
    attn = attn_zoo.build(name, **params)
    check_memory_is_linear(attn)
