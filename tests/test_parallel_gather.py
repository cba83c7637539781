"""The "gather" context-parallel scheme against one process, on gloo ranks.

Every case runs inside two spawns (world 2 and world 4): on each rank, the shard's output and
the gradients of q, k, v equal the same rows and positions of the single-process call in
float64, learned weights' gradients summed over ranks equal the single-process ones, and the
recorded traffic equals `planned_traffic`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import attn_zoo
from attn_zoo.parallel import CallShape, Shards, count_traffic, gather, traffic_totals
from experiments.parallel import run_ranks

# (name, params, causal, kv heads, shard lengths for world 2, for world 4, padding)
# padding: None, "some" (a few padded keys holding NaN), "shard" (rank 1's shard all padded).
CASES = [
    ("local", {"window": 3}, True, 2, (13, 8), (5, 1, 7, 8), None),
    ("local", {"window": 3}, False, 1, (13, 8), (5, 1, 7, 8), "some"),
    ("local", {"window": 9, "sinks": 4}, False, 2, (6, 15), (6, 5, 5, 5), "shard"),
    ("local", {"window": 9}, True, 1, (6, 15), (3, 9, 2, 7), "some"),
    ("longformer", {"window": 2, "dilation": 2, "n_global": 2}, False, 2, (10, 11),
     (5, 1, 7, 8), "some"),
    ("longformer", {"window": 3, "dilation": 3, "n_global": 3, "sinks": 4}, True, 1, (10, 11),
     (2, 8, 5, 6), "shard"),
    ("bigbird", {"block": 3, "window_blocks": 3, "n_global_blocks": 1, "n_random": 2},
     False, 2, (13, 9), (5, 1, 7, 9), "some"),
    ("bigbird", {"block": 4, "window_blocks": 1, "n_global_blocks": 1, "n_random": 1,
                 "seed": 3}, True, 1, (11, 11), (6, 6, 5, 5), None),
    ("sparse_fixed", {"stride": 5, "summary": 2}, False, 2, (12, 9), (5, 1, 7, 8), "shard"),
    ("sparse_fixed", {"stride": 4, "summary": 1, "sinks": 4}, True, 1, (12, 9),
     (3, 6, 6, 6), "some"),
    ("sparse_strided", {"stride": 4}, False, 1, (11, 10), (5, 1, 7, 8), "some"),
    ("sparse_strided", {"stride": 3}, True, 2, (11, 10), (4, 4, 4, 9), None),
    ("hierarchical", {"block": 3, "window_blocks": 1}, False, 2, (14, 9), (5, 1, 7, 10),
     "some"),
    ("hierarchical", {"block": 4, "window_blocks": 0}, True, 1, (14, 9), (2, 9, 6, 6),
     "shard"),
    ("compressive", {"segment": 4, "mem_len": 4, "cmem_len": 3, "rate": 2,
                     "compress": "mean"}, True, 2, (14, 12), (5, 1, 7, 13), "some"),
    ("compressive", {"segment": 2, "mem_len": 4, "cmem_len": 2, "rate": 2,
                     "compress": "conv", "sinks": 4}, True, 1, (14, 12), (9, 6, 6, 5),
     "shard"),
    # The same call again with other weights: a module must pool with its own conv taps.
    ("compressive", {"segment": 2, "mem_len": 4, "cmem_len": 2, "rate": 2,
                     "compress": "conv", "sinks": 4}, True, 1, (14, 12), (9, 6, 6, 5),
     "shard"),
]
Q_HEADS, DIM, BATCH = 4, 4, 2


def _case(index: int, world: int):
    name, params, causal, kv_heads, lengths2, lengths4, padding = CASES[index]
    lengths = lengths2 if world == 2 else lengths4
    n = sum(lengths)
    assert n == sum(lengths2)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    gen = torch.Generator().manual_seed(index)
    q = torch.randn(BATCH, Q_HEADS, n, DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(BATCH, kv_heads, n, DIM, generator=gen, dtype=torch.float64)
            for _ in range(2))
    grad = torch.randn(BATCH, Q_HEADS, n, DIM, generator=gen, dtype=torch.float64)
    mask = None
    if padding is not None:
        mask = torch.rand(BATCH, n, generator=gen) > 0.25
        if padding == "shard":
            mask[:, bounds[1]:bounds[2]] = False
        k, v = (torch.where(mask[:, None, :, None], x, float("nan")) for x in (k, v))
    attn = attn_zoo.build(name, **params)
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.add_(torch.rand(parameter.shape, generator=gen, dtype=parameter.dtype))
    return attn.double(), causal, q, k, v, grad, mask, tuple(bounds)


def _rank_cases(world: int) -> list[dict]:
    """Every case on this rank: the largest differences from the one-process call, and the
    recorded and planned traffic."""
    rank = dist.get_rank()
    results = []
    for index in range(len(CASES)):
        attn, causal, q, k, v, grad, mask, bounds = _case(index, world)
        sharded = copy.deepcopy(attn)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attn(*inputs, causal=causal, key_padding_mask=mask)
        (out * grad).sum().backward()
        s, e = bounds[rank], bounds[rank + 1]
        local = [x[:, :, s:e].clone().requires_grad_() for x in (q, k, v)]
        local_mask = None if mask is None else mask[:, s:e]
        shards = Shards.of(e - s)
        assert shards.bounds == bounds
        with count_traffic() as transfers:
            if sharded.parallel == "gather":
                local_out = attn_zoo.context_parallel(sharded, *local, causal=causal,
                                                      key_padding_mask=local_mask)
            else:  # sparse_strided runs the all-to-all over heads, but the gather works too
                local_out = gather.attend(sharded, *local, causal, local_mask, shards)
            (local_out * grad[:, :, s:e]).sum().backward()
        errors = {"out": (local_out - out[:, :, s:e]).abs().max().item()}
        for label, x, whole in zip("qkv", local, inputs, strict=True):
            reference = whole.grad[:, :, s:e]
            mine = torch.zeros_like(reference) if x.grad is None else x.grad
            errors[f"grad {label}"] = (mine - reference).abs().max().item()
        shape = CallShape(BATCH, Q_HEADS, k.shape[1], DIM, 8, mask is not None)
        planned = gather.planned_traffic(sharded, bounds, causal, shape)[rank]
        results.append({
            "case": f"{CASES[index][0]} {CASES[index][1]} causal={causal}",
            "errors": errors,
            "weights": {name: (p.grad, dict(attn.named_parameters())[name].grad)
                        for name, p in sharded.named_parameters()},
            "recorded": tuple(traffic_totals(transfers)), "planned": tuple(planned),
        })
    return results


def _check(world: int) -> None:
    ranks = run_ranks(world, _rank_cases, world)
    for index, _ in enumerate(CASES):
        per_rank = [results[index] for results in ranks]
        case = per_rank[0]["case"]
        for rank, result in enumerate(per_rank):
            for label, error in result["errors"].items():
                assert error < 1e-10, f"{case}, world {world}, rank {rank}: {label} off by {error}"
            assert result["recorded"] == result["planned"], (case, world, rank)
        for name, (_, whole) in per_rank[0]["weights"].items():
            # A rank that pools no group leaves compressive's conv weights without a gradient.
            summed = sum(result["weights"][name][0] for result in per_rank
                         if result["weights"][name][0] is not None)
            torch.testing.assert_close(summed, whole, rtol=1e-10, atol=1e-10,
                                       msg=f"{case}, world {world}: gradient of {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_gather_equals_one_process(world):
    _check(world)


def test_causal_local_sends_only_the_halo():
    window, bounds = 100, (0, 1000, 1500, 1550, 4000)
    shape = CallShape(1, 8, 2, 64, 4)
    traffic = attn_zoo.parallel.planned_traffic(attn_zoo.build("local", window=window), bounds,
                                                True, shape)
    key_bytes = 2 * 2 * 64 * 4  # a key and its value, 2 kv heads, float32
    for rank, (sent, received, back_sent, back_received) in enumerate(traffic):
        start, stop = bounds[rank], bounds[rank + 1]
        halo = start - max(0, start - window)
        # What later ranks' windows reach of this shard.
        reached = sum(max(0, min(stop, later) - max(start, later - window))
                      for later in bounds[rank + 1:-1])
        assert (received, sent) == (halo * key_bytes, reached * key_bytes)
        assert (back_sent, back_received) == (received, sent)
        ring = (bounds[-1] - (stop - start)) * key_bytes
        assert received < ring


def test_gather_refuses_a_variant_without_parts():
    q = k = v = torch.zeros(1, 2, 4, 4)
    with pytest.raises(TypeError, match="PatternAttention.*'lsh'"):
        gather.attend(attn_zoo.build("lsh"), q, k, v, False, None, None)


@pytest.mark.parametrize(("name", "params"), [
    ("longformer", {"window": 16, "n_global": 4}),
    ("bigbird", {"block": 16, "window_blocks": 1, "n_global_blocks": 1, "n_random": 0}),
])
def test_global_rows_travel_instead_of_gathering_every_key(name, params):
    bounds, shape = (0, 1024, 2048, 3072, 4096), CallShape(1, 4, 4, 16, 4)
    attn = attn_zoo.build(name, **params)
    owner = attn_zoo.parallel.planned_traffic(attn, bounds, False, shape)[0]
    every_key = 3072 * 2 * 4 * 16 * 4  # the other shards' keys and values
    # The global rows' owner receives its band's halo, the global rows' partials and
    # (bigbird) its neighbour's window block: a small fraction of every key.
    assert owner.forward_received < every_key / 16
