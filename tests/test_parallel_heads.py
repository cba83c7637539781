"""Context parallelism over heads (`attn_zoo.parallel.heads`) on gloo ranks: every rank's
output and the gradients of q, k, v equal the same rows of the single-process call in
float64, learned parameters' gradients summed over ranks equal the single-process ones, and
the recorded traffic equals the plan; for lsh, routing, moba, nsa and topk.

All cases of one world size run inside one spawn; each worker computes the single-process
reference itself from the same seed.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

from attn_zoo import build, context_parallel
from attn_zoo.parallel import CallShape, Traffic, count_traffic, planned_traffic, traffic_totals
from experiments.parallel import run_ranks

BATCH, DIM = 2, 4
PARAMS = {
    "lsh": {"bucket_size": 2, "n_hashes": 3, "seed": 5},
    "routing": {"n_clusters": 3, "window": 4},
    "moba": {"block": 4, "top_k": 3},
    "nsa": {"cmp_block": 4, "cmp_stride": 2, "sel_block": 4, "top_n": 4, "window": 3},
    "topk": {"top_k": 4, "index_heads": 2, "index_dim": 4},
}


class Case(NamedTuple):
    name: str
    causal: bool
    padded: bool = False
    sinks: bool = False
    training: bool = False
    params: dict = {}

    def label(self) -> str:
        return (f"{self.name}{self.params or ''} causal={self.causal} padded={self.padded} "
                f"sinks={self.sinks} training={self.training}")


# World 2: GQA (4 query heads on 2 kv heads), shards of 5 and 8.
CASES_2 = [
    Case("lsh", causal=True, padded=True, sinks=True),
    Case("lsh", causal=False, params={"seed": None}),
    Case("routing", causal=True, padded=True, sinks=True),
    Case("routing", causal=False, training=True),
    Case("moba", causal=True, padded=True, sinks=True),
    Case("moba", causal=False),
    Case("nsa", causal=True, padded=True, sinks=True, training=True, params={"compress": "mlp"}),
    Case("nsa", causal=False, params={"compress": "mean"}),
    Case("topk", causal=True, padded=True, sinks=True, training=True),
    Case("topk", causal=False, training=True),
]
# World 4: 4 query and kv heads, shards of 5, 1, 7 and 4 (the 1-position shard is padded in
# one batch row, shorter than moba's blocks and nsa's compressed blocks).
CASES_4 = [
    Case("lsh", causal=True, padded=True, params={"seed": None}),
    Case("lsh", causal=False, sinks=True),
    Case("routing", causal=True, padded=True, sinks=True, training=True),
    Case("routing", causal=False),
    Case("moba", causal=False, padded=True, sinks=True),
    Case("nsa", causal=True, padded=True, sinks=True, params={"compress": "mean"}),
    Case("nsa", causal=False, training=True, params={"compress": "mlp"}),
    # topk's indexer loss (training mode) is checked at world 2: its checkpointing imports
    # torch._dynamo, seconds per rank.
    Case("topk", causal=False, padded=True, sinks=True),
    Case("topk", causal=True),
]


def _inputs(bounds: tuple[int, ...], q_heads: int, kv_heads: int, padded: bool):
    """Whole-sequence q, k, v, the output's cotangent and the key padding mask (batch row 1
    pads all of rank 1's shard and position 0; row 0 pads position 2 and the last)."""
    n = bounds[-1]
    generator = torch.Generator().manual_seed(n * 100 + q_heads * 10 + kv_heads)
    q, k, v = (torch.randn(BATCH, heads, n, DIM, generator=generator, dtype=torch.float64)
               for heads in (q_heads, kv_heads, kv_heads))
    cotangent = torch.randn(BATCH, q_heads, n, DIM, generator=generator, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(BATCH, n, dtype=torch.bool)
        mask[0, [2, n - 1]] = False
        mask[1, 0] = False
        mask[1, bounds[1]:bounds[2]] = False
    return q, k, v, cotangent, mask


def _module(case: Case, q_heads: int, kv_heads: int):
    """The variant in float64 with random weights and sinks (zero sinks and gates would hide
    a head mix-up)."""
    torch.manual_seed(1)
    attn = build(case.name, **{**PARAMS[case.name], **case.params},
                 sinks=q_heads if case.sinks else 0)
    if attn.weight_names:
        attn.initialize(q_heads, kv_heads, DIM)
    attn.double()
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return attn.train(case.training)


def _run(attn, q, k, v, cotangent, mask, causal, parallel: bool):
    """Forward and backward of (out * cotangent).sum() plus the variant's own loss; returns
    out, the indexer loss (or None) and the gradients of q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    torch.manual_seed(7)  # lsh without seed and routing's first centroids draw from it
    out = (context_parallel(attn, q, k, v, causal=causal, key_padding_mask=mask) if parallel
           else attn(q, k, v, causal=causal, key_padding_mask=mask))
    own = attn.auxiliary_loss() if attn.training else None
    loss = (out * cotangent).sum() + (0 if own is None else own)
    loss.backward()
    return out.detach(), None if own is None else own.detach(), q.grad, k.grad, v.grad


def _compare(case: Case, bounds: tuple[int, ...], q_heads: int, kv_heads: int) -> list[tuple]:
    """(what, parallel, single-process) pairs of one case on this rank; the collectives of the
    check (summing parameter gradients and losses over ranks) run before any comparison."""
    rank = dist.get_rank()
    start, stop = bounds[rank], bounds[rank + 1]
    q, k, v, cotangent, mask = _inputs(bounds, q_heads, kv_heads, case.padded)
    single, parallel = _module(case, q_heads, kv_heads), _module(case, q_heads, kv_heads)

    shape = CallShape(BATCH, q_heads, kv_heads, DIM, torch.float64.itemsize, mask is not None)
    plan = planned_traffic(parallel, bounds, case.causal, shape)[rank]  # before any call
    expected = _run(single, q, k, v, cotangent, mask, case.causal, parallel=False)
    rng_single = torch.get_rng_state()
    shard = (slice(None), slice(None), slice(start, stop))
    with count_traffic() as transfers:
        got = _run(parallel, q[shard], k[shard], v[shard], cotangent[shard],
                   None if mask is None else mask[:, start:stop], case.causal, parallel=True)
    pairs = [("random state", torch.get_rng_state(), rng_single)]
    for what, mine, whole in zip(("out", "grad q", "grad k", "grad v"),
                                 (got[0], *got[2:]), (expected[0], *expected[2:]), strict=True):
        pairs.append((what, mine, whole[shard]))
    if expected[1] is not None:
        loss = got[1].clone()
        dist.all_reduce(loss)
        pairs.append(("indexer loss summed over ranks", loss, expected[1]))
    for (name, mine), whole in zip(parallel.named_parameters(), single.parameters(),
                                   strict=True):
        summed = torch.zeros_like(mine) if mine.grad is None else mine.grad.clone()
        dist.all_reduce(summed)
        pairs.append((f"grad {name} summed over ranks", summed,
                      torch.zeros_like(whole) if whole.grad is None else whole.grad))
    for (name, mine), whole in zip(parallel.named_buffers(), single.buffers(), strict=True):
        pairs.append((f"buffer {name}", mine, whole))
    pairs.append(("traffic", traffic_totals(transfers), plan))
    return pairs


def _rank(cases: list[Case], bounds: tuple[int, ...], q_heads: int, kv_heads: int) -> list[str]:
    """Every case on this rank: the failures, described."""
    failures = []
    for case in cases:
        for what, mine, whole in _compare(case, bounds, q_heads, kv_heads):
            if isinstance(mine, Traffic):
                if mine != whole:
                    failures.append(f"{case.label()}: {what} {mine} != plan {whole}")
                continue
            try:
                torch.testing.assert_close(mine, whole, rtol=1e-10, atol=1e-10)
            except AssertionError as error:
                failures.append(f"{case.label()}: {what}: {error}")
    world = dist.get_world_size()
    q = torch.randn(BATCH, world + 1, bounds[dist.get_rank() + 1] - bounds[dist.get_rank()], DIM)
    with pytest.raises(ValueError, match=rf"'moba'.*q heads {world + 1}, kv heads 1 and "
                                         rf"world size {world}"):
        context_parallel(build("moba"), q, q[:, :1], q[:, :1])
    return failures


@pytest.mark.parametrize(("world", "cases", "bounds", "q_heads", "kv_heads"), [
    pytest.param(2, CASES_2, (0, 5, 13), 4, 2, id="world2-gqa"),
    pytest.param(4, CASES_4, (0, 5, 6, 13, 17), 4, 4, id="world4"),
])
def test_heads_equal_the_single_process_call(world, cases, bounds, q_heads, kv_heads):
    failures = run_ranks(world, _rank, cases, bounds, q_heads, kv_heads)
    assert failures == [[]] * world, "\n".join(
        f"rank {rank}: {failure}" for rank, fails in enumerate(failures) for failure in fails)


def test_planned_traffic_needs_heads_divisible_by_the_world_size():
    with pytest.raises(ValueError, match=r"'topk'.*q heads 6, kv heads 3 and world size 2"):
        planned_traffic(build("topk"), (0, 4, 8), False, CallShape(1, 6, 3, 8, 4))


def test_forward_on_heads_needs_heads_of_the_module():
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match=r"kv heads 1 \.\. 2 must be among .*all_kv_heads=2"):
        build("moba").forward_on_heads(1, 2, q, q[:, :2], q[:, :2])
