"""`attn_zoo.context_parallel` for every registered variant (its tiny parameters) on gloo
ranks: each rank's rows and gradients equal the single-process call's; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import attn_zoo
from attn_zoo.registry import get
from experiments.parallel import run_ranks

SHARDS = {2: (8, 11), 4: (5, 1, 7, 6)}
"""Shard lengths by world size (19 positions, unequal, one shard of a single position)."""
HEADS = {2: (4, 2), 4: (8, 4)}
"""(q heads, kv heads) by world size: grouped-query attention, divisible by the world."""


def _tiny(name: str, sinks: int):
    attn = attn_zoo.build(name, **get(name).Params.tiny(), sinks=sinks).double().eval()
    return attn


def _grad(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; zeros where the call left it None (a weight no row used here,
    e.g. topk's indexer outside training)."""
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()


def _case(name: str, causal: bool, padded: bool, world: int) -> dict[str, float]:
    """The largest differences of one case between this rank's CP call and its rows of the
    single-process call: output, q, k, v and parameter gradients."""
    rank, lengths = dist.get_rank(), SHARDS[world]
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    q_heads, kv_heads = HEADS[world]
    n, dim = sum(lengths), 4
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, heads, n, dim, generator=generator, dtype=torch.float64)
               for heads in (q_heads, kv_heads, kv_heads))
    weights = torch.randn(2, q_heads, n, dim, generator=generator, dtype=torch.float64)
    mask = None
    if padded:  # a batch row with padded keys here and there, the 1-position shard padded
        mask = torch.rand(2, n, generator=generator) > 0.3
        mask[1] = True
        mask[0, 5] = False
    torch.manual_seed(3)
    attn = _tiny(name, q_heads)
    with torch.no_grad():
        attn.sink.uniform_(-1, 1)
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(11)  # random draws of a call (lsh rotations) match between the two
    out = attn(*whole, causal=causal, key_padding_mask=mask)
    (out * weights).sum().backward()
    expected = [_grad(p) for p in attn.parameters()]
    attn.zero_grad()
    mine = [x[:, :, start:stop].clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(11)
    shard = attn_zoo.context_parallel(
        attn, *mine, causal=causal,
        key_padding_mask=None if mask is None else mask[:, start:stop])
    (shard * weights[:, :, start:stop]).sum().backward()
    errors = {"out": (shard - out[:, :, start:stop]).abs().max().item()}
    for label, local, full in zip("qkv", mine, whole, strict=True):
        errors[label] = (local.grad - full.grad[:, :, start:stop]).abs().max().item()
    for parameter, grad in zip(attn.parameters(), expected, strict=True):
        summed = _grad(parameter)
        dist.all_reduce(summed)
        errors["parameters"] = max(errors.get("parameters", 0.0),
                                   (summed - grad).abs().max().item())
    return errors


def _every_variant(world: int) -> dict[tuple, dict[str, float]]:
    results = {}
    for name in attn_zoo.available():
        for causal in (True,) if get(name).causal_only else (True, False):
            for padded in (False, True):
                results[name, causal, padded] = _case(name, causal, padded, world)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_every_variant_equals_the_single_process_call(world):
    for rank, results in enumerate(run_ranks(world, _every_variant, world)):
        for (name, causal, padded), errors in results.items():
            worst = max(errors.values())
            assert worst < 1e-10, (f"{name} causal={causal} padded={padded} rank {rank}: "
                                   f"{errors}")


def _bad_input() -> dict[str, str]:
    rank = dist.get_rank()
    messages = {}
    q = torch.randn(1, 3, 4, 8)
    try:  # the all-to-all over heads needs heads divisible by the world size
        attn_zoo.context_parallel(attn_zoo.build("moba", block=2, top_k=1), q, q, q)
    except ValueError as error:
        messages["heads"] = str(error)
    q = torch.randn(1, 2, 4, 8 if rank == 0 else 4)
    try:
        attn_zoo.context_parallel(attn_zoo.build("local", window=2), q, q, q)
    except ValueError as error:
        messages["head_dim"] = str(error)
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    attn = attn_zoo.build("local", window=2)
    out = attn_zoo.context_parallel(attn, q, q, q, causal=True, group=alone)
    messages["alone"] = str(torch.equal(out, attn(q, q, q, causal=True)))
    return messages


def test_bad_input_is_a_clear_error():
    for messages in run_ranks(2, _bad_input):
        assert "heads" in messages["heads"] and "2" in messages["heads"]
        assert "head_dim must be the same on every rank, got [8, 4]" in messages["head_dim"]
        assert messages["alone"] == "True"
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="torch.distributed initialized"):
        attn_zoo.context_parallel(attn_zoo.build("local", window=2), q, q, q)
    with pytest.raises(ValueError, match="key length 3"):
        attn_zoo.context_parallel(attn_zoo.build("full"), q, q[:, :, :3], q[:, :, :3])
