"""The communication under context parallelism: shards, a differentiable exchange, a ledger.

Every byte a context-parallel call moves is recorded in the ledger that `count_traffic` opens:
by `exchange` (an all-to-all of rows with uneven counts: halos, gathers of listed keys,
all-gathers and the all-to-all over heads are all exchanges), or by the op that sends it
through `record` (the ring's steps). Gradients travel back the same way: the backward of an
exchange is the reverse exchange, with the gradients of a row sent to several ranks summed at
its owner.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Transfer:
    """One collective as this rank saw it: what it sent and received (to and from other
    ranks; rows a rank keeps for itself are not counted)."""

    op: str
    sent_bytes: int
    received_bytes: int


_LEDGERS: list[list[Transfer]] = []


@contextmanager
def count_traffic() -> Iterator[list[Transfer]]:
    """Record every transfer of context-parallel calls (forward and backward) made inside
    the block, on this rank: `with count_traffic() as transfers: ...`."""
    transfers: list[Transfer] = []
    _LEDGERS.append(transfers)
    try:
        yield transfers
    finally:
        _LEDGERS.remove(transfers)


def record(op: str, sent_bytes: int, received_bytes: int) -> None:
    """Enter one transfer into every open ledger."""
    for ledger in _LEDGERS:
        ledger.append(Transfer(op, sent_bytes, received_bytes))


@dataclass(frozen=True)
class Shards:
    """A sequence split over a process group in contiguous shards, in rank order: rank r
    holds positions bounds[r] .. bounds[r + 1] - 1."""

    group: dist.ProcessGroup | None
    rank: int
    bounds: tuple[int, ...]

    @classmethod
    def of(cls, length: int, group: dist.ProcessGroup | None = None,
           agree: dict[str, object] | None = None,
           device: torch.device | str = "cpu") -> Shards:
        """The shards of a call where this rank holds `length` positions, from one all-gather
        (of tensors on `device`: the call's, which the group's backend serves) of the lengths
        and of `agree`: facts (ints, bools) every rank must share, a ValueError naming the
        first that differs."""
        facts = [length, *(int(value) for value in (agree or {}).values())]
        gathered = [torch.zeros(len(facts), dtype=torch.long, device=device)
                    for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, torch.tensor(facts, device=device), group=group)
        table = torch.stack(gathered).cpu()
        for column, name in enumerate(agree or {}, start=1):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                raise ValueError(f"context parallel: {name} must be the same on every rank, "
                                 f"got {values} (by rank)")
        lengths = table[:, 0].tolist()
        if min(lengths) < 1:
            raise ValueError(f"context parallel: every rank must hold at least one position, "
                             f"got shard lengths {lengths} (by rank)")
        bounds = [0]
        for size in lengths:
            bounds.append(bounds[-1] + size)
        return cls(group, dist.get_rank(group), tuple(bounds))

    @property
    def world(self) -> int:
        return len(self.bounds) - 1

    @property
    def n(self) -> int:
        """The whole sequence's length."""
        return self.bounds[-1]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def length(self) -> int:
        """This rank's number of positions."""
        return self.stop - self.start

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)]


def owners(bounds: tuple[int, ...], positions: Tensor) -> Tensor:
    """The rank holding each position when rank r holds bounds[r] .. bounds[r + 1] - 1: long,
    positions' shape."""
    inner = torch.tensor(bounds[1:-1], dtype=torch.long, device=positions.device)
    return torch.searchsorted(inner, positions, right=True)


def exchange(x: Tensor, send: Sequence[Tensor], received: Sequence[int], shards: Shards,
             dim: int) -> Tensor:
    """An all-to-all of rows along `dim`, differentiable.

    x: this rank's rows (any shape); send[r]: (S_r,) long, the indices along `dim` of the rows
    for rank r (a row may go to several ranks, and to itself); received[r]: how many rows
    rank r sends here. Returns the received rows along `dim`, rank by rank in rank order,
    each rank's in its send order. Backward: the reverse exchange, the gradients of a row
    summed over its copies.
    """
    if len(send) != shards.world or len(received) != shards.world:
        raise ValueError(f"exchange needs one send index and one count per rank "
                         f"({shards.world}), got {len(send)} and {len(received)}")
    return _Exchange.apply(x, tuple(send), tuple(received), shards, dim)


def all_gather_rows(x: Tensor, shards: Shards, dim: int, counts: Sequence[int]) -> Tensor:
    """Every rank's rows along `dim`, in rank order (rank r holds counts[r] of them);
    differentiable (the backward sums each row's gradients at its owner)."""
    mine = torch.arange(x.shape[dim], device=x.device)
    return exchange(x, [mine] * shards.world, counts, shards, dim)


def rows_before(x: Tensor, shards: Shards, count: int) -> Tensor:
    """(B, count, ...): the rows of positions start - count .. start - 1 before this rank's
    shard x (B, n_local, ...), from the ranks that hold them, zeros before position 0;
    differentiable."""
    first, end = shards.bounds[shards.rank], shards.bounds[shards.rank + 1]
    # Rank r > this one reads the rows of [start_r - count, start_r) that lie here.
    lows = [max(first, bound - count) if r > shards.rank else end
            for r, bound in enumerate(shards.bounds[:-1])]
    send = [torch.arange(min(low, end) - first, end - first, device=x.device) for low in lows]
    received = [max(0, min(first, shards.bounds[r + 1]) - max(first - count, shards.bounds[r]))
                if r < shards.rank else 0 for r in range(shards.world)]
    rows = exchange(x, send, received, shards, 1)
    return torch.cat([x.new_zeros(x.shape[0], count - rows.shape[1], *x.shape[2:]), rows], 1)


def _all_to_all(rows: Tensor, sent: Sequence[int], received: Sequence[int], shards: Shards,
                op: str) -> Tensor:
    """all_to_all_single of rows (rows along dim 0) with uneven counts, recorded."""
    wire = rows.to(torch.uint8) if rows.dtype == torch.bool else rows  # gloo sends no bool
    out = wire.new_empty((sum(received), *rows.shape[1:]))
    dist.all_to_all_single(out, wire.contiguous(), list(received), list(sent),
                           group=shards.group)
    row_bytes = torch.Size(rows.shape[1:]).numel() * wire.element_size()
    own = shards.rank
    record(op, row_bytes * (sum(sent) - sent[own]), row_bytes * (sum(received) - received[own]))
    return out.bool() if rows.dtype == torch.bool else out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, received, shards, dim):
        ctx.shape, ctx.send, ctx.received, ctx.shards, ctx.dim = x.shape, send, received, \
            shards, dim
        rows = x.movedim(dim, 0)
        outgoing = rows.index_select(0, torch.cat(send)) if send else rows[:0]
        counts = [int(index.numel()) for index in send]
        out = _all_to_all(outgoing, counts, received, shards, "exchange")
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        counts = [int(index.numel()) for index in ctx.send]
        back = _all_to_all(grad.movedim(ctx.dim, 0), ctx.received, counts, ctx.shards,
                           "exchange.backward")
        rows = grad.new_zeros((ctx.shape[ctx.dim], *back.shape[1:]))
        rows.index_add_(0, torch.cat(ctx.send), back)
        return rows.movedim(0, ctx.dim), None, None, None, None
