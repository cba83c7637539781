"""Context parallelism: one attention call over a sequence split across a process group.

    out = attn_zoo.context_parallel(attn, q, k, v, causal=True, group=group)

Every rank of `group` (default: the world) calls it with its contiguous shard of the sequence
(shards in rank order; lengths may differ) and gets its shard of the output: the same rows,
and through autograd the same gradients, as `attn` on the whole sequence. How the work and
the keys are split follows the variant's pattern, `attn.parallel`, one module here each:

* "gather" (`gather.py`): each rank gathers the keys its rows' pattern reaches, a halo for a
  band, the listed blocks and small global sets otherwise, and runs its rows;
* "ring" (`ring.py`): keys and values travel around the ranks, partial attentions merged by
  their log-sum-exp (`full`);
* "heads" (`heads.py`): an all-to-all over heads, each rank running the whole sequence for
  its share of the heads (content-based variants, whose keys may lie anywhere, and
  `sparse_strided`, whose strided keys span the sequence).

Each scheme module gives `attend(attn, q, k, v, causal, key_padding_mask, shards) -> out`
and `planned_traffic(attn, bounds, causal, shape) -> [Traffic per rank]`, the bytes its
collectives move (equal to what `count_traffic` records).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch.distributed as dist
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.parallel.comm import Shards, Transfer, count_traffic

__all__ = ["CallShape", "Shards", "Traffic", "Transfer", "context_parallel", "count_traffic",
           "planned_traffic", "traffic_totals"]


class CallShape(NamedTuple):
    """What a call's traffic depends on besides the pattern and the shards (`masked`: the
    call has a key_padding_mask)."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    masked: bool = False


class Traffic(NamedTuple):
    """Bytes one rank sends and receives in one call, forward and backward."""

    forward_sent: int
    forward_received: int
    backward_sent: int
    backward_received: int


def context_parallel(attn: Attention, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None,
                     group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's rows of `attn(q, k, v)` over the whole sequence, split across `group`.

    q: (B, Hq, n, D), k, v: (B, Hkv, n, D), key_padding_mask: (B, n) bool: this rank's shard
    of n positions (shards in rank order, n >= 1, may differ between ranks). Returns
    (B, Hq, n, D). A group of one rank is the plain call.
    """
    attn._check(q, k, v, causal, key_padding_mask)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"context parallel needs the keys of the queries' shard (n={q.shape[2]}),"
                         f" got key length {k.shape[2]}")
    if not dist.is_initialized():
        raise ValueError("context parallel needs torch.distributed initialized "
                         "(torch.distributed.init_process_group), got none")
    if dist.get_world_size(group) == 1:
        return attn(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    batch, q_heads, n, dim = q.shape
    shards = Shards.of(n, group, {"batch size": batch, "q heads": q_heads,
                                  "kv heads": k.shape[1], "head_dim": dim, "causal": causal,
                                  "key_padding_mask given": key_padding_mask is not None},
                       q.device)
    if attn.weight_names:
        attn.initialize(q_heads, k.shape[1], dim)
    return _scheme(attn).attend(attn, q, k, v, causal, key_padding_mask, shards)


def planned_traffic(attn: Attention, bounds: tuple[int, ...], causal: bool,
                    shape: CallShape, scheme: str | None = None) -> list[Traffic]:
    """The bytes each rank moves in a context-parallel call (forward and backward) over
    shards `bounds` (rank r holds bounds[r] .. bounds[r + 1] - 1), by the variant's scheme or
    the one named."""
    return _scheme(attn, scheme).planned_traffic(attn, bounds, causal, shape)


def traffic_totals(transfers: list[Transfer]) -> Traffic:
    """A rank's recorded transfers summed as `Traffic`."""
    forward = [t for t in transfers if not t.op.endswith(".backward")]
    backward = [t for t in transfers if t.op.endswith(".backward")]
    return Traffic(sum(t.sent_bytes for t in forward), sum(t.received_bytes for t in forward),
                   sum(t.sent_bytes for t in backward), sum(t.received_bytes for t in backward))


def _scheme(attn: Attention, name: str | None = None):
    return importlib.import_module(f"attn_zoo.parallel.{name or attn.parallel}")
