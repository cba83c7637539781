"""Block-sparse attention in plain torch, the reference engine behind the static patterns.

Queries are cut into blocks of `block` rows. Query block `I` visits the key blocks listed in
`key_blocks[I]` (-1 = nothing), and inside those tiles the pattern `allowed(i, j)` decides
exactly which (query, key) pairs count. Work runs over chunks of query blocks and the
backward pass recomputes the scores from `(q, k, v, out, lse)`, so memory is O(N * D) plus one
chunk of tiles: never N x N, never the whole (N x keys per query) score tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Pattern = Callable[[Tensor, Tensor], Tensor]
"""`allowed(i, j) -> bool tensor` on broadcastable integer position tensors."""

CHUNK_ELEMENTS = 1 << 21
"""Score elements per chunk of query blocks: bounds the working memory of one step."""


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


def _pad_keys(x: Tensor, block: int) -> Tensor:
    """(B, Hkv, M, D) -> contiguous (B, Hkv, ceil(M / block) * block, D), zero rows appended."""
    missing = -x.shape[2] % block
    return torch.nn.functional.pad(x, (0, 0, 0, missing)) if missing else x.contiguous()


def masked_softmax_(scores: Tensor, empty: Tensor) -> Tensor:
    """Row softmax of (T, R, Kb) scores in place; rows flagged `empty` (T, R) become 0.

    The fused softmax costs about a third of separate max, subtract, exp and sum passes.
    """
    probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    if empty.any():  # softmax of a row of -inf is NaN
        probs.masked_fill_(empty[..., None], 0.0)
    return probs


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


class _Chunk:
    """Query blocks `[c0, c1)` as tiles: T = B * Hkv * nc tiles of G * block query rows
    against the Kb = K * block keys of the blocks listed for them.

    k and v arrive padded to a whole number of blocks; `m` is the true key length.
    """

    def __init__(self, work, q, k, v, m, key_blocks, allowed, block, key_padding_mask,
                 key_bias, c0, c1):
        batch, hkv, groups, n, dim = q.shape
        self.work = work
        self.shape = (batch, hkv, c1 - c0, groups, block)
        self.rows = slice(c0 * block, c1 * block)
        table = key_blocks[c0:c1]
        # Tables list used blocks first: slots empty in every row of this chunk cost nothing.
        used = (table >= 0).any(0).nonzero()
        table = table[:, : int(used.max()) + 1 if used.numel() else 1]
        n_slots = table.shape[1]
        self.blocks = table.clamp_min(0).flatten()
        self.n_keys = n_slots * block
        keys = table[:, :, None] * block + torch.arange(block, device=q.device)
        valid = ((table[:, :, None] >= 0) & (keys < m)).flatten(1)
        keys = keys.flatten(1)  # (nc, Kb) absolute key positions
        queries = torch.arange(c0 * block, c1 * block, device=q.device).view(-1, block, 1)
        mask = (allowed(queries, keys[:, None, :]) & valid[:, None, :])[None]  # (1, nc, block, Kb)
        if key_padding_mask is not None:
            real = key_padding_mask.index_select(1, torch.where(valid, keys, 0).flatten())
            mask = mask & real.view(batch, c1 - c0, 1, self.n_keys)
        # Only key-block slots where some tile is partly masked need masking at all.
        masked_out = ~mask
        # Reduce the contiguous innermost axis first: a strided boolean reduction is slow.
        partial = masked_out.view(-1, n_slots, block).any(2).any(0).tolist()
        slot_masks = masked_out[:, None, :, None].unflatten(-1, (n_slots, block))
        # Each entry: (slot, mask) broadcasting over (B, Hkv, nc, G, block, block).
        self.masked_out = [(slot, slot_masks[..., slot, :]) for slot in range(n_slots)
                           if partial[slot]]
        self.k = self.gather(k, "k")
        self.v = self.gather(v, "v")
        # (B, 1, nc, 1, Kb): broadcasts over the (B, Hkv, nc, G * block, Kb) score tiles.
        self.bias = None if key_bias is None else key_bias.view(batch, -1, block).index_select(
            1, self.blocks).view(batch, 1, c1 - c0, 1, self.n_keys)

    def gather(self, x: Tensor, name: str) -> Tensor:
        """The listed key blocks of x (B, Hkv, M, D) -> (T, Kb, D)."""
        batch, hkv, m, dim = x.shape
        block = self.shape[4]
        tiles = self.work(name, batch * hkv, self.blocks.numel(), block, dim)
        # One dim-0 gather of whole blocks per (batch, head) beats one gather over dim 2.
        for source, target in zip(x.view(batch * hkv, m // block, block, dim), tiles, strict=True):
            torch.index_select(source, 0, self.blocks, out=target)
        return tiles.view(-1, self.n_keys, dim)

    def scatter_add(self, target: Tensor, tiles: Tensor) -> None:
        """Add per-tile key gradients (T, Kb, D) into `target` (B, Hkv, M, D)."""
        batch, hkv, m, dim = target.shape
        block = self.shape[4]
        targets = target.view(batch * hkv, m // block, block, dim)
        sources = tiles.view(batch * hkv, self.blocks.numel(), block, dim)
        for row, source in zip(targets, sources, strict=True):
            row.index_add_(0, self.blocks, source)

    def arrange(self, x: Tensor, name: str) -> Tensor:
        """This chunk's rows of x (B, Hkv, G, N, *E) -> (T, G * block, *E), zero-padded."""
        batch, hkv, nc, groups, block = self.shape
        x = x[:, :, :, self.rows]
        missing = nc * block - x.shape[3]
        if missing:
            x = torch.cat([x, x.new_zeros(*x.shape[:3], missing, *x.shape[4:])], dim=3)
        extra = x.shape[4:]
        tiles = self.work(name, batch, hkv, nc, groups, block, *extra)
        tiles.copy_(x.reshape(batch, hkv, groups, nc, block, *extra).transpose(2, 3))
        return tiles.view(batch * hkv * nc, groups * block, *extra)

    def restore(self, tiles: Tensor, target: Tensor) -> None:
        """Write tiles (T, G * block, *E) into this chunk's rows of target (B, Hkv, G, Npad, *E)."""
        batch, hkv, nc, groups, block = self.shape
        extra = tiles.shape[2:]
        rows = target[:, :, :, self.rows].view(batch, hkv, groups, nc, block, *extra)
        rows.copy_(tiles.view(batch, hkv, nc, groups, block, *extra).transpose(2, 3))

    def scores(self, scaled_q: Tensor) -> Tensor:
        """Masked scores (T, G * block, Kb) of the scaled query tiles; disallowed = -inf."""
        scores = torch.bmm(scaled_q, self.k.transpose(1, 2),
                           out=self.work("scores", *scaled_q.shape[:2], self.n_keys))
        if self.bias is not None:
            scores.view(*self.shape[:3], -1, self.n_keys).add_(self.bias)
        tiles = scores.view(*self.shape, -1, self.shape[4])
        for slot, masked_out in self.masked_out:
            tiles[..., slot, :].masked_fill_(masked_out, float("-inf"))
        return scores


