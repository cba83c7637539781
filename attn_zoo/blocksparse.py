"""Block-sparse attention in plain torch, the engine behind the static patterns.

Queries are cut into blocks of `block` rows. Query block `I` visits the key blocks listed in
`key_blocks[I]` (-1 = nothing), and inside those tiles the pattern `allowed(i, j)` decides
exactly which (query, key) pairs count. When every row lists a run of consecutive blocks (a
band, a span), a tile reads its keys as a view of k and v, never a copy; otherwise it gathers
the listed blocks. Work runs over chunks of query blocks whose scores hold about
`CHUNK_ELEMENTS` values, in buffers reused from chunk to chunk, and the backward pass
recomputes the scores from `(q, k, v, out, lse)`, so memory is the output plus one chunk:
never N x N, never the whole (N x keys per query) score tensor. When one query block of
every head alone holds more scores than a chunk (dense rows of a long sequence), the call
runs over batch entries, or kv heads, a few at a time.

Keys outside the pattern never reach an output, whatever they hold: their scores are masked
to -inf, and when v holds a non-finite value (checked in one pass per call) the products
with zero probabilities that would turn it into NaN are left out, so only the rows that
attend to it see it. `part_attention` runs one `attn_zoo.patterns.Part` of a variant's engine
description; `part_key_blocks` builds its key-block table from its reach and pattern.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_zoo.patterns import Part, Pattern, Pooled, Reach

CHUNK_ELEMENTS = 1 << 19
"""Score elements per chunk of query blocks: bounds the working memory of one step."""

TABLE_CACHE_SIZE = 64
"""Key-block tables kept by `cached_key_blocks`, least recently used dropped first."""


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_blocks: Tensor,
    allowed: Pattern,
    *,
    block: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the pairs `allowed(i, j)` inside the listed key blocks.

    q: (B, Hkv, G, N, D), G query heads per kv head; k, v: (B, Hkv, M, D).
    key_blocks: (ceil(N / block), K) long, key block indices per query block, -1 padding.
    key_padding_mask: (B, M) bool, True = a real key.
    key_bias: float broadcastable to (B, M), finite: added to the score of key j for every
    query and head, so scores are `scale * q·k_j + key_bias[b, j]` (e.g. log(block_len) of a
    pooled key); differentiable.
    Returns out (B, Hkv, G, N, D) and lse (B, Hkv, G, N); a row with no allowed key has
    out = 0 and lse = -inf, so partial attentions merge exactly by their log-sum-exps.
    """
    if key_bias is not None:
        key_bias = key_bias.to(q.dtype).expand(q.shape[0], k.shape[2])
    return _BlockSparse.apply(q, k, v, key_blocks, allowed, block, scale, key_padding_mask,
                              key_bias)


def masked_softmax_(scores: Tensor, empty: Tensor) -> Tensor:
    """Row softmax of (T, R, Kb) scores in place; rows flagged `empty` (T, R) become 0.

    The fused softmax costs about a third of separate max, subtract, exp and sum passes.
    """
    probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    if empty.any():  # softmax of a row of -inf is NaN
        probs.masked_fill_(empty[..., None], 0.0)
    return probs


