"""Ring attention (`full` under context parallelism) against the single-process call: output
and gradients of q, k, v and the sinks on gloo ranks, and the traffic it records."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import attn_zoo
from attn_zoo.parallel import (
    CallShape,
    Traffic,
    count_traffic,
    planned_traffic,
    ring,
    traffic_totals,
)
from experiments.parallel import run_ranks


class Case(NamedTuple):
    name: str
    bounds: tuple[int, ...]
    causal: bool
    q_heads: int = 2
    kv_heads: int = 2
    padding: bool = False
    sinks: bool = False
    dtype: torch.dtype = torch.float64


CASES = {
    2: [
        Case("bidir-gqa", (0, 7, 13), False, q_heads=4, kv_heads=2),
        Case("causal-one-position-shard", (0, 1, 13), True),
        Case("causal-padding-sinks", (0, 9, 17), True, padding=True, sinks=True),
        Case("float32-causal-gqa", (0, 10, 19), True, q_heads=4, kv_heads=1,
             dtype=torch.float32),
    ],
    4: [
        Case("causal-unequal-gqa-sinks", (0, 5, 6, 13, 20), True, q_heads=4, kv_heads=2,
             sinks=True),
        Case("bidir-padding", (0, 4, 9, 10, 17), False, padding=True),
        Case("causal-padding-gqa", (0, 6, 12, 18, 23), True, q_heads=4, kv_heads=1,
             padding=True),
        Case("float32-bidir-sinks", (0, 3, 9, 15, 16), False, sinks=True,
             dtype=torch.float32),
    ],
}
BATCH, DIM = 2, 8


def _padding(bounds: tuple[int, ...]) -> torch.Tensor:
    """Random padding; entry 0 pads rank 1's whole shard, entry 1 every key before rank 2's
    shard (causal, its rows there see no key at all)."""
    n = bounds[-1]
    real = torch.rand(BATCH, n, generator=torch.Generator().manual_seed(n)) > 0.3
    real[0, bounds[1]:bounds[2]] = False
    real[1, :bounds[2]] = False
    return real


def _inputs(case: Case) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(len(case.name))
    n = case.bounds[-1]
    shapes = [(BATCH, case.q_heads, n, DIM), (BATCH, case.kv_heads, n, DIM),
              (BATCH, case.kv_heads, n, DIM), (BATCH, case.q_heads, n, DIM)]
    q, k, v, weights = (torch.randn(s, generator=gen, dtype=torch.float64).to(case.dtype)
                        for s in shapes)
    return [q, k, v], weights, _padding(case.bounds) if case.padding else None


def _rank_case(case: Case) -> dict:
    """This rank's output and gradients under context parallelism next to the single-process
    call's rows, the sink gradients and the recorded traffic."""
    rank = torch.distributed.get_rank()
    start, stop = case.bounds[rank], case.bounds[rank + 1]
    (q, k, v), weights, real = _inputs(case)
    attn = attn_zoo.build("full", sinks=case.q_heads if case.sinks else 0).to(case.dtype)
    if case.sinks:
        with torch.no_grad():
            attn.sink.copy_(torch.linspace(-1.0, 2.0, case.q_heads))
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = attn(*whole, causal=case.causal, key_padding_mask=real)
    (expected * weights).sum().backward()
    expected_sink = None if attn.sink is None else attn.sink.grad.clone()
    attn.zero_grad()
    shard = [x[:, :, start:stop].clone().requires_grad_() for x in (q, k, v)]
    with count_traffic() as transfers:
        out = attn_zoo.context_parallel(attn, *shard, causal=case.causal,
                                        key_padding_mask=None if real is None
                                        else real[:, start:stop])
        (out * weights[:, :, start:stop]).sum().backward()
    return {
        "out": (out.detach(), expected.detach()[:, :, start:stop]),
        **{name: (x.grad, y.grad[:, :, start:stop])
           for name, x, y in zip("qkv", shard, whole, strict=True)},
        "sink": (None if attn.sink is None else attn.sink.grad, expected_sink),
        "traffic": traffic_totals(transfers),
        "ops": sorted({t.op for t in transfers}),
    }


def _empty_batch() -> tuple[torch.Size, torch.Size]:
    """An empty batch under context parallelism: its output's shape and q's gradient's."""
    q = torch.zeros(0, 2, 3 + torch.distributed.get_rank(), DIM, requires_grad=True)
    out = attn_zoo.context_parallel(attn_zoo.build("full"), q, q, q, causal=True)
    out.sum().backward()
    return out.shape, q.grad.shape


def _rank_main(world: int) -> dict:
    return {"empty": _empty_batch(), **{case.name: _rank_case(case) for case in CASES[world]}}


@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_one_process(world):
    results = run_ranks(world, _rank_main, world)
    for rank, result in enumerate(results):
        assert result["empty"] == ((0, 2, 3 + rank, DIM),) * 2
    for case in CASES[world]:
        tolerance = 1e-10 if case.dtype == torch.float64 else 2e-5
        per_rank = [result[case.name] for result in results]
        for rank, got in enumerate(per_rank):
            for name in "out", "q", "k", "v":
                where = f"{case.name} rank {rank} {name}"
                torch.testing.assert_close(*got[name], atol=tolerance, rtol=tolerance,
                                           msg=lambda m, w=where: f"{w}: {m}")
            assert got["ops"] == ["ring", "ring.backward"], case.name
        if case.sinks:
            total = torch.stack([got["sink"][0] for got in per_rank]).sum(0)
            torch.testing.assert_close(total, per_rank[0]["sink"][1], atol=tolerance,
                                       rtol=tolerance, msg=case.name)
        shape = CallShape(BATCH, case.q_heads, case.kv_heads, DIM,
                          torch.tensor([], dtype=case.dtype).element_size(), case.padding)
        plan = planned_traffic(attn_zoo.build("full"), case.bounds, case.causal, shape)
        assert [got["traffic"] for got in per_rank] == plan, case.name


def test_planned_traffic_follows_the_ring():
    bounds = (0, 5, 6, 13, 20)
    shape = CallShape(batch=2, q_heads=4, kv_heads=2, head_dim=8, itemsize=2)
    per_position = 2 * 2 * 2 * 8  # elements of k and v at one position (entries, kv heads)
    plan = ring.planned_traffic(attn_zoo.build("full"), bounds, True, shape)
    # Rank r sends every shard but rank r + 1's and receives every shard but its own; the
    # gradients of every shard pass through each rank once, in float32.
    assert [t.forward_sent for t in plan] == [per_position * 2 * x for x in (19, 13, 13, 15)]
    assert [t.forward_received for t in plan] == [per_position * 2 * x for x in (15, 19, 13, 13)]
    assert [t.backward_sent - t.forward_sent for t in plan] == [per_position * 4 * 20] * 4
    assert [t.backward_received - t.forward_received for t in plan] == [per_position * 4 * 20] * 4
    # What a ring would send does not depend on the variant or on causality.
    assert planned_traffic(attn_zoo.build("local"), bounds, False, shape, scheme="ring") == plan
    one_rank = ring.planned_traffic(attn_zoo.build("full"), (0, 7), True, shape)
    assert one_rank == [Traffic(0, 0, 0, 0)]


def test_ring_refuses_another_pattern():
    q = torch.zeros(1, 1, 3, 4)
    with pytest.raises(TypeError, match="'local'"):
        ring.attend(attn_zoo.build("local"), q, q, q, True, None, None)