def _chunks(q: Tensor, key_blocks: Tensor, block: int):
    batch, hkv, groups = q.shape[:3]
    per_block = batch * hkv * groups * block * max(1, key_blocks.shape[1] * block)
    step = max(1, CHUNK_ELEMENTS // per_block)
    for c0 in range(0, key_blocks.shape[0], step):
        yield c0, min(c0 + step, key_blocks.shape[0])


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_blocks, allowed, block, scale, key_padding_mask, key_bias):
        batch, hkv, groups, n, dim = q.shape
        m = k.shape[2]
        k, v = _pad_keys(k, block), _pad_keys(v, block)
        if key_bias is not None:
            key_bias = torch.nn.functional.pad(key_bias, (0, k.shape[2] - m)).contiguous()
        padded_n = key_blocks.shape[0] * block
        out = q.new_empty(batch, hkv, groups, padded_n, dim)
        lse = q.new_empty(batch, hkv, groups, padded_n)
        work = Workspace(q)
        for c0, c1 in _chunks(q, key_blocks, block):
            chunk = _Chunk(work, q, k, v, m, key_blocks, allowed, block, key_padding_mask,
                           key_bias, c0, c1)
            scores = chunk.scores(chunk.arrange(q, "q").mul_(scale))
            row_max = scores.amax(-1)
            empty = row_max == float("-inf")
            probs = masked_softmax_(scores, empty)
            # p_ij = exp(s_ij - lse_i), so the row's largest p gives its lse.
            tile_lse = (row_max - probs.amax(-1).log()).masked_fill_(empty, float("-inf"))
            chunk.restore(tile_lse, lse)
            chunk.restore(torch.bmm(probs, chunk.v, out=work("out", *probs.shape[:2], dim)), out)
        ctx.save_for_backward(q, k, v, key_blocks, key_padding_mask, key_bias, out, lse)
        ctx.m, ctx.allowed, ctx.block, ctx.scale = m, allowed, block, scale
        return out[:, :, :, :n], lse[:, :, :, :n]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_blocks, key_padding_mask, key_bias, out, lse = ctx.saved_tensors
        n, dim, block, scale = q.shape[3], q.shape[4], ctx.block, ctx.scale
        grad_q = torch.empty_like(out)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_bias = torch.zeros_like(key_bias) if ctx.needs_input_grad[8] else None
        # d lse_i / d s_ij = p_ij, so the lse gradient shifts the softmax-backward term delta.
        delta = (grad_out * out[:, :, :, :n]).sum(-1) - grad_lse
        work = Workspace(q)
        for c0, c1 in _chunks(q, key_blocks, block):
            chunk = _Chunk(work, q, k, v, ctx.m, key_blocks, ctx.allowed, block,
                           key_padding_mask, key_bias, c0, c1)
            scaled_q = chunk.arrange(q, "q").mul_(scale)
            scores = chunk.scores(scaled_q)
            probs = masked_softmax_(scores, chunk.arrange(lse, "lse") == float("-inf"))
            tile_grad_out = chunk.arrange(grad_out, "grad_out")
            key_tile = work("key_tile", probs.shape[0], chunk.n_keys, dim)
            chunk.scatter_add(grad_v, torch.bmm(probs.transpose(1, 2), tile_grad_out, out=key_tile))
            # grad_scores is d loss / d (scaled q . k): the scale goes onto the query side.
            grad_scores = torch.bmm(tile_grad_out, chunk.v.transpose(1, 2),
                                    out=work("grad_scores", *probs.shape))
            grad_scores.sub_(chunk.arrange(delta, "delta")[..., None]).mul_(probs)
            query_tile = work("query_tile", *scaled_q.shape)
            chunk.restore(torch.bmm(grad_scores, chunk.k, out=query_tile).mul_(scale), grad_q)
            chunk.scatter_add(grad_k, torch.bmm(grad_scores.transpose(1, 2), scaled_q,
                                                out=key_tile))
            if grad_bias is not None:  # a bias reaches every query and head of its key
                batch, hkv, nc = chunk.shape[:3]
                per_key = grad_scores.view(batch, hkv, nc, -1, chunk.n_keys).sum((1, 3))
                grad_bias.view(batch, -1, block).index_add_(
                    1, chunk.blocks, per_key.view(batch, -1, block))
        m = ctx.m
        return (grad_q[:, :, :, :n], grad_k[:, :, :m], grad_v[:, :, :m],
                None, None, None, None, None, None if grad_bias is None else grad_bias[:, :m])