def softmax_tiles(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Masked scores (..., K) -> their row softmax, in place, and each row's log-sum-exp
    (...,); a row with no allowed key (all -inf) gets probabilities 0 and lse -inf."""
    row_max = scores.amax(-1)
    empty = row_max == float("-inf")
    probs = masked_softmax_(scores, empty)
    # p_ij = exp(s_ij - lse_i), so the row's largest p gives its lse.
    return probs, (row_max - probs.amax(-1).log()).masked_fill_(empty, float("-inf"))


def tile_gradients(work: Workspace, probs: Tensor, grad_out: Tensor, q: Tensor, k: Tensor,
                   v: Tensor, delta: Tensor, scale: float,
                   exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of a batch of attention tiles from their recomputed probabilities.

    probs (T, R, K); grad_out, q (T, R, D), q unscaled; k, v (T, K, D); delta (T, R), the
    rows' rowsum(dO * O) - dlse. Returns grad_q (T, R, D), grad_k, grad_v (T, K, D) and
    grad_scores (T, R, K), d loss / d (scale * q.k), in workspace buffers that the next call
    overwrites. exact: k, v or delta may hold inf or NaN; they then reach only the pairs
    with a nonzero probability (a NaN row is marked by its delta).
    """
    if exact:
        k, v, grad_out = (torch.where(torch.isfinite(x), x, 0.0) for x in (k, v, grad_out))
    grad_v = torch.bmm(probs.transpose(1, 2), grad_out, out=work("grad_v", *v.shape))
    grad_scores = torch.bmm(grad_out, v.transpose(1, 2), out=work("grad_scores", *probs.shape))
    grad_scores.sub_(delta[..., None]).mul_(probs)
    if exact:
        grad_scores.masked_fill_(probs == 0, 0.0)
    # The scale of the scores goes onto q and k.
    grad_q = torch.baddbmm(q, grad_scores, k, beta=0.0, alpha=scale,
                           out=work("grad_q", *q.shape))
    grad_k = torch.baddbmm(k, grad_scores.transpose(1, 2), q, beta=0.0, alpha=scale,
                           out=work("grad_k", *k.shape))
    return grad_q, grad_k, grad_v, grad_scores


def probs_times_values(probs: Tensor, v: Tensor, out: Tensor, exact: bool) -> Tensor:
    """bmm(probs (T, R, K), v (T, K, D)) into out (T, R, D), where a key with zero
    probability contributes nothing even when its value is inf or NaN.

    exact=False: the plain product (v known finite). Otherwise non-finite values are left out
    of the product, and a row that gives one of them a probability comes out NaN.
    """
    if not exact:
        return torch.bmm(probs, v, out=out)
    finite_values = torch.isfinite(v)
    torch.bmm(probs, torch.where(finite_values, v, 0.0), out=out)
    bad_keys = (~finite_values).any(-1, keepdim=True).to(probs.dtype)  # (T, K, 1)
    hits = torch.bmm((probs > 0).to(probs.dtype), bad_keys)
    return out.masked_fill_(hits > 0, math.nan)


def finite(x: Tensor) -> bool:
    """Whether x holds only finite values, in one pass without a temporary: its sum is inf or
    NaN when it holds inf or NaN (an overflowing sum of finite values only costs the exact
    path)."""
    return math.isfinite(float(x.detach().sum()))


class Workspace:
    """Buffers reused from chunk to chunk: a fresh large allocation page-faults every time."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = self.like.new_empty(numel)
        return buffer[:numel].view(shape)


class _Plan:
    """Where each query block reads its keys, from a key-block table.

    Window: every row lists a run of consecutive blocks, so a query block reads a window of
    consecutive keys, a view of k and v. Gather: it reads the keys of its listed blocks.
    `widths[I]`: the keys query block I reads (0: none). A chunk of query blocks reads as
    many keys as its widest row (`_Keys`), so a causal chunk near the start stays narrow.
    """

    def __init__(self, key_blocks: Tensor, block: int, m: int) -> None:
        listed = key_blocks >= 0
        counts = listed.sum(1)
        self.first = torch.where(listed, key_blocks, key_blocks.amax() + 1).amin(1)
        self.last = key_blocks.amax(1)
        spans = torch.where(counts > 0, self.last - self.first + 1, 0)
        self.window = bool((spans == counts).all())
        self.block, self.m = block, m
        if not self.window:
            # List each row's blocks first (a stable sort keeps their order).
            order = torch.sort((~listed).to(torch.uint8), dim=1, stable=True).indices
            self.table = key_blocks.gather(1, order)
        self.widths = (counts * block).clamp(max=m).tolist()

    def chunk(self, c0: int, c1: int) -> _Keys:
        """The keys of query blocks [c0, c1)."""
        block, m = self.block, self.m
        width = max(self.widths[c0:c1])
        if self.window:
            first = self.first[c0:c1] * block
            starts = first.clamp(max=m - width).clamp_min(0)
            keys = starts[:, None] + torch.arange(width, device=starts.device)
            end = torch.clamp((self.last[c0:c1] + 1) * block, max=m)
            valid = (keys >= first[:, None]) & (keys < end[:, None])
            return _Keys(keys, valid, c0, starts.tolist())
        table = self.table[c0:c1, :-(-width // block)]
        keys = table[:, :, None] * block + torch.arange(block, device=table.device)
        valid = ((table[:, :, None] >= 0) & (keys < m)).flatten(1)
        return _Keys(torch.where(valid, keys.flatten(1), 0), valid, c0, None)


class _Keys:
    """The keys of a chunk of query blocks from c0: positions (nc, W), and whether each is
    listed (valid); `starts` (a window's first key per block) or None (gathered)."""

    def __init__(self, keys: Tensor, valid: Tensor, c0: int, starts: list[int] | None) -> None:
        self.keys, self.valid, self.c0, self.starts = keys, valid, c0, starts
        self.width = keys.shape[1]

    def read(self, x: Tensor, c: int, work: Workspace, name: str) -> Tensor:
        """The keys of query block c from x (BH, M, D): (BH, W, D), a view when a window."""
        if self.starts is not None:
            start = self.starts[c - self.c0]
            return x[:, start:start + self.width]
        out = work(name, x.shape[0], self.width, x.shape[2])
        return torch.index_select(x, 1, self.keys[c - self.c0], out=out)

    def add(self, target: Tensor, c: int, tiles: Tensor) -> None:
        """Add per-key gradients tiles (BH, W, D) of query block c into target (BH, M, D)."""
        if self.starts is not None:
            start = self.starts[c - self.c0]
            target[:, start:start + self.width].add_(tiles)
        else:  # unlisted slots point at key 0 with a zero gradient
            target.index_add_(1, self.keys[c - self.c0], tiles)


class _Problem:
    """Shapes, flattened views and the mask of one call; chunks of query blocks."""

    def __init__(self, q, k, v, key_blocks, allowed, block, key_padding_mask, key_bias):
        self.batch, self.hkv, self.groups, self.n, self.dim = q.shape
        self.m = k.shape[2]
        self.bh = self.batch * self.hkv
        self.block, self.allowed = block, allowed
        self.rows = self.groups * block
        self.q, self.k, self.v = q, k.reshape(self.bh, self.m, self.dim), v.reshape(
            self.bh, self.m, self.dim)
        self.n_blocks = key_blocks.shape[0]
        self.plan = _Plan(key_blocks, block, self.m)
        self.key_padding_mask, self.key_bias = key_padding_mask, key_bias

    def split(self):
        """(sub-problem, its rows of the flattened (B * Hkv) axis, its batch entries, its kv
        heads): the whole call, or, when one query block of every head holds more than
        CHUNK_ELEMENTS scores, runs of batch entries, or of the kv heads of one entry."""
        per_head = self.rows * max(1, *self.plan.widths)
        step = max(1, CHUNK_ELEMENTS // per_head)
        if step >= self.bh:
            yield self, slice(None), slice(None), slice(None)
            return
        if step >= self.hkv:
            runs = [(b0, min(b0 + step // self.hkv, self.batch), 0, self.hkv)
                    for b0 in range(0, self.batch, step // self.hkv)]
        else:
            runs = [(b, b + 1, h0, min(h0 + step, self.hkv))
                    for b in range(self.batch) for h0 in range(0, self.hkv, step)]
        for b0, b1, h0, h1 in runs:
            sub = copy.copy(self)
            sub.batch, sub.hkv = b1 - b0, h1 - h0
            sub.bh = sub.batch * sub.hkv
            batches, heads = slice(b0, b1), slice(h0, h1)
            rows = slice(b0 * self.hkv + h0, (b1 - 1) * self.hkv + h1)
            sub.q = self.q[batches, heads]
            sub.k, sub.v = self.k[rows], self.v[rows]
            if self.key_padding_mask is not None:
                sub.key_padding_mask = self.key_padding_mask[batches]
            if self.key_bias is not None:
                sub.key_bias = self.key_bias[batches]
            yield sub, rows, batches, heads

    def chunks(self, work: Workspace) -> list[tuple[int, int]]:
        """Runs [c0, c1) of query blocks whose scores, at their widest row, hold at most
        CHUNK_ELEMENTS values (one block at least); blocks without keys are skipped. The
        largest chunk's score buffer is reserved first, so it is never reallocated."""
        widths, per_key = self.plan.widths, self.bh * self.rows
        chunks, largest, c0 = [], 0, 0
        while c0 < self.n_blocks:
            if widths[c0] == 0:
                c0 += 1
                continue
            c1, width = c0 + 1, widths[c0]
            while (c1 < self.n_blocks
                   and max(width, widths[c1]) * per_key * (c1 - c0 + 1) <= CHUNK_ELEMENTS):
                width = max(width, widths[c1])
                c1 += 1
            chunks.append((c0, c1))
            largest = max(largest, width * per_key * (c1 - c0))
            c0 = c1
        work("scores", largest)
        return chunks

    def query_tile(self, x: Tensor, c: int, work: Workspace, name: str) -> Tensor:
        """Rows of query block c of x (B, Hkv, G, N, D): (BH, G * block, D), zero-padded."""
        r0 = c * self.block
        r1 = min(r0 + self.block, self.n)
        rows = x[:, :, :, r0:r1]
        if self.groups == 1 and r1 - r0 == self.block:
            return rows.reshape(self.bh, self.block, self.dim)
        tile = work(name, self.bh, self.groups, self.block, self.dim)
        tile[:, :, : r1 - r0].copy_(rows.reshape(self.bh, self.groups, r1 - r0, self.dim))
        tile[:, :, r1 - r0:].zero_()
        return tile.view(self.bh, self.rows, self.dim)

    def row_values(self, x: Tensor, c0: int, c1: int, fill: float) -> Tensor:
        """Per-row values x (BH, G, N) of query blocks [c0, c1): (nc, BH, G * block)."""
        r0, r1 = c0 * self.block, min(c1 * self.block, self.n)
        rows = x[:, :, r0:r1]
        missing = (c1 - c0) * self.block - (r1 - r0)
        if missing:
            rows = torch.nn.functional.pad(rows, (0, missing), value=fill)
        return rows.unflatten(2, (c1 - c0, self.block)).permute(2, 0, 1, 3).reshape(
            c1 - c0, self.bh, self.rows)

    def store_rows(self, target: Tensor, c: int, tile: Tensor) -> None:
        """Write tile (BH, G * block, D) into the rows of query block c of target (BH, G, N, D)."""
        r0 = c * self.block
        r1 = min(r0 + self.block, self.n)
        target[:, :, r0:r1].copy_(tile.view(self.bh, self.groups, self.block, -1)[:, :, :r1 - r0])

    def scores(self, work: Workspace, c0: int, c1: int, scale: float) -> tuple[Tensor, _Keys]:
        """Masked scores (nc, BH, G * block, W) of query blocks [c0, c1), disallowed = -inf,
        and the keys they read."""
        chunk = self.plan.chunk(c0, c1)
        nc, width = c1 - c0, chunk.width
        scores = work("scores", nc, self.bh, self.rows, width)
        for c in range(c0, c1):
            torch.baddbmm(scores[c - c0], self.query_tile(self.q, c, work, "q"),
                          chunk.read(self.k, c, work, "k").transpose(1, 2), beta=0.0,
                          alpha=scale, out=scores[c - c0])
        keys, valid = chunk.keys, chunk.valid
        safe = keys.clamp(0, self.m - 1)
        per_batch = scores.view(nc, self.batch, self.hkv * self.rows, width)
        if self.key_bias is not None:
            per_batch.add_(self.key_bias[:, safe].transpose(0, 1)[:, :, None])
        tiles = scores.view(nc, self.batch, self.hkv, self.groups, self.block, width)
        # The pattern runs on int64 positions, four times the bytes of a float32 score: a
        # few query blocks at a time keep its temporaries a fraction of the scores.
        step = max(1, CHUNK_ELEMENTS // 16 // (self.block * width))
        for p0 in range(c0, c1, step):
            p1 = min(p0 + step, c1)
            self._mask(tiles[p0 - c0:p1 - c0], keys[p0 - c0:p1 - c0], valid[p0 - c0:p1 - c0],
                       safe[p0 - c0:p1 - c0], p0, p1)
        return scores, chunk

    def _mask(self, tiles: Tensor, keys: Tensor, valid: Tensor, safe: Tensor, c0: int,
              c1: int) -> None:
        """Set the disallowed pairs of query blocks [c0, c1) in their score tiles
        (nc, B, Hkv, G, block, W) to -inf."""
        nc, width = c1 - c0, keys.shape[1]
        queries = torch.arange(c0 * self.block, c1 * self.block, device=keys.device)
        mask = self.allowed(queries.view(nc, self.block, 1), keys[:, None, :]) & valid[:, None]
        mask = mask[:, None]  # (nc, 1 or B, block, W)
        if self.key_padding_mask is not None:
            mask = mask & self.key_padding_mask[:, safe].transpose(0, 1)[:, :, None]
        masked_out = (~mask)[:, :, None, None]
        slot = self.block if width % self.block == 0 else width
        # Only key slots where some pair is masked need masking at all; reduce the
        # contiguous innermost axis first (a strided boolean reduction is slow).
        partial = masked_out.reshape(-1, width // slot, slot).any(2).any(0).tolist()
        for index, needed in enumerate(partial):
            if needed:
                part = slice(index * slot, (index + 1) * slot)
                tiles[..., part].masked_fill_(masked_out[..., part], float("-inf"))


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_blocks, allowed, block, scale, key_padding_mask, key_bias):
        problem = _Problem(q, k, v, key_blocks, allowed, block, key_padding_mask, key_bias)
        bh, groups, n, dim = problem.bh, problem.groups, problem.n, problem.dim
        out = q.new_zeros(bh, groups, n, dim)
        lse = q.new_full((bh, groups, n), float("-inf"))
        exact = not finite(v)  # one pass: the slow path only for inf/NaN
        work = Workspace(q)
        for sub, rows, _, _ in problem.split():
            sub_out, sub_lse = out[rows], lse[rows]
            for c0, c1 in sub.chunks(work):
                scores, chunk = sub.scores(work, c0, c1, scale)
                probs, tile_lse = softmax_tiles(scores)
                lse_rows = sub_lse[:, :, c0 * block:c1 * block]
                lse_rows.copy_(tile_lse.view(c1 - c0, sub.bh, groups, block).permute(1, 2, 0, 3)
                               .flatten(2)[:, :, :lse_rows.shape[2]])
                for c in range(c0, c1):
                    tile = work("out", sub.bh, sub.rows, dim)
                    probs_times_values(probs[c - c0], chunk.read(sub.v, c, work, "v"), tile,
                                       exact)
                    sub.store_rows(sub_out, c, tile)
        ctx.save_for_backward(q, k, v, key_blocks, key_padding_mask, key_bias, out, lse)
        ctx.allowed, ctx.block, ctx.scale = allowed, block, scale
        shape = q.shape
        return out.view(shape), lse.view(shape[:4])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_blocks, key_padding_mask, key_bias, out, lse = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        problem = _Problem(q, k, v, key_blocks, ctx.allowed, block, key_padding_mask, key_bias)
        bh, groups, n, dim = problem.bh, problem.groups, problem.n, problem.dim
        grad_q = torch.zeros_like(out)
        grad_k = torch.zeros(bh, problem.m, dim, dtype=k.dtype, device=k.device)
        grad_v = torch.zeros_like(grad_k)
        grad_bias = torch.zeros_like(key_bias) if ctx.needs_input_grad[8] else None
        grad_out = grad_out.reshape(bh, groups, n, dim)
        # d lse_i / d s_ij = p_ij, so the lse gradient shifts the softmax-backward term delta.
        delta = (grad_out * out).sum(-1) - grad_lse.reshape(bh, groups, n)
        # Keys outside the pattern may hold inf or NaN, and a row that attends to one has a
        # NaN delta: zero probabilities must carry neither.
        exact = not (finite(v) and finite(k) and finite(delta))
        grad_out5 = grad_out.view(q.shape)
        work = Workspace(q)
        for sub, rows, batches, heads in problem.split():
            # A bias gradient is summed over heads: runs of heads add into their entry's row.
            _backward_rows(sub, work, scale, exact, grad_out5[batches, heads], lse[rows],
                           delta[rows], grad_q[rows], grad_k[rows], grad_v[rows],
                           None if grad_bias is None else grad_bias[batches])
        return (grad_q.view(q.shape), grad_k.view(k.shape), grad_v.view(v.shape),
                None, None, None, None, None, grad_bias)


def _backward_rows(sub: _Problem, work: Workspace, scale: float, exact: bool, grad_out5: Tensor,
                   lse: Tensor, delta: Tensor, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor,
                   grad_bias: Tensor | None) -> None:
    """Accumulate the gradients of one sub-problem (see `_Problem.split`) into the slices."""
    for c0, c1 in sub.chunks(work):
        scores, chunk = sub.scores(work, c0, c1, scale)
        # A row scoring an inf key has NaN probabilities: none may reach a masked key.
        masked = scores == float("-inf") if exact else None
        probs = masked_softmax_(scores, sub.row_values(lse, c0, c1, float("-inf"))
                                == float("-inf"))
        if exact:
            probs.masked_fill_(masked, 0.0)
        deltas = sub.row_values(delta, c0, c1, 0.0)
        for c in range(c0, c1):
            grad_q_c, grad_k_c, grad_v_c, grad_scores = tile_gradients(
                work, probs[c - c0], sub.query_tile(grad_out5, c, work, "grad_out"),
                sub.query_tile(sub.q, c, work, "q"), chunk.read(sub.k, c, work, "k"),
                chunk.read(sub.v, c, work, "v"), deltas[c - c0], scale, exact)
            sub.store_rows(grad_q, c, grad_q_c)
            chunk.add(grad_k, c, grad_k_c)
            chunk.add(grad_v, c, grad_v_c)
            if grad_bias is not None:  # a bias reaches every query and head of its key
                per_key = grad_scores.view(sub.batch, -1, chunk.width).sum(1)
                grad_bias.index_add_(1, chunk.keys[c - c0].clamp(0, sub.m - 1), per_key)


# -- key-block tables -----------------------------------------------------------------------


def band_key_blocks(n: int, block: int, before: int, after: int, device=None) -> Tensor:
    """Key blocks `I - before ... I + after` of every query block `I` (-1 outside 0..nb-1).

    Returns (ceil(n / block), before + after + 1) long.
    """
    n_blocks = -(-n // block)
    rows = torch.arange(n_blocks, device=device)[:, None]
    blocks = rows + torch.arange(-before, after + 1, device=device)
    return torch.where((blocks >= 0) & (blocks < n_blocks), blocks, -1)


def span_key_blocks(first: Tensor, last: Tensor) -> Tensor:
    """Key blocks `first[I] ... last[I]` of every query block `I` (none when last < first).

    first, last: (n_query_blocks,) long, first >= 0. Returns (n_query_blocks, K) long, -1
    padded, K the longest span (at least 1).
    """
    width = max(1, int((last - first + 1).max()))
    blocks = first[:, None] + torch.arange(width, device=first.device)
    return torch.where(blocks <= last[:, None], blocks, -1)


def layout_key_blocks(layout: Tensor) -> Tensor:
    """The key-block table of a block layout.

    layout: (n_query_blocks, n_key_blocks) bool, True = the tile is visited. Returns
    (n_query_blocks, K) long: each row's visited key blocks in increasing order, -1 padded,
    K the most any row visits (at least 1).
    """
    counts = layout.sum(1)
    width = max(1, int(counts.max()))
    # A stable sort of "not visited" flags lists the visited blocks first, in order.
    order = torch.sort((~layout).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return torch.where(torch.arange(width, device=layout.device) < counts[:, None], order, -1)


def reach_key_blocks(pattern: Pattern, reach: Reach, n: int, m: int, block: int,
                     device: torch.device | str | None = None,
                     chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """The key-block table of `pattern` over n queries and m keys, looking only inside
    `reach`: (ceil(n / block), K) long, each query block's key blocks holding an allowed pair,
    increasing, -1 padded."""
    n_blocks = -(-n // block)
    rows = torch.arange(n, device=device)
    first, last = reach(rows)
    first, last = first.clamp_min(0), last.clamp_max(m - 1)
    none = last < first
    missing = n_blocks * block - n
    first = torch.nn.functional.pad(torch.where(none, m, first), (0, missing), value=m)
    last = torch.nn.functional.pad(torch.where(none, -1, last), (0, missing), value=-1)
    candidates = span_key_blocks(first.view(n_blocks, block).amin(1) // block,
                                 last.view(n_blocks, block).amax(1).div(block,
                                                                        rounding_mode="floor"))
    width = candidates.shape[1]
    visited = torch.zeros_like(candidates, dtype=torch.bool)
    step = max(1, chunk_elements // (block * width * block))
    offsets = torch.arange(block, device=device)
    for t0 in range(0, n_blocks, step):
        t1 = min(t0 + step, n_blocks)
        tiles = candidates[t0:t1]
        keys = (tiles[:, :, None] * block + offsets)[:, None]  # (t, 1, K, block)
        queries = torch.arange(t0 * block, t1 * block, device=device).view(-1, block, 1, 1)
        pairs = pattern(queries, keys) & (queries < n) & (keys < m) & (tiles[:, None, :, None]
                                                                        >= 0)
        visited[t0:t1] = pairs.any(3).any(1)
    order = layout_key_blocks(visited)
    return torch.where(order >= 0, candidates.gather(1, order.clamp_min(0)), -1)


_TABLES: OrderedDict[tuple, Tensor] = OrderedDict()


def part_key_blocks(part: Part, n: int, m: int, device: torch.device | str) -> Tensor:
    """The key-block table of a part over n queries and m keys (indices after folding)."""
    if part.blocks is not None:
        return layout_key_blocks(part.blocks.to(device))
    return reach_key_blocks(part.pattern, part.reach, n, m, part.block, device)


def cached_key_blocks(key: Hashable, part: Part, n: int, m: int,
                      device: torch.device | str) -> Tensor:
    """`part_key_blocks(part, n, m, device)`, built once per (key, n, m, tile, device).

    key: identifies the part, e.g. (variant name, its parameters, causal, part name); two
    parts given the same key must allow the same pairs.
    """
    full_key = (key, n, m, part.block, torch.device(device))
    table = _TABLES.get(full_key)
    if table is None:
        table = _TABLES[full_key] = part_key_blocks(part, n, m, device)
        while len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(full_key)
    return table


def part_attention(part: Part, q: Tensor, k: Tensor, v: Tensor,
                   key_padding_mask: Tensor | None, scale: float,
                   key: Hashable) -> tuple[Tensor, Tensor]:
    """(out, lse) of one part of an engine description (causality already intersected).

    q: (B, Hkv, G, N, D); k, v: (B, Hkv, M, D); key_padding_mask: (B, M) bool or None; key:
    identifies the part for the table cache (see `cached_key_blocks`). Shapes as
    `block_sparse_attention`'s.
    """
    bias = None
    if part.pool is not None:
        pooled: Pooled = part.pool.build(k, v, key_padding_mask)
        k, v, bias, key_padding_mask = pooled.k, pooled.v, pooled.bias, pooled.real
    n, fold = q.shape[3], part.fold
    if fold > 1:
        if key_padding_mask is None and n % fold:  # the folded tails are not keys
            key_padding_mask = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            key_padding_mask = fold_residues(key_padding_mask, fold, 1)
        q, k, v = fold_residues(q, fold, 3), fold_residues(k, fold, 2), fold_residues(v, fold, 2)
    table = cached_key_blocks(key, part, q.shape[3], k.shape[2], q.device)
    out, lse = block_sparse_attention(q, k, v, table, part.pattern, block=part.block,
                                      scale=scale, key_padding_mask=key_padding_mask,
                                      key_bias=bias)
    if fold > 1:
        return unfold_residues(out, fold, 3, n), unfold_residues(lse, fold, 3, n)
    return out, lse


def merge_partial_attentions(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax attention over the union of disjoint key sets, from per-set results.

    parts: [(out (..., N, D), lse (..., N))], each an attention over its own keys. Returns the
    merged (out, lse); rows that no part reaches stay out = 0, lse = -inf, with finite
    gradients (every part's out is 0 there, so a finite stand-in lse changes nothing).
    """
    lses = torch.stack([part_lse for _, part_lse in parts])
    reached = lses.amax(0) > float("-inf")
    lses = torch.where(reached, lses, 0.0)
    lse = torch.logsumexp(lses, dim=0)
    out = None
    for (part_out, _), part_lse in zip(parts, lses, strict=True):
        term = part_out * (part_lse - lse).exp()[..., None]
        out = term if out is None else out + term
    return out, torch.where(reached, lse, float("-inf"))


def fold_residues(x: Tensor, stride: int, dim: int) -> Tensor:
    """Regroup positions by their residue mod `stride` into the batch dimension.

    x: (B, ..., N, ...) with positions along `dim` (> 0) -> (B * stride, ..., ceil(N / stride),
    ...): row `b * stride + r` holds positions r, r + stride, r + 2 * stride, ... of row b,
    zero (False) past N. A dilated pattern then runs as an ordinary one per residue class
    (stride 1 costs nothing: the result is a view).
    """
    length = -(-x.shape[dim] // stride)
    missing = length * stride - x.shape[dim]
    if missing:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], missing, *x.shape[dim + 1:])], dim)
    return x.unflatten(dim, (length, stride)).movedim(dim + 1, 1).flatten(0, 1)


def unfold_residues(x: Tensor, stride: int, dim: int, n: int) -> Tensor:
    """Inverse of `fold_residues`: (B * stride, ..., L, ...) -> (B, ..., n, ...) along `dim`."""
    x = x.unflatten(0, (-1, stride)).movedim(1, dim + 1).flatten(dim, dim + 1)
    return x.narrow(dim, 0, n)