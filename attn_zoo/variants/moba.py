"""`moba`: Mixture of Block Attention (Lu et al., Moonshot AI, 2025), parameter-free block
selection by gate scores against block means.

Keys are cut into blocks of `block` (the last may be shorter); block J's gate key is the mean
of its keys (of its real keys under key padding; a block with no real key never competes).
Query i attends, with one softmax, to the keys of `top_k` selected blocks: its own block
J_i = i // block is always selected and counts as one of the `top_k`; the other `top_k - 1`
are the competing blocks with the highest gate score `q_i · mean(k_J)` (the raw dot product,
unscaled: a positive factor does not change the order), ties to the lower block index; all of
them when fewer compete. A gate score that is not finite (a key holding inf or NaN) ranks
below every finite one. Causal: only blocks J < J_i compete (complete and entirely in the
past, so no future key reaches a row through a mean), and the own block is causal inside
(j <= i). Bidirectional: every other block competes, and the own block is fully visible.
GQA: each query head selects for itself (gates from its own q) and reads its kv head.

The selection is discrete: no gradient flows through the gate scores; q, k and v get the
gradients of the attention over the selected keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import CHUNK_ELEMENTS
from attn_zoo.cache import GrowingCache, register_cache
from attn_zoo.params import Params, require
from attn_zoo.registry import register
from attn_zoo.selection import selection_attention


@dataclass
class MobaParams(Params):
    block: int = 64
    top_k: int = 3

    def validate(self) -> None:
        require(self.block >= 1, "block", self.block, ">= 1")
        require(self.top_k >= 1, "top_k", self.top_k, ">= 1 (the own block counts as one)")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"block": 8, "top_k": 3}


def block_sums(x: Tensor, block: int) -> Tensor:
    """Sums of x (..., M, X) over blocks of `block` positions, the last maybe shorter:
    (..., ceil(M / block), X)."""
    complete = x.shape[-2] // block * block
    sums = x[..., :complete, :].unflatten(-2, (-1, block)).sum(-2)
    if complete == x.shape[-2]:
        return sums
    return torch.cat([sums, x[..., complete:, :].sum(-2, keepdim=True)], -2)


def block_means(k: Tensor, block: int,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gate keys of k (B, Hkv, M, D): the mean of each block's (real) keys, (B, Hkv, nb, D)
    with nb = ceil(M / block), and which blocks hold a real key, (B, nb) bool (None without
    key_padding_mask: every block does)."""
    m = k.shape[2]
    if key_padding_mask is None:
        starts = torch.arange(0, m, block, device=k.device)
        counts, competes = (m - starts).clamp(max=block)[:, None].to(k.dtype), None
    else:
        k = torch.where(key_padding_mask[:, None, :, None], k, 0.0)
        counts = block_sums(key_padding_mask[..., None].to(k.dtype), block)  # (B, nb, 1)
        competes = counts[..., 0] > 0
        counts = counts[:, None]
    return block_sums(k, block) / counts.clamp_min(1), competes