def band_key_blocks(n: int, block: int, before: int, after: int, device=None) -> Tensor:
    """Key blocks `I - before ... I + after` of every query block `I` (-1 outside 0..nb-1).

    Returns (ceil(n / block), before + after + 1) long.
    """
    n_blocks = -(-n // block)
    rows = torch.arange(n_blocks, device=device)[:, None]
    blocks = rows + torch.arange(-before, after + 1, device=device)
    return torch.where((blocks >= 0) & (blocks < n_blocks), blocks, -1)


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


def tile_block(extent: int) -> int:
    """A block size near `extent` (a power of two in 16..64) for tiles spanning that many keys.

    Tiles close to the reach of a band or a span keep their masked share small; at least 16
    rows keep the matmuls efficient, at most 64 keep each tile's score matrix small.
    """
    return min(64, max(16, 1 << max(0, extent - 1).bit_length()))


def window_key_blocks(n: int, window: int, causal: bool, device=None) -> tuple[int, Tensor]:
    """Block size and key-block table covering `abs(i - j) <= window` (causal: 0 <= i - j <=
    window) among n positions: (block, (ceil(n / block), K) long, -1 padded)."""
    block = tile_block(window)
    reach = min(-(-window // block), -(-n // block) - 1)
    return block, band_key_blocks(n, block, reach, 0 if causal else reach, device)


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
