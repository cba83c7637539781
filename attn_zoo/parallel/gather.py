"""The "gather" scheme: each rank gathers exactly the keys its rows' pattern reaches.

For a `PatternAttention` (local, longformer, bigbird, sparse_fixed, sparse_strided,
hierarchical, compressive), rank r's rows [s, e) run every part of the variant's engine
description (`engine_parts` over the whole sequence) against the keys that part reaches from
those rows, and the parts merge by log-sum-exp as in one process:

* a part over the call's own keys reaches the union of its rows' `reach` intervals (the key
  blocks of the rows' blocks, for a block layout; per residue class, for a folded part): a
  halo from the neighbouring rank(s) for a band, the listed blocks and the global keys
  otherwise. These positions, for all parts together, are gathered in one exchange of keys
  and values (with a padding flag when a mask is given);
* a pooled part (block means, compressed groups) reaches pooled keys: a rank builds those it
  reaches whose keys it gathers anyway (`Pool.group`); each other one is built by the rank
  holding its group's last position (a straddling group completed by the few keys before that
  rank's shard, usually in its halo already) and sent to the ranks that reach it, in one
  exchange per pooled part; a part whose pooled keys are the call's own keys picked out
  (sparse_fixed's summary columns) gathers them as keys;
* rows that reach every key (longformer's and bigbird's global rows) are not served by
  gathering the whole sequence to their owner: a part whose rows move fewer elements than its
  keys would travels instead. Its rows go to the ranks holding keys they reach, each computes
  their partial attention over its own keys, and the partial outputs and log-sum-exps come back
  to the owner, which merges them.

Which rank sends what to whom is computed identically on every rank from the shard bounds (a
plan, cached), so no sizes are negotiated, and `planned_traffic` counts the same bytes the
exchanges record. Every rank runs the same exchanges in the same order; each one's input is
tied to the previous one's result and the output to the last one, so autograd runs their
backwards in the reverse order on every rank, an empty one included. Computed by the torch
engine (`attn_zoo.blocksparse`), whatever the variant's backend.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from attn_zoo.attention import Attention, PatternAttention, with_sink, zero_padded
from attn_zoo.blocksparse import block_sparse_attention, cached_key_blocks, merge_partial_attentions
from attn_zoo.parallel import CallShape, Traffic
from attn_zoo.parallel.comm import Shards, exchange, owners
from attn_zoo.patterns import Part, unfolded

PLAN_CACHE_SIZE = 16
"""Plans kept (one per variant, parameters, causal, shards and heads), least recent dropped."""


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PartPlan:
    """One part's share of the plan.

    kind: "rows" (its rows travel), or how its keys are read: "plain", "folded" (per residue
    class), "blocks" (a block layout), "picked" (own keys picked out as pooled keys), "pooled".
    ids[r]: the key ids rank r's run reads, in the run's order: positions ("plain", "folded",
    "blocks"), pooled key indices ("picked", "pooled"); for "rows", the rows of every rank
    that reach keys of rank r, increasing. positions[r]: the own-key positions of ids[r]
    (None for "pooled" and "rows"). group: a pooled part's `Pool.group`.
    """

    kind: str
    ids: list[Tensor]
    positions: list[Tensor | None]
    group: int = 0


@dataclass(frozen=True)
class _Plan:
    """Who sends what to whom in one call, for every rank.

    shares: one `_PartPlan` per engine part over the whole sequence. The parts themselves are
    not kept: a plan serves every module with the same parameters, and a part's pooling reads
    its own module's learned weights.
    gathered[r]: the positions rank r gathers, increasing (its own shard included).
    built[p][r]: the pooled keys rank r builds for pooled part p, increasing: those it reaches
    whose keys it gathers anyway, and those others reach whose group ends in its shard;
    arriving[p][r]: those rank r reaches but does not build, increasing.
    travelling[r]: the rows (of every rank) rank r computes for the parts whose rows travel,
    increasing (none when no part's rows travel).
    """

    bounds: tuple[int, ...]
    shares: list[_PartPlan]
    gathered: list[Tensor]
    built: dict[int, list[Tensor]]
    arriving: dict[int, list[Tensor]]
    travelling: list[Tensor]

    @property
    def world(self) -> int:
        return len(self.bounds) - 1

    def shard(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank], self.bounds[rank + 1]

    def key_sends(self, rank: int) -> tuple[list[Tensor], list[int]]:
        """The shard indices rank sends to each rank in the key exchange, and how many keys it
        receives from each."""
        return self._position_sends(self.gathered, rank)

    def pooled_sends(self, index: int, rank: int) -> tuple[list[Tensor], list[int]]:
        """The pooled keys (indices into its built ones) rank sends to each rank for pooled part
        `index`, and how many it receives from each: a rank receives the pooled keys it reaches
        but does not build, from the rank their group ends in."""
        built, group = self.built[index][rank], self.shares[index].group
        builders = [owners(self.bounds, ((ids + 1) * group).clamp_max(self.bounds[-1]) - 1)
                    for ids in self.arriving[index]]
        send = [torch.searchsorted(built, ids[by == rank])
                for ids, by in zip(self.arriving[index], builders, strict=True)]
        received = [int((builders[rank] == r).sum()) for r in range(self.world)]
        return send, received

    def row_sends(self, rank: int) -> tuple[list[Tensor], list[int]]:
        """The shard rows rank sends to each rank for the parts whose rows travel, and how
        many rows it receives from each."""
        return self._position_sends(self.travelling, rank)

    def _position_sends(self, wanted: list[Tensor], rank: int) -> tuple[list[Tensor], list[int]]:
        """wanted[r]: the positions rank r reads, increasing. Returns the shard indices rank
        sends to each rank, and how many positions it receives from each."""
        s, e = self.shard(rank)
        send = [positions[(positions >= s) & (positions < e)] - s for positions in wanted]
        mine = wanted[rank]
        received = [int(((mine >= a) & (mine < b)).sum())
                    for a, b in map(self.shard, range(self.world))]
        return send, received

    def partial_sends(self, rank: int) -> tuple[list[Tensor], list[int]]:
        """The partials of the rows rank computed (indices into travelling[rank]) it sends back
        to each rank, their owner, and how many of its own rows' partials each sends here."""
        holders = owners(self.bounds, self.travelling[rank])
        send = [(holders == r).nonzero()[:, 0] for r in range(self.world)]
        return send, [int(rows.numel()) for rows in self.row_sends(rank)[0]]

    @property
    def rows_travel(self) -> bool:
        return any(share.kind == "rows" for share in self.shares)


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()


def _plan(attn: PatternAttention, bounds: tuple[int, ...], causal: bool, q_heads: int,
          kv_heads: int, head_dim: int) -> _Plan:
    """The plan of a call (cached): built from the bounds and the pattern alone."""
    key = (attn._part_key("gather", causal), bounds, q_heads, kv_heads, head_dim)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _build_plan(attn, bounds, causal, q_heads, kv_heads, head_dim)
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan


def _build_plan(attn: PatternAttention, bounds: tuple[int, ...], causal: bool, q_heads: int,
                kv_heads: int, head_dim: int) -> _Plan:
    n, world = bounds[-1], len(bounds) - 1
    parts = attn.engine_parts(n, n, causal)
    shards = [torch.arange(bounds[r], bounds[r + 1]) for r in range(world)]
    shares = []
    for part in parts:
        share = _keys_share(part, shards, n, causal)
        if part.pool is None and part.fold == 1:
            rows = _rows_share(part, bounds, n)
            if _cheaper_to_move_rows(share, rows, bounds, q_heads, kv_heads, head_dim):
                share = rows
        shares.append(share)
    wanted = [torch.zeros(n, dtype=torch.bool) for _ in range(world)]
    for r in range(world):
        wanted[r][bounds[r]:bounds[r + 1]] = True
        for share in shares:
            if share.positions[r] is not None:
                wanted[r][share.positions[r]] = True
    built, arriving = {}, {}
    for index, (part, share) in enumerate(zip(parts, shares, strict=True)):
        if share.kind != "pooled":
            continue
        group = part.pool.group
        # A rank builds the pooled keys it reaches whose keys it gathers anyway; the others
        # come from the rank their group ends in, which completes a straddling group first.
        local = [ids[_complete(wanted[r], ids, group, n)] for r, ids in enumerate(share.ids)]
        remote = torch.unique(torch.cat([ids[~torch.isin(ids, mine)]
                                         for ids, mine in zip(share.ids, local, strict=True)]))
        builders = owners(bounds, ((remote + 1) * group).clamp_max(n) - 1)
        built[index], arriving[index] = [], []
        for r in range(world):
            for_others = remote[builders == r]
            built[index].append(torch.unique(torch.cat([local[r], for_others])))
            ids = share.ids[r]
            arriving[index].append(ids[~torch.isin(ids, built[index][r])])
            wanted[r] |= _cover(for_others * group, ((for_others + 1) * group).clamp_max(n) - 1,
                                n)
    gathered = [mask.nonzero()[:, 0] for mask in wanted]
    travelling = [share.ids for share in shares if share.kind == "rows"]
    travelling = [torch.unique(torch.cat(rows)) for rows in zip(*travelling, strict=True)]
    return _Plan(bounds, shares, gathered, built, arriving, travelling)


def _complete(wanted: Tensor, ids: Tensor, group: int, n: int) -> Tensor:
    """Whether every key of each pooled key's group (`ids`) is among the `wanted` positions."""
    counts = torch.nn.functional.pad(wanted.long().cumsum(0), (1, 0))
    first, end = ids * group, ((ids + 1) * group).clamp_max(n)
    return counts[end] - counts[first] == end - first


def _cover(first: Tensor, last: Tensor, size: int) -> Tensor:
    """(size,) bool: the union of the inclusive intervals [first, last] clamped to 0..size-1."""
    first, last = first.clamp_min(0), last.clamp_max(size - 1)
    keep = first <= last
    diff = torch.zeros(size + 1, dtype=torch.long)
    ones = torch.ones(int(keep.sum()), dtype=torch.long)
    diff.index_add_(0, first[keep], ones)
    diff.index_add_(0, last[keep] + 1, -ones)
    return diff.cumsum(0)[:size] > 0


def _pooled_count(part: Part, n: int) -> int:
    """How many pooled keys the part has over n positions."""
    if part.pool.group:
        return -(-n // part.pool.group)
    return int((part.pool.position(torch.arange(n)) <= n - 1).sum())


def _pooled_reach(part: Part, rows: Tensor, n: int, causal: bool) -> tuple[Tensor, Tensor]:
    """The pooled keys rows reach, inclusive, clamped to those there are (and, causal, to those
    whose position is at most the row's)."""
    count = _pooled_count(part, n)
    first, last = part.reach(rows)
    first, last = first.clamp_min(0), last.clamp_max(count - 1)
    if causal:
        positions = part.pool.position(torch.arange(count))
        last = last.minimum(torch.searchsorted(positions, rows, right=True) - 1)
    return first, last


def _folded_reach(part: Part, rows: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(residue class, first, last index in the class) of the keys rows reach in a folded
    part, clamped to the class's positions."""
    fold = part.fold
    residue = rows % fold
    first, last = part.reach(rows // fold)
    return residue, first.clamp_min(0), last.minimum((n - 1 - residue).div(fold,
                                                                         rounding_mode="floor"))


def _keys_share(part: Part, shards: list[Tensor], n: int, causal: bool) -> _PartPlan:
    """The keys each rank's rows reach in `part`, read in place by a run over them."""
    ids, positions = [], []
    if part.blocks is not None:
        block = part.extent
        for rows in shards:
            row_blocks = torch.unique(rows // block)
            key_blocks = part.blocks[row_blocks].any(0).nonzero()[:, 0]
            keys = (key_blocks[:, None] * block + torch.arange(block)).flatten()
            keys = keys[keys < n]
            ids.append(keys)
            positions.append(keys)
        return _PartPlan("blocks", ids, positions)
    if part.pool is not None:
        count = _pooled_count(part, n)
        for rows in shards:
            wanted = _cover(*_pooled_reach(part, rows, n, causal), count).nonzero()[:, 0]
            ids.append(wanted)
            positions.append(None if part.pool.group else part.pool.position(wanted))
        return _PartPlan("pooled" if part.pool.group else "picked", ids, positions,
                         part.pool.group)
    if part.fold > 1:
        fold = part.fold
        width = -(-n // fold) + 1
        for rows in shards:
            residue, first, last = _folded_reach(part, rows, n)
            keep = first <= last
            cover = _cover((residue * width + first)[keep], (residue * width + last)[keep],
                           fold * width).view(fold, width)
            residues, indices = cover.nonzero().unbind(1)  # by (class, index): the run's order
            keys = indices * fold + residues
            ids.append(keys)
            positions.append(keys)
        return _PartPlan("folded", ids, positions)
    for rows in shards:
        first, last = part.reach(rows)
        keys = _cover(first, last, n).nonzero()[:, 0]
        ids.append(keys)
        positions.append(keys)
    return _PartPlan("plain", ids, positions)


def _row_reach(part: Part, rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """First and last key (inclusive, clamped) each row reaches in an unfolded part over the
    call's own keys; a block layout's rows reach from their first to their last key block."""
    if part.blocks is None:
        first, last = part.reach(rows)
        return first.clamp_min(0), last.clamp_max(n - 1)
    block, layout = part.extent, part.blocks.to(torch.uint8)
    listed = part.blocks.any(1)
    first = torch.where(listed, layout.argmax(1) * block, n)  # argmax: the first maximum
    last = layout.shape[1] - layout.flip(1).argmax(1)
    last = torch.where(listed, (last * block).clamp_max(n) - 1, -1)
    return first[rows // block], last[rows // block]


def _rows_share(part: Part, bounds: tuple[int, ...], n: int) -> _PartPlan:
    """The rows each rank computes when the part's rows travel to its keys: the rows of every
    rank whose reach meets that rank's shard."""
    rows = torch.arange(n)
    first, last = _row_reach(part, rows, n)
    ids = [rows[(first <= last) & (first < bounds[r + 1]) & (last >= bounds[r])]
           for r in range(len(bounds) - 1)]
    return _PartPlan("rows", ids, [None] * len(ids))


def _cheaper_to_move_rows(keys: _PartPlan, rows: _PartPlan, bounds: tuple[int, ...],
                          q_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether moving the part's rows (q out, output and lse back) moves fewer elements than
    gathering its keys and values."""
    key_moves = sum(int(((ids < bounds[r]) | (ids >= bounds[r + 1])).sum())
                    for r, ids in enumerate(keys.positions))
    row_moves = sum(int(((ids < bounds[r]) | (ids >= bounds[r + 1])).sum())
                    for r, ids in enumerate(rows.ids))
    return row_moves * q_heads * (2 * head_dim + 1) < key_moves * kv_heads * 2 * head_dim


# -- the call -------------------------------------------------------------------------------


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, causal: bool,
           key_padding_mask: Tensor | None, shards: Shards) -> Tensor:
    """This rank's rows of `attn(q, k, v)` over the whole sequence; see the module docstring.

    q: (B, Hq, n, D); k, v: (B, Hkv, n, D); key_padding_mask: (B, n) bool or None: this rank's
    shard. Returns (B, Hq, n, D) in q's dtype, the sink applied.
    """
    if not isinstance(attn, PatternAttention):
        raise TypeError(f"the gather scheme runs a PatternAttention, got {type(attn).__name__} "
                        f"({attn.name!r})")
    batch, q_heads, n_local, dim = q.shape
    kv_heads = k.shape[1]
    if batch == 0:  # every rank agrees on the batch size: nothing to send anywhere
        return attn(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    plan = _plan(attn, shards.bounds, causal, q_heads, kv_heads, dim)
    call = _Call(attn, plan, shards, causal, q, k, v, key_padding_mask)
    results = []
    for index, (part, share) in enumerate(zip(call.parts, plan.shares, strict=True)):
        if share.kind == "pooled":
            results.append(call.pooled_run(index, part, share))
        elif share.kind != "rows":
            results.append(call.own_run(part, share))
    if plan.rows_travel:
        results.append(call.travelling_rows())
    results = [result for result in results if result is not None]
    if results:
        out, lse = merge_partial_attentions(results) if len(results) > 1 else results[0]
    else:
        out = call.q.new_zeros(call.q.shape)
        lse = out.new_full(out.shape[:-1], float("-inf"))
    if attn.sink is not None:
        out = with_sink(out, lse, attn.sink.view(kv_heads, -1, 1))
    out = _After.apply(out, call.chain)
    return out.reshape(batch, q_heads, n_local, dim).to(q.dtype)


class _Call:
    """One rank's side of a call: its shard, the gathered keys, and the exchanges in order
    (`chain`: the result of the last one, which the next one's input is tied to)."""

    def __init__(self, attn: PatternAttention, plan: _Plan, shards: Shards, causal: bool,
                 q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
        self.attn, self.plan, self.shards, self.causal = attn, plan, shards, causal
        self.rank, self.n = shards.rank, plan.bounds[-1]
        self.parts = attn.engine_parts(self.n, self.n, causal)
        self.start, self.stop = shards.start, shards.stop
        batch, q_heads, n_local, dim = q.shape
        kv_heads = k.shape[1]
        self.dim, self.masked, self.device = dim, key_padding_mask is not None, q.device
        self.work = attn.working_dtype("torch", q.dtype)
        self.scale = attn.params.scale if attn.params.scale is not None else dim**-0.5
        self.q = q.to(self.work).reshape(batch, kv_heads, q_heads // kv_heads, n_local, dim)
        self.q_input = q
        rows = [k, v]
        if self.masked:
            # Padded keys may hold anything: zeroed before they travel (as `_attend` does),
            # their padding a flag beside them: 0 for a real key, -inf for a padded one.
            real = key_padding_mask[:, None, :, None]
            rows = [*zero_padded(k, v, key_padding_mask),
                    torch.where(real, 0.0, float("-inf")).to(k.dtype).expand(
                        batch, kv_heads, n_local, 1)]
        self.local, self.local_mask = rows[:2], key_padding_mask
        send, received = plan.key_sends(self.rank)
        self.chain = exchange(torch.cat(rows, -1), self._on(send), received, shards, 2)
        gathered = self.chain.to(self.work)
        self.k, self.v = gathered[..., :dim], gathered[..., dim:2 * dim]
        self.mask = gathered[:, 0, :, 2 * dim] == 0 if self.masked else None
        self.positions = plan.gathered[self.rank]

    def _on(self, index):
        """Plan tensors (made on the CPU) on the call's device: one, or a list of them."""
        if isinstance(index, Tensor):
            return index.to(self.device)
        return [x.to(self.device) for x in index]

    def _exchange(self, x: Tensor, send: list[Tensor], received: list[int]) -> Tensor:
        self.chain = exchange(_After.apply(x, self.chain), self._on(send), received,
                              self.shards, 2)
        return self.chain

    def _table_key(self, part: Part, kind: str) -> tuple:
        return (self.attn._part_key(part.name, self.causal), "gather", kind, self.plan.bounds,
                self.rank)

    def _run(self, part: Part, kind: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
             bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """(out, lse) of a remapped part over q (B, Hkv, G, R, D) and k, v (B, Hkv, K, D), or
        None when it has no rows or no keys."""
        if q.shape[3] == 0 or k.shape[2] == 0:
            return None
        table = cached_key_blocks(self._table_key(part, kind), part, q.shape[3], k.shape[2],
                                  q.device)
        return block_sparse_attention(q, k, v, table, part.pattern, block=part.block,
                                      scale=self.scale, key_padding_mask=mask, key_bias=bias)

    def _own_keys(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The gathered keys, values and mask at `positions` (a view when they are a run)."""
        index = self._on(torch.searchsorted(self.positions, positions))
        if index.numel() and bool((index.diff() == 1).all()):
            keys = slice(int(index[0]), int(index[-1]) + 1)
            return (self.k[:, :, keys], self.v[:, :, keys],
                    None if self.mask is None else self.mask[:, keys])
        return (self.k.index_select(2, index), self.v.index_select(2, index),
                None if self.mask is None else self.mask.index_select(1, index))

    def own_run(self, part: Part, share: _PartPlan) -> tuple[Tensor, Tensor] | None:
        """This rank's rows of a part over the call's own keys, against the gathered keys it
        reaches, in local row order."""
        n, s, e = self.n, self.start, self.stop
        ids, positions = share.ids[self.rank], share.positions[self.rank]
        k, v, mask = self._own_keys(positions)
        rows, q = torch.arange(s, e), self.q
        kind = share.kind
        if kind == "blocks":  # rows from the start of the first block: the layout's tiles
            block = part.extent
            skip = s - s // block * block
            rows = torch.arange(s - skip, e)
            q = torch.nn.functional.pad(q, (0, 0, skip, 0))
            blocks = part.blocks[torch.unique(rows // block)][:, torch.unique(positions // block)]
            allowed = _remapped(part.pattern, rows, positions, self.device, skip)
            result = self._run(Part(part.name, allowed, None, block, blocks=blocks), kind, q, k,
                               v, mask)
            return None if result is None else tuple(x[:, :, :, skip:] for x in result)
        if kind == "folded":  # rows and keys by (residue class, position): reaches are runs
            fold = part.fold
            order = torch.argsort(rows % fold * n + rows)
            rows, q = rows[order], q[:, :, :, self._on(order)]
            residue, first, last = _folded_reach(part, rows, n)
            order_keys = positions % fold * n + positions
            low, high = residue * n + first * fold + residue, residue * n + last * fold + residue
            allowed = _remapped(unfolded(part.pattern, fold), rows, positions, self.device)
        elif kind == "picked":
            first, last = _pooled_reach(part, rows, n, self.causal)
            order_keys, low, high = ids, first, last
            allowed = _remapped(part.pattern, rows, ids, self.device)
        else:
            first, last = part.reach(rows)
            order_keys, low, high = positions, first.clamp_min(0), last.clamp_max(n - 1)
            allowed = _remapped(part.pattern, rows, positions, self.device)
        reach = _reach(order_keys, low, high, self.device)
        result = self._run(Part(part.name, allowed, reach, part.extent), kind, q, k, v, mask)
        if result is None or kind != "folded":
            return result
        inverse = self._on(torch.argsort(order))
        return tuple(x[:, :, :, inverse] for x in result)

    def pooled_run(self, index: int, part: Part, share: _PartPlan) -> tuple[Tensor, Tensor] | None:
        """This rank's rows of a pooled part, against the pooled keys they reach: built here
        when their keys are here, else by the rank their group ends in, which sends them."""
        dim, built = self.dim, self.plan.built[index][self.rank]
        built_keys = self._build(part, built)
        arrived = self._exchange(built_keys, *self.plan.pooled_sends(index, self.rank))
        ids = share.ids[self.rank]
        here = ids[torch.isin(ids, built)]
        order = torch.argsort(torch.cat([self.plan.arriving[index][self.rank], here]))
        own = built_keys[:, :, self._on(torch.searchsorted(built, here))]
        pooled = torch.cat([arrived, own], 2)[:, :, self._on(order)]  # by pooled key index
        flag = pooled[:, 0, :, 2 * dim]
        real = flag > float("-inf")
        rows = torch.arange(self.start, self.stop)
        first, last = _pooled_reach(part, rows, self.n, self.causal)
        remapped = Part(part.name, _remapped(part.pattern, rows, ids, self.device),
                        _reach(ids, first, last, self.device), part.extent)
        return self._run(remapped, "pooled", self.q, pooled[..., :dim], pooled[..., dim:2 * dim],
                         real if self.masked else None, torch.where(real, flag, 0.0))

    def _build(self, part: Part, built: Tensor) -> Tensor:
        """The pooled keys `built` (increasing), from the gathered keys: (B, Hkv, len(built),
        2D + 1), keys, values and a flag: the pooled key's score bias, -inf for one without
        a real key (never attended to)."""
        group, dim, n = part.pool.group, self.dim, self.n
        batch, kv_heads = self.k.shape[:2]
        pieces = [self.k.new_zeros(batch, kv_heads, 0, 2 * dim + 1)]
        # Runs of consecutive groups: their keys are one slice of the gathered ones.
        for run in torch.tensor_split(built, (built.diff() != 1).nonzero()[:, 0] + 1):
            if run.numel() == 0:
                continue
            first, end, size = int(run[0]) * group, min((int(run[-1]) + 1) * group, n), run.numel()
            a = int(torch.searchsorted(self.positions, first))
            keys = slice(a, a + end - first)
            pooled = part.pool.build(self.k[:, :, keys], self.v[:, :, keys],
                                     None if self.mask is None else self.mask[:, keys])
            flag = torch.zeros(batch, size, dtype=self.work, device=self.device)
            if pooled.bias is not None:
                flag = flag + pooled.bias.to(self.work)[:, :size]
            if pooled.real is not None:
                flag = torch.where(pooled.real[:, :size], flag, float("-inf"))
            pieces.append(torch.cat([pooled.k[:, :, :size], pooled.v[:, :, :size],
                                     flag[:, None, :, None].expand(-1, kv_heads, -1, 1)], -1))
        return torch.cat(pieces, 2)

    def travelling_rows(self) -> tuple[Tensor, Tensor]:
        """The parts whose rows travel: this rank's rows go to the ranks holding keys they
        reach, each computes their partial attention over its own keys, and the partials come
        back here to merge. Returns this rank's rows' merged partial (out, lse)."""
        plan, dim, s, e = self.plan, self.dim, self.start, self.stop
        send, received = plan.row_sends(self.rank)
        arrived = self._exchange(self.q_input, send, received)
        batch, kv_heads, groups = self.q.shape[:3]
        here = plan.travelling[self.rank]
        q = arrived.to(self.work).reshape(batch, kv_heads, groups, -1, dim)
        k, v = (x.to(self.work) for x in self.local)
        partials = []
        for part, share in zip(self.parts, plan.shares, strict=True):
            if share.kind != "rows":
                continue
            rows = share.ids[self.rank]
            first, last = _row_reach(part, rows, self.n)
            keys = torch.arange(s, e)
            remapped = Part(part.name, _remapped(part.pattern, rows, keys, self.device),
                            _reach(keys, first, last, self.device), part.extent)
            where = self._on(torch.searchsorted(here, rows))
            result = self._run(remapped, "rows", q[:, :, :, where], k, v, self.local_mask)
            if result is not None:
                partials.append(_placed(result, where, here.numel()))
        if partials:
            out, lse = merge_partial_attentions(partials) if len(partials) > 1 else partials[0]
        else:
            out = q.new_zeros(q.shape)
            lse = out.new_full(out.shape[:-1], float("-inf"))
        # Back to the rows' owners, the lse beside the output.
        payload = torch.cat([out, lse[..., None]], -1).reshape(batch, kv_heads * groups, -1,
                                                                dim + 1)
        back = self._exchange(payload, *plan.partial_sends(self.rank))
        back = back.reshape(batch, kv_heads, groups, -1, dim + 1)
        active = torch.unique(torch.cat(send))  # this shard's rows that travelled
        sources, offset = [], 0
        for rows in send:
            part_out = back[..., offset:offset + rows.numel(), :]
            offset += rows.numel()
            sources.append(_placed((part_out[..., :dim], part_out[..., dim]),
                                   self._on(torch.searchsorted(active, rows)), active.numel()))
        merged = merge_partial_attentions(sources) if len(sources) > 1 else sources[0]
        return _placed(merged, self._on(active), e - s)


def _remapped(pattern, rows: Tensor, keys: Tensor, device: torch.device, skip: int = 0):
    """`pattern` over a run's rows and keys: pair (a, b) is pattern(rows[a], keys[b]), rows
    before `skip` allowed nothing. Engines evaluate padded rows and key slots past the ends
    (masked anyway): they read the last ones."""
    last_row, last_key = rows.numel() - 1, max(keys.numel() - 1, 0)
    rows, keys = rows.to(device), keys.to(device)

    def allowed(a: Tensor, b: Tensor) -> Tensor:
        result = pattern(rows[a.clamp(0, last_row)], keys[b.clamp(0, last_key)])
        return result & (a >= skip) if skip else result

    return allowed


def _reach(keys: Tensor, low: Tensor, high: Tensor, device: torch.device):
    """The reach of a run whose key ids are `keys` (increasing): row a reaches the keys with
    ids in [low[a], high[a]]."""
    first = torch.searchsorted(keys, low).to(device)
    last = (torch.searchsorted(keys, high, right=True) - 1).to(device)
    top = first.numel() - 1

    def reach(a: Tensor) -> tuple[Tensor, Tensor]:
        a = a.clamp(0, top)
        return first[a], last[a]

    return reach


def _placed(result: tuple[Tensor, Tensor], where: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A partial (out (B, Hkv, G, R, D), lse (B, Hkv, G, R)) of R rows placed at rows `where`
    of `size` rows, the others out = 0, lse = -inf (no key)."""
    out, lse = result
    placed_out = out.new_zeros(*out.shape[:3], size, out.shape[4]).index_copy(3, where, out)
    placed_lse = lse.new_full((*lse.shape[:3], size), float("-inf")).index_copy(3, where, lse)
    return placed_out, placed_lse


class _After(torch.autograd.Function):
    """x, made to depend on `before` (a previous exchange's result): autograd then runs the
    backward of that exchange after everything computed from x, on every rank, and runs it
    even where nothing else reads its result."""

    @staticmethod
    def forward(ctx, x: Tensor, before: Tensor) -> Tensor:
        ctx.before = (before.shape, before.dtype, before.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.before
        return grad, torch.zeros(shape, dtype=dtype, device=device)


# -- traffic --------------------------------------------------------------------------------


def planned_traffic(attn: Attention, bounds: tuple[int, ...], causal: bool,
                    shape: CallShape) -> list[Traffic]:
    """The bytes each rank sends and receives in a call over shards `bounds`, forward and
    backward (`attn_zoo.parallel.Traffic` per rank), as the exchanges record them (with a mask,
    `shape.masked`, a padding flag travels beside each key)."""
    bounds = tuple(bounds)
    plan = _plan(attn, bounds, causal, shape.q_heads, shape.kv_heads, shape.head_dim)
    batch, dim, item = shape.batch, shape.head_dim, shape.itemsize
    work = max(item, 4)  # 16-bit inputs are computed in float32
    traffic = []
    for rank in range(plan.world):
        moves = [(*plan.key_sends(rank), batch * shape.kv_heads * (2 * dim + shape.masked) * item)]
        moves += [(*plan.pooled_sends(index, rank),
                   batch * shape.kv_heads * (2 * dim + 1) * work) for index in plan.built]
        if plan.rows_travel:
            send, received = plan.row_sends(rank)
            moves.append((send, received, batch * shape.q_heads * dim * item))
            moves.append((*plan.partial_sends(rank), batch * shape.q_heads * (dim + 1) * work))
        sent = sum((sum(int(x.numel()) for x in send) - int(send[rank].numel())) * size
                   for send, _, size in moves)
        received = sum((sum(counts) - counts[rank]) * size for _, counts, size in moves)
        traffic.append(Traffic(sent, received, received, sent))
    return traffic
