"""Context parallelism over heads (Ulysses): an all-to-all trades sequence shards for heads.

Rank t of P takes kv heads t * Hkv / P .. (t + 1) * Hkv / P - 1 and their query heads (a GQA
group stays whole). One exchange sends every other rank its heads of this rank's positions
of q, k and v (stacked); the key padding mask, small, is all-gathered. Each rank then runs
the variant itself on the whole sequence for its heads (`Attention.forward_on_heads`: the
per-head weights and buffers narrowed to them, the same random draws as the whole call), and
one exchange back returns every rank its positions of the output, all heads. Gradients go
back through the reverse exchanges. In training mode a buffer that holds one entry per head
(routing's centroids, moved by the call) is all-gathered afterwards, so every rank holds the
single-process buffer.

Needs Hq and Hkv divisible by P (a ValueError otherwise). Traffic of a rank holding n of the
N positions: it sends (P - 1) * n positions of q, k, v, (Hq + 2 * Hkv) / P heads of B * D
elements each, and receives N - n; the output goes the other way (sends N - n positions of
Hq / P heads, receives (P - 1) * n); the backward mirrors the forward. A key padding mask
adds its all-gather (forward): (P - 1) * n positions sent, N - n received, B bytes each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.parallel import CallShape, Traffic
from attn_zoo.parallel.comm import Shards, all_gather_rows, exchange


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, causal: bool,
           key_padding_mask: Tensor | None, shards: Shards) -> Tensor:
    """This rank's rows of `attn` over the whole sequence: q (B, Hq, n, D), k, v (B, Hkv, n, D),
    key_padding_mask (B, n) or None, this rank's shard of n positions. Returns
    (B, Hq, n, D)."""
    batch, q_heads, n, dim = q.shape
    kv_heads, world = k.shape[1], shards.world
    _check_heads(attn, q_heads, kv_heads, world)
    own_q, own_kv = q_heads // world, kv_heads // world
    # Rows (rank t, position i) hold rank t's heads of q, k, v at position i.
    rows = torch.cat([_rows_by_rank(x, world) for x in (q, k, v)], dim=2)
    to_rank = [torch.arange(t * n, (t + 1) * n, device=q.device) for t in range(world)]
    whole = exchange(rows, to_rank, shards.lengths, shards, dim=0)  # (N, B, heads, D)
    q_own, k_own, v_own = whole.permute(1, 2, 0, 3).split([own_q, own_kv, own_kv], dim=1)
    mask = (None if key_padding_mask is None
            else all_gather_rows(key_padding_mask, shards, 1, shards.lengths))
    out = attn.forward_on_heads(shards.rank * own_kv, kv_heads, q_own, k_own, v_own,
                                causal=causal, key_padding_mask=mask)  # (B, Hq / P, N, D)
    if attn.training and torch.is_grad_enabled():
        _gather_head_buffers(attn, shards, q_heads, kv_heads, dim)
    positions = [torch.arange(a, b, device=q.device)
                 for a, b in zip(shards.bounds, shards.bounds[1:], strict=False)]
    back = exchange(out.permute(2, 0, 1, 3), positions, [n] * world, shards, dim=0)
    # back: (P * n, B, Hq / P, D), rank t's heads first.
    return back.view(world, n, batch, own_q, dim).permute(2, 0, 3, 1, 4).reshape(
        batch, q_heads, n, dim)


def planned_traffic(attn: Attention, bounds: tuple[int, ...], causal: bool,
                    shape: CallShape) -> list[Traffic]:
    """Bytes each rank moves in a call, forward and backward: the mask's all-gather (B bytes
    per position, forward) when `shape.masked`; in training mode the head buffers'
    all-gather (forward) too. Independent of `causal`."""
    world = len(bounds) - 1
    _check_heads(attn, shape.q_heads, shape.kv_heads, world)
    own_q, own_kv = shape.q_heads // world, shape.kv_heads // world
    position_bytes = shape.batch * shape.head_dim * shape.itemsize
    inputs, outputs = position_bytes * (own_q + 2 * own_kv), position_bytes * own_q
    buffers = 0
    if attn.training:
        buffers = sum(_buffer_bytes(attn, name, buffer_shape) // world
                      for name, buffer_shape in attn.buffer_shapes(
                          shape.q_heads, shape.kv_heads, shape.head_dim).items())
    total = bounds[-1]
    plan = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        mine, others = (stop - start) * (world - 1), total - (stop - start)
        mask = shape.batch * shape.masked
        plan.append(Traffic(
            forward_sent=(inputs + mask) * mine + outputs * others + buffers * (world - 1),
            forward_received=(inputs + mask) * others + outputs * mine + buffers * (world - 1),
            backward_sent=inputs * others + outputs * mine,
            backward_received=inputs * mine + outputs * others))
    return plan


def _check_heads(attn: Attention, q_heads: int, kv_heads: int, world: int) -> None:
    if q_heads % world or kv_heads % world:
        raise ValueError(
            f"context parallel over heads (attention {attn.name!r}) needs q heads and kv heads "
            f"divisible by the world size, got q heads {q_heads}, kv heads {kv_heads} and "
            f"world size {world}")


def _rows_by_rank(x: Tensor, world: int) -> Tensor:
    """x (B, H, n, D) as rows (P * n, B, H / P, D): row t * n + i holds rank t's heads of
    position i."""
    batch, heads, n, dim = x.shape
    return x.view(batch, world, heads // world, n, dim).permute(1, 3, 0, 2, 4).reshape(
        world * n, batch, heads // world, dim)


def _buffer_bytes(attn: Attention, name: str, shape: tuple[int, ...]) -> int:
    """Bytes of the buffer `name` of `shape`; one not drawn yet comes in the default dtype."""
    buffer = getattr(attn, name)
    dtype = torch.get_default_dtype() if buffer is None else buffer.dtype
    return torch.Size(shape).numel() * dtype.itemsize


def _gather_head_buffers(attn: Attention, shards: Shards, q_heads: int, kv_heads: int,
                         dim: int) -> None:
    """Every rank's heads of each buffer of `head_axes` (`buffer_shapes`), which its call
    moved, into every rank's."""
    for name in attn.buffer_shapes(q_heads, kv_heads, dim):
        buffer = getattr(attn, name)
        own = (q_heads if attn.head_axes[name] == "q" else kv_heads) // shards.world
        with torch.no_grad():
            mine = buffer.narrow(0, shards.rank * own, own)
            buffer.copy_(all_gather_rows(mine, shards, 0, [own] * shards.world))