def select_blocks(q: Tensor, means: Tensor, competes: Tensor | None, n_blocks: int,
                  first_row: int, block: int, top_k: int, causal: bool) -> Tensor:
    """The blocks each query selects: its own and the `top_k - 1` competitors of highest gate
    score (ties to the lower index).

    q: (B, Hkv, G, T, D), the queries at positions first_row .. first_row + T - 1; means:
    (B, Hkv, P, D), the gate keys of blocks 0 .. P - 1 (P <= n_blocks, the blocks of the keys);
    competes: (B, P) bool or None (all compete). Returns (B, Hkv * G, T, S) long with
    S = min(top_k, n_blocks): the own block first, then the others by increasing index, -1
    in the slots left empty. Gate scores are computed one chunk of rows at a time, about
    `CHUNK_ELEMENTS` of them (at least one row of every head), never T x P at once.
    """
    batch, kv_heads, groups, rows, _ = q.shape
    blocks = means.shape[2]
    width = min(top_k, n_blocks)
    others = min(top_k - 1, blocks)  # competitors a row may take
    positions = torch.arange(first_row, first_row + rows, device=q.device)
    own = (positions // block)[None, None, :, None].expand(batch, kv_heads * groups, rows, 1)
    index = torch.full((batch, kv_heads * groups, rows, width), -1, dtype=torch.long,
                       device=q.device)
    index[..., :1] = own
    if others == 0:
        return index
    gate = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = means.to(gate)[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, D, P)
    ids = torch.arange(blocks, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * kv_heads * groups * blocks))
    with torch.no_grad():
        for t0 in range(0, rows, step):
            t1 = min(rows, t0 + step)
            mine = own[0, 0, t0:t1]  # (t, 1)
            competing = ids < mine if causal else ids != mine  # (t, P)
            if competes is not None:
                competing = competing & competes[:, None, None, :]
            scores = (q[:, :, :, t0:t1].to(gate) @ keys).flatten(1, 2)  # (B, Hq, t, P)
            # A non-finite gate score (a key holding inf or NaN) ranks below every finite
            # one, so such a key reaches no row that would not read it anyway.
            scores = scores.nan_to_num_(nan=float("-inf"), posinf=float("-inf"))
            scores = scores.masked_fill_(~competing, float("-inf"))
            # The `others`-th highest score; above it a block is in, at it the lowest
            # indices fill what is left (topk itself breaks ties in no stated order).
            kth = scores.topk(others, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            above = scores > kth
            tied = (scores == kth) & competing
            need = others - above.sum(-1, keepdim=True)
            chosen = above | (tied & (tied.cumsum(-1) <= need))
            # Chosen blocks to slots 1, 2, ... by increasing index; the rest to a spare slot.
            slot = torch.where(chosen, chosen.cumsum(-1), width)
            rows_index = index.new_full((*slot.shape[:-1], width + 1), -1)
            rows_index.scatter_(-1, slot, ids.expand_as(slot))
            index[:, :, t0:t1, 1:] = rows_index[..., 1:width]
    return index


@register("moba")
class MobaAttention(Attention):
    """Block-selected attention: each query reads its own block and the `top_k - 1` blocks
    whose mean key scores highest against it (see the module docstring for the exact rule).

    Scores at most top_k * block keys per query, O(N * top_k * block) per head; the selection
    scores each query against the N / block block means, one chunk of rows at a time.
    """

    Params = MobaParams
    backends = ("torch", "triton")
    content_based = True

    def selection(self, q: Tensor, k: Tensor, causal: bool = False,
                  key_padding_mask: Tensor | None = None) -> Tensor:
        """The blocks each query reads: q (B, Hq, N, D), k (B, Hkv, N, D) -> (B, Hq, N, S) long
        block indices, S = min(top_k, ceil(N / block)), the own block first, -1 = empty."""
        batch, q_heads, n, dim = q.shape
        grouped = q.reshape(batch, k.shape[1], q_heads // k.shape[1], n, dim)
        return self._index(grouped, k, causal, key_padding_mask)

    def _index(self, q: Tensor, k: Tensor, causal: bool,
               key_padding_mask: Tensor | None) -> Tensor:
        block, top_k = self.params.block, self.params.top_k
        with torch.no_grad():  # gates in float32 at least, so that every backend selects alike
            gate = torch.float64 if k.dtype == torch.float64 else torch.float32
            means, competes = block_means(k.to(gate), block, key_padding_mask)
            return select_blocks(q, means, competes, means.shape[2], 0, block, top_k, causal)

    def _attend_selected(self, op, q, k, v, causal, key_padding_mask, scale):
        batch, kv_heads, groups, n, dim = q.shape
        index = self._index(q, k, causal, key_padding_mask)
        # A block longer than the keys is one unit of them all (never a longer gather).
        out, lse = op(q.reshape(batch, kv_heads * groups, 1, n, dim), k, v, index,
                      unit=min(self.params.block, k.shape[2]), scale=scale, causal=causal,
                      key_padding_mask=key_padding_mask)
        return out.view(q.shape), lse.view(q.shape[:4])

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        return self._attend_selected(selection_attention, q, k, v, causal, key_padding_mask,
                                     scale)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        from attn_zoo.kernels.selection import selection_attention

        return self._attend_selected(selection_attention, q, k, v, causal, key_padding_mask,
                                     scale)

    def scored_pairs(self, n: int, causal: bool) -> int:
        """Pairs scored per (batch, head) with no key padded: each query's own block (causal:
        up to itself) and `min(top_k - 1, competitors)` more blocks of `block` keys. Exact when
        causal (every competitor is a complete block) or when block divides n; otherwise the
        shorter last block, when another block's query selects it, counts as `block` keys."""
        block, others = self.params.block, self.params.top_k - 1
        complete, rest = divmod(n, block)
        if causal:
            own = complete * block * (block + 1) // 2 + rest * (rest + 1) // 2
            # Query block J has min(others, J) competitors, all complete blocks.
            first = min(complete, others)  # blocks 0 .. first - 1 take every earlier one
            taken = first * (first - 1) // 2 + (complete - first) * others
            return own + block * (block * taken + rest * min(others, complete))
        blocks = complete + (rest > 0)
        return complete * block * block + rest * rest + n * min(others, blocks - 1) * block


# -- decoding cache -------------------------------------------------------------------------


@register_cache("moba")
class MobaCache(GrowingCache):
    """Every past key and value, and the mean key of every complete block, computed once when
    the block completes (buffer "means", (B, Hkv, complete blocks, D)). Row i selects among
    the complete blocks J < i // block and reads its own block up to itself: the causal rule,
    so decoding equals the teacher-forced forward. Memory grows with the sequence."""

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        block, top_k = self.attention.params.block, self.attention.params.top_k
        self._append(k=k, v=v)
        batch, kv_heads, rows, dim = k.shape
        end = self.seen + rows
        means = self.buffers.get("means", k.new_zeros(batch, kv_heads, 0, dim))
        done = means.shape[2]
        if end // block > done:  # blocks completed by these positions
            keys = self.held("k", end // block * block)[:, :, done * block:]
            new = block_sums(keys, block) / block
            self.buffers["means"] = means = torch.cat([means, new], 2)
        queries = q.unflatten(1, (kv_heads, -1))
        index = select_blocks(queries, means, None, -(-end // block), self.seen, block, top_k,
                              causal=True)
        out, lse = selection_attention(q[:, :, None], self.held("k", end), self.held("v", end),
                                       index, unit=min(block, end), scale=self.scale(dim),
                                       causal=True)
        return out[:, :, 0], lse[:, :, 0]
