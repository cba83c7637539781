"""Selection attention in plain torch: every query attends, with one softmax, to the keys of its
own list of selected units (key blocks of MoBA and NSA, single keys of a top-k indexer).

    out, lse = selection_attention(q, k, v, index, unit=64, scale=scale, causal=True)

Two paths give the same results (up to rounding). The per-query path gathers every row's
selected keys, in chunks of rows that hold about `GATHER_ELEMENTS` gathered values. The tile
path takes TILE consecutive rows at a time: it gathers the union of their units once (listed in
the order the rows first select them), scores the tile's G * TILE rows against it in one
matmul and masks each row to its own units (a row scatters the rank of each of its units in
the union: O(TILE * S) work, no unit-by-unit comparison); chunks hold about `GATHER_ELEMENTS`
scores. It runs when keys and values are finite and the widest unions the shapes allow keep
its scores within FORWARD_RATIO (BACKWARD_RATIO for the backward pass) times the per-query
path's: block units (MoBA, NSA) at moderate lengths; a top-k indexer's single keys gather per
query in the forward pass. The backward pass recomputes the scores from `(q, k, v, out, lse)`:
memory is the output plus one chunk, never N x N and never the whole (N x selected keys) score
tensor. `attn_zoo.kernels.selection.selection_attention` is the Triton kernel with the same
signature.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_zoo.blocksparse import finite

GATHER_ELEMENTS = 1 << 22
"""Gathered key (or value) elements per chunk of query rows: bounds one step's memory."""

TILE = 32
"""Consecutive query rows that share one gather of their selected units on the tile path."""

FORWARD_RATIO = 4.0
"""The forward pass takes the tile path when its scores (TILE rows by the widest union their
tile can have, summed over the tiles) are at most this many times the per-query path's (every
row by its S selected units)."""

BACKWARD_RATIO = 12.0
"""The same for the backward pass, where the per-query path's scatter of every row's key and
value gradients costs more."""



