"""Ring attention: the "ring" scheme of `full`.

Each rank keeps its queries; the key/value shards (and their padding-mask shard, when the call
has one) travel around the ranks in P - 1 steps, rank r sending to r + 1 and receiving from
r - 1. At each step a rank attends its rows to the block it holds, with the engine that
returns the log-sum-exp, and merges the partial attention into its running result exactly by
log-sum-exp (in float32, float64 staying float64). Causal: blocks from earlier ranks are fully
visible, the rank's own block is causal, later ranks' blocks are passed on without compute.
The next step's transfer is posted before the current step's compute and waited for after, so
a rank holds two key/value blocks at a time: the current and the incoming.

The backward is the ring again: each step recomputes its partial from the saved queries, the
block held and the merged output and log-sum-exp, and the key/value gradients travel with
their blocks, in the accumulation dtype, each rank adding its rows' share, one more step
bringing each block's sum home to its owner. Every rank runs every transfer in both passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_zoo.attention import Attention, PatternAttention, with_sink, zero_padded
from attn_zoo.blocksparse import merge_partial_attentions
from attn_zoo.parallel import CallShape, Traffic
from attn_zoo.parallel.comm import Shards, record
from attn_zoo.variants.full import FullAttention

Engine = Callable[..., tuple[Tensor, Tensor]]


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, causal: bool,
           key_padding_mask: Tensor | None, shards: Shards) -> Tensor:
    """This rank's rows of full attention over the whole sequence, by a ring.

    q: (B, Hq, n, D), k, v: (B, Hkv, n, D), key_padding_mask: (B, n) bool or None, this rank's
    shard (positions shards.start .. shards.stop - 1). Returns (B, Hq, n, D) in q's dtype,
    the sink applied.
    """
    if not isinstance(attn, FullAttention):
        raise TypeError(f"the ring scheme computes full attention, got attention "
                        f"{attn.name!r} ({type(attn).__name__})")
    batch, q_heads, n, dim = q.shape
    kv_heads = k.shape[1]
    if batch == 0:  # every rank agrees on the batch size: nothing to send anywhere
        return attn(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    backend = attn.checked_backend(q.device, q.dtype, dim)
    if key_padding_mask is not None:  # before they travel, as the plain call does
        k, v = zero_padded(k, v, key_padding_mask)
    scale = attn.params.scale if attn.params.scale is not None else dim**-0.5
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads, n, dim)
    out, lse = _Ring.apply(grouped, k.contiguous(), v.contiguous(), key_padding_mask, causal,
                           scale, _engine(attn, backend), attn.working_dtype(backend, q.dtype),
                           shards)
    if attn.sink is not None:
        out = with_sink(out, lse, attn.sink.view(kv_heads, -1, 1))
    return out.reshape(batch, q_heads, n, dim).to(q.dtype)


def planned_traffic(attn: Attention, bounds: tuple[int, ...], causal: bool,
                    shape: CallShape) -> list[Traffic]:
    """The bytes each rank moves in a ring over shards `bounds`, for any variant (the ring
    sends the same whatever the pattern, causal or not); a key_padding_mask travels with its
    keys, B bytes per key position, forward and backward.

    Forward: P - 1 steps, rank r sending every block but that of r + 1 and receiving every
    block but its own (k and v, in the inputs' dtype). Backward: the same key/value steps, plus
    every block's key and value gradients once (in float32, float64 staying float64).
    """
    world = len(bounds) - 1
    if world == 1:
        return [Traffic(0, 0, 0, 0)]
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    position = 2 * shape.batch * shape.kv_heads * shape.head_dim
    kv = position * shape.itemsize + shape.batch * shape.masked
    grads = position * max(shape.itemsize, 4)
    total = bounds[-1]
    plan = []
    for rank in range(world):
        sent = kv * (total - lengths[(rank + 1) % world])
        received = kv * (total - lengths[rank])
        plan.append(Traffic(sent, received, sent + grads * total, received + grads * total))
    return plan


def _engine(attn: FullAttention, backend: str) -> Engine:
    """The backend's forward `(q, k, v, causal, key_padding_mask, scale) -> (out, lse)`."""
    if backend == "torch":
        # full's own torch path takes SDPA, which gives no log-sum-exp; the engine does.
        return lambda *args: PatternAttention._forward_torch(attn, *args)
    return getattr(attn, f"_forward_{backend}")


class _Step:
    """One step's transfers to rank + 1 and from rank - 1, posted at once, waited for later,
    entered in the ledger as `op`."""

    def __init__(self, outgoing: list[Tensor], incoming: list[Tensor], shards: Shards,
                 op: str) -> None:
        group, world, rank = shards.group or dist.group.WORLD, shards.world, shards.rank
        send_to = dist.get_global_rank(group, (rank + 1) % world)
        receive_from = dist.get_global_rank(group, (rank - 1) % world)
        ops = [dist.P2POp(dist.isend, x, send_to, shards.group) for x in outgoing]
        ops += [dist.P2POp(dist.irecv, x, receive_from, shards.group) for x in incoming]
        self.works = dist.batch_isend_irecv(ops)
        self.incoming = incoming
        record(op, sum(_nbytes(x) for x in outgoing), sum(_nbytes(x) for x in incoming))

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.incoming


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def _block(like: list[Tensor], length: int, dtype: torch.dtype | None = None) -> list[Tensor]:
    """Empty tensors shaped as `like` with `length` positions (dim 2 of k, v; 1 of a mask),
    in their dtype or `dtype`."""
    return [x.new_empty((*x.shape[:2], length, *x.shape[3:]) if x.dim() == 4
                        else (x.shape[0], length), dtype=dtype or x.dtype) for x in like]


def _keys(k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> list[Tensor]:
    """What travels: k, v and the mask as uint8 (gloo sends no bool)."""
    return [k, v] if key_padding_mask is None else [k, v, key_padding_mask.to(torch.uint8)]


def _mask(block: list[Tensor]) -> Tensor | None:
    return block[2].bool() if len(block) == 3 else None


def _accumulation(work: torch.dtype) -> torch.dtype:
    return torch.float64 if work == torch.float64 else torch.float32


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, engine, work, shards):
        world, rank = shards.world, shards.rank
        accumulate = _accumulation(work)
        queries, block, result = q.to(work), _keys(k, v, key_padding_mask), None
        for step in range(world):
            source = (rank - step) % world
            transfer = None
            if step < world - 1:
                transfer = _Step(block, _block(block, shards.lengths[(source - 1) % world]),
                                 shards, "ring")
            if not causal or source <= rank:
                out, lse = engine(queries, block[0].to(work), block[1].to(work),
                                  causal and source == rank, _mask(block), scale)
                partial = (out.to(accumulate), lse.to(accumulate))
                result = partial if result is None else merge_partial_attentions(
                    [result, partial])
            if transfer is not None:
                block = transfer.wait()
        out, lse = result
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.causal, ctx.scale, ctx.engine, ctx.work, ctx.shards = causal, scale, engine, \
            work, shards
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        shards, work, causal = ctx.shards, ctx.work, ctx.causal
        world, rank = shards.world, shards.rank
        accumulate = out.dtype
        # d loss / d lse_s of a step's partial is w_s (dO . o_s - dO . O + d lse), w_s its
        # weight exp(lse_s - lse) in the merged output; rows no key reaches have weight 0.
        shift = (grad_out * out).sum(-1) - grad_lse
        reached = torch.where(lse > float("-inf"), lse, 0.0)
        queries = q.detach().to(work).requires_grad_()
        grad_q = torch.zeros_like(out)
        block = _keys(k, v, key_padding_mask)
        travelling: list[Tensor] = []  # the key/value gradients of the block held last step
        for step in range(world):
            source = (rank - step) % world
            outgoing, incoming = [], []
            if step < world - 1:
                outgoing += block
                incoming += _block(block, shards.lengths[(source - 1) % world])
            if step > 0:
                outgoing += travelling
                incoming += _block([k, v], shards.lengths[source], accumulate)
            transfer = _Step(outgoing, incoming, shards, "ring.backward")
            mine = None
            if not causal or source <= rank:
                mine = _partial_gradients(ctx.engine, queries, block, causal and source == rank,
                                          ctx.scale, work, grad_out, shift, reached)
                grad_q += mine[0].to(accumulate)
            arrived = transfer.wait()
            if step < world - 1:
                block, arrived = arrived[:len(block)], arrived[len(block):]
            if mine is None:
                travelling = arrived
            elif step == 0:
                travelling = [g.to(accumulate) for g in mine[1:]]
            else:
                travelling = [a.add_(g) for a, g in zip(arrived, mine[1:], strict=True)]
        home = _Step(travelling, _block(travelling, shards.length), shards,
                     "ring.backward").wait()
        return (grad_q.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), None, None, None,
                None, None, None)


def _partial_gradients(engine: Engine, queries: Tensor, block: list[Tensor], causal: bool,
                       scale: float, work: torch.dtype, grad_out: Tensor, shift: Tensor,
                       reached: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v from one step: its partial recomputed and differentiated with the
    merged output's weights. queries: (B, Hkv, G, n, D) leaf in the working dtype; block: k, v
    (B, Hkv, m, D) (and mask); grad_out, shift, reached: the merged call's dO, dO . O - d lse
    and lse (finite stand-in where no key is reached)."""
    keys = block[0].detach().to(work).requires_grad_()
    values = block[1].detach().to(work).requires_grad_()
    with torch.enable_grad():
        out, lse = engine(queries, keys, values, causal, _mask(block), scale)
    weight = (lse.to(reached.dtype) - reached).exp()
    grad_lse = weight * ((grad_out * out.to(grad_out.dtype)).sum(-1) - shift)
    return torch.autograd.grad((out, lse), (queries, keys, values),
                               ((weight[..., None] * grad_out).to(out.dtype),
                                grad_lse.to(lse.dtype)))
