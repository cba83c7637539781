"""`lsh`: Reformer attention (Kitaev et al., 2020), shared-QK with angular LSH buckets.

Keys are the normalized queries `q / ‖q‖` (the given `k` is ignored). Each of `n_hashes`
rounds draws rotations `R_r` (D x n_buckets / 2) and hashes every key to
`argmax([x R_r, -x R_r])`; positions sorted by (bucket, position) are cut into chunks of
`bucket_size`, and a query attends to the keys of its own chunk and the previous one (chunk 0
looks back to the last; a single chunk has no look-back), causal by original position, its
own position only when no other key is allowed. The rounds combine by their log-sum-exps:
`o = sum_r softmax_r(lse_r) o_r`, with no de-duplication of keys seen in several rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import (
    CHUNK_ELEMENTS,
    Workspace,
    finite,
    masked_softmax_,
    merge_partial_attentions,
    probs_times_values,
    softmax_tiles,
    tile_gradients,
)
from attn_zoo.cache import (
    GrowingCache,
    attend_selected,
    merge_rounds,
    recent_in_group,
    register_cache,
)
from attn_zoo.params import Params, at_most, require
from attn_zoo.registry import register
from attn_zoo.shared_qk import kv_rows, tie_ignored_keys

MAX_HASHES = 64
"""Upper bound of `n_hashes`: every round is a full pass over the sequence (Reformer uses 1-8)."""


@dataclass
class LSHParams(Params):
    bucket_size: int = 64
    n_hashes: int = at_most(4, MAX_HASHES)
    seed: int | None = None

    def validate(self) -> None:
        require(self.bucket_size >= 1, "bucket_size", self.bucket_size, ">= 1")
        require(self.n_hashes >= 1, "n_hashes", self.n_hashes, ">= 1")
        require(self.seed is None or self.seed >= 0, "seed", self.seed, ">= 0 or None")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"bucket_size": 2, "n_hashes": 3, "seed": 5}


def n_buckets(n: int, bucket_size: int) -> int:
    """Buckets per round: an even number, about n / bucket_size, at least 2."""
    return max(2, 2 * math.ceil(n / (2 * bucket_size)))


class _Groups:
    """Index tables of the sorted chunks, flattened over (round, batch, head, chunk) groups.

    Each group is W = bucket_size query rows against its Wk keys (its own chunk's, in query
    order, then the previous chunk's). Rows index the flattened inputs: queries and keys
    (B * H * N, D), values (B * Hkv * N, D), and the output (R * B * H * (N + 1), D), whose row
    N of each head takes the sentinel queries that pad the last chunk.
    """

    def __init__(self, q_rows: Tensor, k_rows: Tensor, v_rows: Tensor, out_rows: Tensor,
                 query_pos: Tensor, key_after: Tensor, alone: Tensor, causal: bool,
                 n: int) -> None:
        self.q_rows, self.k_rows, self.v_rows, self.out_rows = q_rows, k_rows, v_rows, out_rows
        # query_pos (groups, W); key_after (groups, Wk): the key's position, or n + 1 for no
        # key (padding, sentinel), so that each mask is a single comparison.
        self.query_pos, self.key_after = query_pos, key_after
        self.alone, self.causal, self.n = alone, causal, n  # alone (groups, W) bool

    def chunks(self):
        """Group ranges [g0, g1) whose scores hold about CHUNK_ELEMENTS values."""
        groups, width = self.q_rows.shape
        step = max(1, CHUNK_ELEMENTS // (width * self.k_rows.shape[1]))
        for g0 in range(0, groups, step):
            yield g0, min(g0 + step, groups)

    @staticmethod
    def gather(work: Workspace, name: str, x: Tensor, rows: Tensor) -> Tensor:
        """Rows of x (rows, D) at `rows` (G, S) into a reused buffer: (G, S, D)."""
        tiles = work(name, rows.numel(), x.shape[1])
        return torch.index_select(x, 0, rows.flatten(), out=tiles).view(*rows.shape, -1)

    def scores(self, work: Workspace, queries: Tensor, keys: Tensor, scale: float,
               g0: int, g1: int) -> tuple[Tensor, Tensor, Tensor]:
        """Masked scores (G, W, Wk) of groups [g0, g1), disallowed = -inf, with the query
        tiles (G, W, D) and the key tiles (G, Wk, D) they came from."""
        q = self.gather(work, "q", queries, self.q_rows[g0:g1])
        k = self.gather(work, "k", keys, self.k_rows[g0:g1])
        scores = work("scores", g1 - g0, q.shape[1], k.shape[1])
        torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=scale, out=scores)
        key_after = self.key_after[g0:g1, None, :]
        # Non-keys, and causal: later keys; both keep a query's own key, decided just below.
        limit = self.query_pos[g0:g1, :, None] if self.causal else self.n
        scores.masked_fill_(key_after > limit, float("-inf"))
        # A real position appears once among a group's keys: its own key is the diagonal.
        own = scores[:, :, :q.shape[1]].diagonal(dim1=-2, dim2=-1)
        own.masked_fill_(~self.alone[g0:g1], float("-inf"))
        return scores, q, k


class _SortedChunkAttention(torch.autograd.Function):
    """Attention of every group's queries over its keys, chunk by chunk in reused buffers,
    through the block-sparse engine's tile steps (`softmax_tiles`, `probs_times_values`,
    `tile_gradients`); the backward pass recomputes the scores, so memory stays
    O(R * N * D) plus one chunk."""

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, groups: _Groups,
                scale: float, n_rows: int) -> tuple[Tensor, Tensor]:
        """queries, keys (B * H * N, D); values (B * Hkv * N, D). Returns out (n_rows, D)
        and lse (n_rows,) at the groups' output rows; a query with no allowed key has
        out 0 and lse -inf."""
        out = queries.new_zeros(n_rows, queries.shape[1])
        lse = queries.new_full((n_rows,), float("-inf"))
        work = Workspace(queries)
        exact = not finite(values)
        for g0, g1 in groups.chunks():
            scores, _, _ = groups.scores(work, queries, keys, scale, g0, g1)
            probs, tile_lse = softmax_tiles(scores)
            v = groups.gather(work, "v", values, groups.v_rows[g0:g1])
            tile_out = probs_times_values(probs, v, work("out", *probs.shape[:2], v.shape[2]),
                                          exact)
            rows = groups.out_rows[g0:g1].flatten()
            out.index_copy_(0, rows, tile_out.view(-1, v.shape[2]))
            lse.index_copy_(0, rows, tile_lse.flatten())
        ctx.save_for_backward(queries, keys, values, out, lse)
        ctx.groups, ctx.scale = groups, scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        queries, keys, values, out, lse = ctx.saved_tensors
        groups, scale = ctx.groups, ctx.scale
        grad_q, grad_k, grad_v = (torch.zeros_like(x) for x in (queries, keys, values))
        # d lse_i / d s_ij = p_ij, so the lse gradient shifts the softmax-backward term delta;
        # rows without keys have no probabilities, and a zero delta keeps them finite.
        delta = ((grad_out * out).sum(-1) - grad_lse).masked_fill_(lse == float("-inf"), 0.0)
        exact = not (finite(values) and finite(delta))
        work = Workspace(queries)
        for g0, g1 in groups.chunks():
            scores, q, k = groups.scores(work, queries, keys, scale, g0, g1)
            rows = groups.out_rows[g0:g1]
            # A head's sentinels share one output row, but they all sit in its last group and
            # see the same keys, so they are empty alike.
            probs = masked_softmax_(scores, lse[rows] == float("-inf"))
            v = groups.gather(work, "v", values, groups.v_rows[g0:g1])
            tile_grad_q, tile_grad_k, tile_grad_v, _ = tile_gradients(
                work, probs, groups.gather(work, "grad_out", grad_out, rows), q, k, v,
                delta[rows], scale, exact)
            dim = v.shape[2]
            grad_v.index_add_(0, groups.v_rows[g0:g1].flatten(), tile_grad_v.view(-1, dim))
            grad_q.index_add_(0, groups.q_rows[g0:g1].flatten(), tile_grad_q.view(-1, dim))
            grad_k.index_add_(0, groups.k_rows[g0:g1].flatten(), tile_grad_k.view(-1, dim))
        return grad_q, grad_k, grad_v, None, None, None



@register("lsh")
class LSHAttention(Attention):
    """Sorted-bucket chunks per hashing round, merged by log-sum-exp.

    Each query scores 2 * bucket_size keys per round: work and memory O(N * bucket_size *
    n_hashes). Hashing costs O(N * D * n_buckets) work, which dominates once N exceeds about
    4 * bucket_size ** 2, in steps that hold no more values than the scores. Attention runs
    over bounded chunks of groups, and its backward pass recomputes their scores.
    """

    Params = LSHParams
    backends = ("torch", "triton")
    content_based = True

    def buckets(self, q: Tensor) -> Tensor:
        """The buckets of q (B, H, N, D): (n_hashes, B, H, N) long.

        With `seed` set they are the ones the next forward with this q uses; without, the
        rotations come from the torch RNG, like a forward's.
        """
        work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        return self._hash(F.normalize(q.to(work).contiguous(), dim=-1))

    def _rotations(self, n: int, dim: int, like: Tensor) -> Tensor:
        """(n_hashes, D, n_buckets / 2), drawn on the CPU in float32 so that a seed gives the
        same buckets on every device and in every working dtype."""
        generator = None if self.params.seed is None else torch.Generator().manual_seed(
            self.params.seed)
        shape = (self.params.n_hashes, dim, n_buckets(n, self.params.bucket_size) // 2)
        return torch.randn(shape, generator=generator).to(like)

    def _hash(self, keys: Tensor) -> Tensor:
        """Bucket of each key (B, H, N, D) in each round: (n_hashes, B, H, N) long."""
        batch, heads, n, dim = keys.shape
        rotations = self._rotations(n, dim, keys)
        rounds, half = rotations.shape[0], rotations.shape[2]
        # Every round in one matmul: (D, R * n_buckets / 2) columns.
        rotations = rotations.transpose(0, 1).reshape(dim, rounds * half)
        rows = keys.detach().reshape(-1, dim)  # buckets are discrete: no gradient
        # Steps of about CHUNK_ELEMENTS rotated values stay in cache for the max and min passes,
        # and their reused buffer bounds the memory however n_buckets grows with N.
        step = max(1, CHUNK_ELEMENTS // (rounds * half))
        work = Workspace(keys)
        buckets = []
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step]
            rotated = torch.mm(part, rotations, out=work("rotated", part.shape[0], rounds * half))
            rotated = rotated.view(-1, rounds, half)
            # argmax([xR, -xR]) without the concatenation; a tie goes to xR, as in argmax.
            top, top_index = rotated.max(-1)
            bottom, bottom_index = rotated.min(-1)
            buckets.append(torch.where(top >= -bottom, top_index, bottom_index + half))
        return torch.cat(buckets).t().contiguous().view(rounds, batch, heads, n)

    def _sort(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """Shared-QK keys of queries (B, H, N, D) and every round's positions sorted by
        (bucket, position): keys (B, H, N, D), normalized in float32 when the queries are
        half precision (so that both backends hash alike), and order (R, B, H, N) long."""
        half = queries.dtype in (torch.bfloat16, torch.float16)
        keys = F.normalize(queries.to(torch.float32) if half else queries, dim=-1)
        n = queries.shape[2]
        positions = torch.arange(n, device=queries.device)
        return keys, (self._hash(keys) * n + positions).argsort(dim=-1)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        from attn_zoo.kernels.bucket import lsh_attention

        batch, kv_heads, groups, n, dim = q.shape
        queries = q.reshape(batch, kv_heads * groups, n, dim).contiguous()
        keys, order = self._sort(queries)
        out, lse = lsh_attention(queries, keys.to(q.dtype), v, order, self.params.bucket_size,
                                 causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        merged, merged_lse = merge_partial_attentions(list(zip(out.unbind(0), lse.unbind(0),
                                                               strict=True)))
        return (tie_ignored_keys(merged.view(batch, kv_heads, groups, n, dim), k),
                merged_lse.view(batch, kv_heads, groups, n))

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        batch, kv_heads, groups, n, dim = q.shape
        heads = kv_heads * groups
        queries = q.reshape(batch, heads, n, dim).contiguous()
        keys, order = self._sort(queries)  # order: (R, B, H, N)

        # Sorted order per round; the last chunk is padded with the sentinel position n.
        chunk = min(self.params.bucket_size, n)
        n_chunks = -(-n // chunk)
        sorted_pos = F.pad(order, (0, n_chunks * chunk - n), value=n)
        query_pos = sorted_pos.view(-1, chunk)  # (R * B * H * C, W)
        # Key slots of each chunk: its own (in query order, so slot i is query i's own key),
        # then the previous chunk's (chunk 0 looks back to the last); one gather, no copies.
        slots = torch.arange(n_chunks * chunk, device=q.device).view(n_chunks, chunk)
        if n_chunks > 1:
            slots = torch.cat([slots, slots.roll(1, dims=0)], dim=1)
        key_pos = sorted_pos[..., slots]  # (R, B, H, C, Wk) with Wk = 2 * chunk (or chunk)
        real = (torch.ones(batch, n, dtype=torch.bool, device=q.device)
                if key_padding_mask is None else key_padding_mask)
        real = F.pad(real, (0, 1), value=False)  # the sentinel is never a key
        key_ok = real[torch.arange(batch, device=q.device).view(1, batch, 1, 1, 1), key_pos]
        key_ok = key_ok.view(-1, key_ok.shape[-1])
        key_after = torch.where(key_ok, key_pos.view(key_ok.shape), n + 1)
        # Alone: no key other than its own is allowed, so its own is.
        if causal:
            alone = key_after.amin(-1, keepdim=True) >= query_pos
        else:
            alone = key_ok.sum(-1, keepdim=True) == key_ok[:, :chunk].long()

        # Row indices into the flattened inputs; sentinels read any row, masked.
        rounds = order.shape[0]
        head_rows = torch.arange(batch * heads, device=q.device).view(batch, heads, 1) * n
        value_rows = kv_rows(batch, kv_heads, groups, n, q.device)[..., None]
        out_rows = torch.arange(rounds * batch * heads, device=q.device).view(
            rounds, batch, heads, 1) * (n + 1)
        key_index = key_pos.clamp_max(n - 1).flatten(-2)  # (R, B, H, C * Wk)
        table = _Groups(
            q_rows=(head_rows + sorted_pos.clamp_max(n - 1)).view(query_pos.shape),
            k_rows=(head_rows + key_index).view(key_ok.shape),
            v_rows=(value_rows + key_index).view(key_ok.shape),
            out_rows=(out_rows + sorted_pos).view(query_pos.shape),
            query_pos=query_pos, key_after=key_after, alone=alone, causal=causal, n=n)
        out, lse = _SortedChunkAttention.apply(
            queries.view(-1, dim), keys.view(-1, dim), v.reshape(-1, dim), table, scale,
            out_rows.numel() * (n + 1))
        out = out.view(rounds, batch, heads, n + 1, dim)[:, :, :, :n]
        lse = lse.view(rounds, batch, heads, n + 1)[:, :, :, :n]
        merged, merged_lse = merge_partial_attentions(list(zip(out.unbind(0), lse.unbind(0),
                                                               strict=True)))
        return (tie_ignored_keys(merged.view(batch, kv_heads, groups, n, dim), k),
                merged_lse.view(batch, kv_heads, groups, n))

    def scored_pairs(self, n: int, causal: bool) -> int:
        """(query, key) pairs of real positions scored per (batch, head): each chunk against
        itself and the previous chunk, over n_hashes rounds (about N * 2 * bucket_size *
        n_hashes). Causal counts the pairs with j <= i: exact inside a chunk, half of the
        look-back pairs (which of them precede the query depends on the content)."""
        chunk = min(self.params.bucket_size, n)
        n_chunks = -(-n // chunk)
        sizes = [chunk] * (n_chunks - 1) + [n - (n_chunks - 1) * chunk]
        own = sum(s * (s + 1) // 2 if causal else s * s for s in sizes)
        back = 0 if n_chunks == 1 else sum(a * b for a, b in zip(sizes, sizes[-1:] + sizes[:-1],
                                                                 strict=True))
        return self.params.n_hashes * (own + (back // 2 if causal else back))


# -- decoding cache -------------------------------------------------------------------------

DECODE_BUCKETS_PER_CHUNK = 32
"""Decoding hashes into n_buckets(32 * bucket_size) buckets (32): see `LSHCache`."""


@register_cache("lsh")
class LSHCache(GrowingCache):
    """Every past normalized query (the shared-QK keys), value and bucket; the decode rule:

    Round r hashes a position once, when it arrives, with fixed rotations R_r
    (D x n_buckets / 2, drawn like the forward's: from `seed` when set, else from the torch RNG
    at the first call) into n_buckets = n_buckets(32 * bucket_size) = 32 buckets, bucket =
    argmax([x R_r, -x R_r]). The forward's bucket count follows the length N; a cache cannot
    re-hash its keys every time N grows, so decoding fixes it. Query i attends, in round r,
    to the 2 * bucket_size most recent keys j < i of its own bucket (the forward's own chunk
    plus the previous one), to its own key only when there is none; the rounds combine by
    their log-sum-exps as in the forward, `o = sum_r softmax_r(lse_r) o_r`. Memory grows with
    the sequence.
    """

    exact = False

    def __init__(self, attention: Attention) -> None:
        super().__init__(attention)
        self.rotations: Tensor | None = None  # (D, n_hashes * n_buckets / 2)

    def _buckets(self, keys: Tensor) -> Tensor:
        """Buckets (B, H, T, n_hashes) of normalized keys (B, H, T, D)."""
        p = self.attention.params
        dim = keys.shape[-1]
        if self.rotations is None:
            half = n_buckets(DECODE_BUCKETS_PER_CHUNK * p.bucket_size, p.bucket_size) // 2
            generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)
            rotations = torch.randn((p.n_hashes, dim, half), generator=generator)
            self.rotations = rotations.transpose(0, 1).reshape(dim, -1).to(keys)
        half = self.rotations.shape[1] // p.n_hashes
        rotated = (keys @ self.rotations.to(keys)).unflatten(-1, (p.n_hashes, half))
        return torch.cat([rotated, -rotated], dim=-1).argmax(-1)

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys = F.normalize(q, dim=-1)
        self._append(k=keys, v=v, buckets=self._buckets(keys))
        end = self.seen + q.shape[2]
        rows = torch.arange(self.seen, end, device=q.device)
        width = min(2 * self.attention.params.bucket_size, end)  # no more keys exist
        parts = []
        for buckets in self.held("buckets", end).unbind(-1):  # rounds: (B, H, M) each
            index, valid = recent_in_group(buckets, rows, width, inclusive=False)
            # A query with no earlier key in its bucket attends to its own.
            alone = ~valid.any(-1)
            index[..., -1] = torch.where(alone, rows, index[..., -1])
            valid[..., -1] |= alone
            parts.append(attend_selected(q, self.held("k", end), self.held("v", end), index,
                                         valid, self.scale(q.shape[3])))
        return merge_rounds(parts)