def selection_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, unit: int,
                        scale: float, causal: bool,
                        key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the keys of its selected units.

    q: (B, H, G, N, D), H selection heads each shared by G query heads; k, v: (B, Hkv, M, D)
    with H % Hkv == 0 (selection head h reads kv head h // (H // Hkv)). index: (B, H, N, S)
    integer, the selected units of every query: unit u covers the key positions
    u * unit .. u * unit + unit - 1 that are < M; -1 is an empty slot; the units of one row
    are distinct. causal: key j is allowed only when j <= i + M - N. key_padding_mask: (B, M)
    bool, True = a real key. Returns out (B, H, G, N, D) in q's dtype and lse (B, H, G, N)
    (float32, float64 for float64 input); a row with no allowed key has out 0 and lse -inf.
    Differentiable in q, k and v (and through lse).
    """
    check_selection(q, k, v, index, unit, key_padding_mask)
    return _Selection.apply(q, k, v, index, unit, scale, causal, key_padding_mask)


def check_selection(q: Tensor, k: Tensor, v: Tensor, index: Tensor, unit: int,
                    key_padding_mask: Tensor | None) -> None:
    """The checks of a `selection_attention` call (this one and the Triton kernel's)."""
    if q.dim() != 5 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"selection_attention needs q (B, H, G, N, D) and k, v (B, Hkv, M, D), "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, _, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k must have shape (B, Hkv, M, D) = ({batch}, Hkv, M, {dim}) with "
                         f"{heads} % Hkv == 0, got {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device or index.device != q.device:
        raise ValueError(f"k, v and index must be on q's device {q.device}, got {k.device}, "
                         f"{v.device} and {index.device}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if index.dim() != 4 or index.shape[:3] != (batch, heads, n):
        raise ValueError(f"index must have shape (B, H, N, S) = ({batch}, {heads}, {n}, S), "
                         f"got {tuple(index.shape)}")
    if not isinstance(unit, int) or unit < 1:
        raise ValueError(f"unit must be an int >= 1, got {unit!r}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (batch, m)
                                         or key_padding_mask.device != q.device):
        raise ValueError(f"key_padding_mask must be a (B, M) = ({batch}, {m}) bool tensor on "
                         f"{q.device}, got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}")


class _Rows:
    """The selected keys of query rows t0 .. t1 - 1: their row numbers in k, v flattened to
    (B * Hkv * M, D) (B, H, t, W) and which of them are allowed (valid, same shape)."""

    def __init__(self, index: Tensor, t0: int, t1: int, unit: int, kv_heads: int, m: int,
                 n: int, causal: bool, key_padding_mask: Tensor | None) -> None:
        batch, heads = index.shape[:2]
        chosen = index[:, :, t0:t1].long()  # (B, H, t, S)
        offsets = torch.arange(unit, device=index.device)
        position = (chosen[..., None] * unit + offsets).flatten(-2)  # (B, H, t, S * unit)
        valid = (chosen >= 0).repeat_interleave(unit, dim=-1) & (position < m)
        if causal:
            last = torch.arange(t0, t1, device=index.device) + (m - n)
            valid &= position <= last[:, None]
        position = position.masked_fill(~valid, 0)
        if key_padding_mask is not None:
            valid &= key_padding_mask.gather(1, position.flatten(1)).view_as(position)
        kv_head = torch.arange(heads, device=index.device) // (heads // kv_heads)
        base = (torch.arange(batch, device=index.device)[:, None] * kv_heads + kv_head) * m
        self.rows = base[:, :, None, None] + position
        self.valid = valid

    def gather(self, x: Tensor, clean: bool) -> Tensor:
        """The selected rows of x (B * Hkv * M, D): (B, H, t, W, D); with `clean`, rows that
        are not allowed read as zeros (a non-finite value must not meet a zero probability)."""
        out = x.index_select(0, self.rows.flatten()).view(*self.rows.shape, x.shape[-1])
        return out.masked_fill(~self.valid[..., None], 0.0) if clean else out

    def scatter(self, target: Tensor, grad: Tensor) -> None:
        """Add per-selected-key gradients (B, H, t, W, D) into target (B * Hkv * M, D)."""
        target.index_add_(0, self.rows.flatten(), grad.reshape(-1, grad.shape[-1]))


def _chunk_rows(q: Tensor, width: int) -> int:
    batch, heads, groups, _, dim = q.shape
    return max(1, GATHER_ELEMENTS // max(1, batch * heads * width * max(dim, groups)))


def _probabilities(qc: Tensor, keys: Tensor, valid: Tensor, scale: float,
                   lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax of scale * qc (B, H, G, t, D) . keys (B, H, t, W, D) over the valid keys:
    probabilities (B, H, G, t, W) and lse (B, H, G, t) (given, in the backward)."""
    scores = torch.einsum("bhgtd,bhtwd->bhgtw", qc, keys).mul_(scale)
    scores = scores.masked_fill_(~valid[:, :, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]), lse


class _Tiles:
    """The union of the units that the TILE consecutive query rows of each tile selected
    (B, H, tiles, widest; -1 pads) and, for every slot of index, its unit's rank in its tile's
    union (B, H, tiles, TILE * S; -1 for an empty slot): one gather of the union serves the
    whole tile, and a row keeps only the keys of its own units."""

    def __init__(self, index: Tensor) -> None:
        batch, heads, n, slots = index.shape
        tiles = -(-n // TILE)
        chosen = torch.nn.functional.pad(index.long(), (0, 0, 0, tiles * TILE - n), value=-1)
        chosen = chosen.view(batch, heads, tiles, TILE * slots)
        empty = torch.iinfo(torch.int64).max  # sorts after every unit
        ordered, order = chosen.masked_fill(chosen < 0, empty).sort(stable=True, dim=-1)
        first = ordered != empty  # the first slot (lowest row) that lists each unit
        first[..., 1:] &= ordered[..., 1:] != ordered[..., :-1]
        # The union lists units in the order rows first select them: a row's own units never
        # move when a later row of its tile selects another.
        appearance = order.masked_fill(~first, empty).argsort(dim=-1, stable=True)
        place = torch.arange(first.shape[-1], device=index.device).expand_as(first)
        run_first = place.where(first, 0).cummax(-1).values
        rank = torch.empty_like(order).scatter_(-1, appearance, place).gather(-1, run_first)
        width = first.sum(-1)  # (B, H, tiles)
        self.widths = width.amax((0, 1)).tolist()
        self.total = int(width.sum())
        widest = max(self.widths)
        self.union = chosen.new_full((batch, heads, tiles, widest + 1), -1).scatter_(
            -1, rank.masked_fill(~first, widest), ordered.masked_fill(~first, -1))[..., :widest]
        self.rank = torch.empty_like(rank).scatter_(-1, order, rank).masked_fill_(chosen < 0, -1)
        self.slots = slots

    def width(self, a: int, b: int) -> int:
        return max(1, max(self.widths[a:b]))


class _TileRows:
    """The union keys of tiles a .. b - 1: their row numbers in k, v flattened to
    (B * Hkv * M, D) (B, H, c, W) and which query of each tile may read each of them
    (allowed, (B, H, c, TILE, W))."""

    def __init__(self, tiles: _Tiles, a: int, b: int, unit: int, kv_heads: int, m: int, n: int,
                 causal: bool, key_padding_mask: Tensor | None) -> None:
        batch, heads, count = tiles.union.shape[0], tiles.union.shape[1], b - a
        width = tiles.width(a, b)
        units = tiles.union[:, :, a:b, :width]
        device = units.device
        if units.shape[-1] < width:  # every slot of these tiles is empty
            units = torch.nn.functional.pad(units, (0, width - units.shape[-1]), value=-1)
        position = (units[..., None] * unit + torch.arange(unit, device=device)).flatten(-2)
        real = (units >= 0).repeat_interleave(unit, dim=-1) & (position < m)
        position = position.masked_fill(~real, 0)
        slot = tiles.rank[:, :, a:b].view(batch, heads, count, TILE, tiles.slots)
        member = torch.zeros(batch, heads, count, TILE, width + 1, dtype=torch.bool,
                             device=device)
        member.scatter_(-1, slot.masked_fill(slot < 0, width), True)
        allowed = member[..., :width].repeat_interleave(unit, dim=-1) & real[:, :, :, None]
        if causal:
            last = torch.arange(a * TILE, b * TILE, device=device).view(count, TILE, 1) + (m - n)
            allowed &= position[:, :, :, None] <= last
        if key_padding_mask is not None:
            pad = key_padding_mask.gather(1, position.flatten(1)).view_as(position)
            allowed &= pad[:, :, :, None]
        kv_head = torch.arange(heads, device=device) // (heads // kv_heads)
        base = (torch.arange(batch, device=device)[:, None] * kv_heads + kv_head) * m
        self.rows = base[:, :, None, None] + position
        self.allowed = allowed

    def gather(self, x: Tensor) -> Tensor:
        """The union rows of x (B * Hkv * M, D): (B, H, c, W, D)."""
        return x.index_select(0, self.rows.flatten()).view(*self.rows.shape, x.shape[-1])

    def scatter(self, target: Tensor, grad: Tensor) -> None:
        """Add per-union-key gradients (B, H, c, W, D) into target (B * Hkv * M, D)."""
        target.index_add_(0, self.rows.flatten(), grad.reshape(-1, grad.shape[-1]))


def _tile_chunks(tiles: _Tiles, q: Tensor, unit: int) -> list[tuple[int, int]]:
    """Runs of tiles whose (G * TILE, W) scores and (W, D) keys hold about GATHER_ELEMENTS
    elements together, W the run's widest union in keys."""
    batch, heads, groups, _, dim = q.shape
    per_key = batch * heads * max(dim, groups * TILE)
    chunks, a = [], 0
    for b in range(1, len(tiles.widths) + 1):
        if b - a > 1 and (b - a) * tiles.width(a, b) * unit * per_key > GATHER_ELEMENTS:
            chunks.append((a, b - 1))
            a = b - 1
    return chunks + [(a, len(tiles.widths))]


def _tile_view(x: Tensor, r0: int, r1: int, count: int) -> Tensor:
    """Rows r0 .. r1 - 1 of x (B, H, G, N, ...) as (B, H, count, G * TILE, ...), zero-padded."""
    x = x[:, :, :, r0:r1]
    pad = count * TILE - (r1 - r0)
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:3], pad, *x.shape[4:])], dim=3)
    x = x.view(*x.shape[:3], count, TILE, *x.shape[4:]).transpose(2, 3)
    return x.reshape(*x.shape[:3], -1, *x.shape[5:])


def _tile_rows(x: Tensor, groups: int, rows: int) -> Tensor:
    """(B, H, c, G * TILE, ...) back to (B, H, G, rows, ...), dropping the padding."""
    x = x.view(*x.shape[:3], groups, TILE, *x.shape[4:]).transpose(2, 3)
    return x.reshape(*x.shape[:2], groups, -1, *x.shape[5:])[:, :, :, :rows]


def _tile_probabilities(qc: Tensor, keys: Tensor, allowed: Tensor, scale: float,
                        lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax of scale * qc (B, H, c, G * TILE, D) . keys (B, H, c, W, D) over each row's
    allowed keys: probabilities (B, H, c, G * TILE, W) and lse (B, H, c, G * TILE)."""
    scores = torch.matmul(qc, keys.transpose(-1, -2)).mul_(scale)
    grouped = scores.view(*allowed.shape[:3], -1, *allowed.shape[3:])
    grouped.masked_fill_(~allowed[:, :, :, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    scores -= lse.masked_fill(lse == float("-inf"), 0.0)[..., None]
    return scores.exp_(), lse


def _tile_path(index: Tensor, unit: int, m: int, causal: bool, k: Tensor, v: Tensor,
               ratio: float) -> bool:
    """Whether the tile path runs: keys and values finite (a union key outside a row's own
    units meets that row with probability 0, and 0 * inf is NaN) and its scores at most `ratio`
    times the per-query path's even when every union is as wide as it can be: TILE * S units,
    or every unit the tile's last row may reach. From the shapes alone, so that a later row's
    selection never changes the arithmetic of an earlier row."""
    n, slots = index.shape[2], index.shape[3]
    if n * slots == 0 or not (finite(k) and finite(v)):
        return False
    units = -(-m // unit)
    if causal:
        last = torch.arange(TILE - 1, -(-n // TILE) * TILE, TILE).clamp(max=n - 1) + (m - n)
        reach = (last.div(unit, rounding_mode="floor") + 1).clamp(0, units)
    else:
        reach = torch.full((-(-n // TILE),), units)
    return TILE * int(reach.clamp(max=TILE * slots).sum()) <= ratio * n * slots


class _Selection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, unit, scale, causal, key_padding_mask):
        batch, heads, groups, n, dim = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        flat_k, flat_v = k.to(work).reshape(-1, dim), v.to(work).reshape(-1, dim)
        out = q.new_empty(q.shape)
        lse = torch.empty(batch, heads, groups, n, dtype=work, device=q.device)
        if _tile_path(index, unit, m, causal, k, v, FORWARD_RATIO):
            tiles = _Tiles(index)
            for a, b in _tile_chunks(tiles, q, unit):
                r0, r1 = a * TILE, min(n, b * TILE)
                rows = _TileRows(tiles, a, b, unit, kv_heads, m, n, causal, key_padding_mask)
                probs, lse_c = _tile_probabilities(_tile_view(q, r0, r1, b - a).to(work),
                                                   rows.gather(flat_k), rows.allowed, scale)
                lse[..., r0:r1] = _tile_rows(lse_c, groups, r1 - r0)
                out[..., r0:r1, :] = _tile_rows(torch.matmul(probs, rows.gather(flat_v)),
                                                groups, r1 - r0)
        else:
            clean = not finite(v)
            step = _chunk_rows(q, index.shape[-1] * unit)
            for t0 in range(0, n, step):
                t1 = min(n, t0 + step)
                rows = _Rows(index, t0, t1, unit, kv_heads, m, n, causal, key_padding_mask)
                probs, lse[..., t0:t1] = _probabilities(
                    q[..., t0:t1, :].to(work), rows.gather(flat_k, False), rows.valid, scale)
                out[..., t0:t1, :] = torch.einsum("bhgtw,bhtwd->bhgtd", probs,
                                                  rows.gather(flat_v, clean))
        ctx.save_for_backward(q, k, v, index, out, lse, key_padding_mask)
        ctx.settings = (unit, scale, causal)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, index, out, lse, key_padding_mask = ctx.saved_tensors
        unit, scale, causal = ctx.settings
        batch, heads, groups, n, dim = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        work = lse.dtype
        flat_k, flat_v = k.to(work).reshape(-1, dim), v.to(work).reshape(-1, dim)
        grad_out = torch.zeros_like(out, dtype=work) if grad_out is None else grad_out.to(work)
        # d lse / d score = probability: the lse gradient joins delta, row by row.
        delta = (grad_out * out.to(work)).sum(-1)
        if grad_lse is not None:
            delta = delta - torch.nan_to_num(grad_lse.to(work), posinf=0.0, neginf=0.0)
        grad_q = torch.zeros_like(q, dtype=work)
        grad_k, grad_v = torch.zeros_like(flat_k), torch.zeros_like(flat_v)
        if _tile_path(index, unit, m, causal, k, v, BACKWARD_RATIO):
            tiles = _Tiles(index)
            for a, b in _tile_chunks(tiles, q, unit):
                r0, r1, count = a * TILE, min(n, b * TILE), b - a
                rows = _TileRows(tiles, a, b, unit, kv_heads, m, n, causal, key_padding_mask)
                qc, keys, values = (_tile_view(q, r0, r1, count).to(work), rows.gather(flat_k),
                                    rows.gather(flat_v))
                probs, _ = _tile_probabilities(qc, keys, rows.allowed, scale,
                                               _tile_view(lse, r0, r1, count))
                go = _tile_view(grad_out, r0, r1, count)
                grad_scores = torch.matmul(go, values.transpose(-1, -2))
                grad_scores -= _tile_view(delta, r0, r1, count)[..., None]
                grad_scores *= probs
                grad_scores *= scale
                grad_q[..., r0:r1, :] = _tile_rows(torch.matmul(grad_scores, keys), groups,
                                                   r1 - r0)
                rows.scatter(grad_k, torch.matmul(grad_scores.transpose(-1, -2), qc))
                rows.scatter(grad_v, torch.matmul(probs.transpose(-1, -2), go))
        else:
            clean = not finite(v)
            step = _chunk_rows(q, index.shape[-1] * unit)
            for t0 in range(0, n, step):
                t1 = min(n, t0 + step)
                rows = _Rows(index, t0, t1, unit, kv_heads, m, n, causal, key_padding_mask)
                qc, keys, values = (q[..., t0:t1, :].to(work), rows.gather(flat_k, False),
                                    rows.gather(flat_v, clean))
                probs, _ = _probabilities(qc, keys, rows.valid, scale, lse[..., t0:t1])
                go = grad_out[..., t0:t1, :]
                grad_probs = torch.einsum("bhgtd,bhtwd->bhgtw", go, values)
                grad_scores = probs * (grad_probs - delta[..., t0:t1, None]) * scale
                grad_q[..., t0:t1, :] = torch.einsum("bhgtw,bhtwd->bhgtd", grad_scores, keys)
                rows.scatter(grad_k, torch.einsum("bhgtw,bhgtd->bhtwd", grad_scores, qc))
                rows.scatter(grad_v, torch.einsum("bhgtw,bhgtd->bhtwd", probs, go))
        return (grad_q.to(q.dtype), grad_k.view(k.shape).to(k.dtype),
                grad_v.view(v.shape).to(v.dtype), None, None, None, None, None)
