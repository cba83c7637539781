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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import merge_partial_attentions
from attn_zoo.params import Params, require
from attn_zoo.registry import register


@dataclass
class LSHParams(Params):
    bucket_size: int = 64
    n_hashes: int = 4
    seed: int | None = None

    def validate(self) -> None:
        require(self.bucket_size >= 1, "bucket_size", self.bucket_size, ">= 1")
        require(self.n_hashes >= 1, "n_hashes", self.n_hashes, ">= 1")
        require(self.seed is None or self.seed >= 0, "seed", self.seed, ">= 0 or None")


def n_buckets(n: int, bucket_size: int) -> int:
    """Buckets per round: an even number, about n / bucket_size, at least 2."""
    return max(2, 2 * math.ceil(n / (2 * bucket_size)))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of small gathered groups.

    q: (..., R, D); k, v: (..., K, D); allowed: (..., R, K) bool. Returns out (..., R, D) and
    lse (..., R); a row with no allowed key has out = 0 and lse = -inf, with finite gradients.
    """
    scores = (q * scale) @ k.transpose(-1, -2)
    has_key = allowed.any(-1, keepdim=True)
    # Empty rows get finite stand-in scores: a softmax of -inf alone is NaN, forward and back.
    scores = torch.where(allowed, scores, torch.where(has_key, float("-inf"), 0.0))
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~has_key.squeeze(-1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).masked_fill(~has_key, 0.0), lse


class _ZeroGradient(torch.autograd.Function):
    """Identity on `out` that gives `ignored` a zero gradient rather than none."""

    @staticmethod
    def forward(ctx, out: Tensor, ignored: Tensor) -> Tensor:
        ctx.like = (ignored.shape, ignored.dtype, ignored.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        shape, dtype, device = ctx.like
        needed = ctx.needs_input_grad[1]
        return grad, torch.zeros(shape, dtype=dtype, device=device) if needed else None


def tie_ignored_keys(out: Tensor, k: Tensor) -> Tensor:
    """`out` unchanged, with a zero gradient for the keys a shared-QK variant ignores.

    Callers that train the key projection (and DDP without `find_unused_parameters`) expect a
    gradient for every input; zero is the true one, and unlike `out + 0 * k` it stays finite
    whatever k holds.
    """
    return _ZeroGradient.apply(out, k) if k.requires_grad else out


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows of x (..., D) flattened to (rows, D) at the indices `rows` (*S): (*S, D).

    `index_select`, whose backward adds whole rows, where advanced indexing's would expand
    the indices to one per element.
    """
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.flatten()).view(*rows.shape, -1)


def kv_rows(batch: int, kv_heads: int, groups: int, n: int, device) -> Tensor:
    """(B, H) row offsets into v flattened to (B * Hkv * N, D): query head h reads h // G."""
    heads = torch.arange(kv_heads * groups, device=device) // groups
    return (torch.arange(batch, device=device)[:, None] * kv_heads + heads) * n


@register("lsh")
class LSHAttention(Attention):
    """Sorted-bucket chunks per hashing round, merged by log-sum-exp.

    Each query scores 2 * bucket_size keys per round: work and memory O(N * bucket_size *
    n_hashes). Hashing costs O(N * D * n_buckets) work, which dominates once N exceeds about
    4 * bucket_size ** 2, in steps that hold no more values than the scores. Gradients flow
    through the gathers by autograd.
    """

    Params = LSHParams
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
        n, dim = keys.shape[2:]
        rotations = self._rotations(n, dim, keys)
        # n_buckets grows with N: rows in steps of 2 * bucket_size ** 2 hold about half as many
        # rotated values (step * n_buckets / 2) as there are scores (N * 2 * bucket_size).
        step = 2 * self.params.bucket_size ** 2
        half = rotations.shape[-1]
        buckets = []
        for start in range(0, n, step):
            rotated = torch.einsum("bhnd,rdk->rbhnk", keys[:, :, start:start + step], rotations)
            # argmax([xR, -xR]) without the concatenation; a tie goes to xR, as in argmax.
            top, top_index = rotated.max(-1)
            bottom, bottom_index = rotated.min(-1)
            buckets.append(torch.where(top >= -bottom, top_index, bottom_index + half))
        return torch.cat(buckets, dim=-1)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        batch, kv_heads, groups, n, dim = q.shape
        heads = kv_heads * groups
        queries = q.reshape(batch, heads, n, dim).contiguous()
        keys = F.normalize(queries, dim=-1)
        buckets = self._hash(keys)

        # Sorted order per round; the last chunk is padded with the sentinel position n.
        chunk = min(self.params.bucket_size, n)
        n_chunks = -(-n // chunk)
        positions = torch.arange(n, device=q.device)
        order = (buckets * n + positions).argsort(dim=-1)  # (R, B, H, N)
        sorted_pos = F.pad(order, (0, n_chunks * chunk - n), value=n)
        query_pos = rearrange(sorted_pos, "r b h (c w) -> r b h c w", w=chunk)
        # Key slots of each chunk: its own (in query order, so slot i is query i's own key),
        # then the previous chunk's (chunk 0 looks back to the last); one gather, no copies.
        slots = torch.arange(n_chunks * chunk, device=q.device).view(n_chunks, chunk)
        if n_chunks > 1:
            slots = torch.cat([slots, slots.roll(1, dims=0)], dim=1)
        key_pos = sorted_pos[..., slots]  # (R, B, H, C, W) with W = 2 * chunk (or chunk)
        real = (torch.ones(batch, n, dtype=torch.bool, device=q.device)
                if key_padding_mask is None else key_padding_mask)
        real = F.pad(real, (0, 1), value=False)  # the sentinel is never a key
        key_ok = real[torch.arange(batch, device=q.device).view(1, batch, 1, 1, 1), key_pos]

        # Row indices into the flattened (rows, D) inputs; sentinels read any row, masked.
        head_rows = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n
        value_rows = kv_rows(batch, kv_heads, groups, n, q.device)[..., None, None]
        key_index = key_pos.clamp_max(n - 1)
        q_sorted = gather_rows(queries, head_rows + query_pos.clamp_max(n - 1))
        k_sorted = gather_rows(keys, head_rows + key_index)
        v_sorted = gather_rows(v, value_rows + key_index)

        # Other keys by original position (causal: the earlier ones); a query's own key, the
        # diagonal of its chunk's own slots, only when it has no other.
        query_pos, key_pos = query_pos[..., None], key_pos[..., None, :]
        allowed = key_ok[..., None, :] & (key_pos < query_pos if causal else key_pos != query_pos)
        alone = ~allowed.any(-1) & key_ok[..., :chunk]
        allowed[..., :chunk].diagonal(dim1=-2, dim2=-1).copy_(alone)
        out, lse = masked_attention(q_sorted, k_sorted, v_sorted, allowed, scale)

        # Back to the original order: slot of position p in round r is inverse[r, b, h, p].
        inverse = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
        out = rearrange(out, "r b h c w d -> r b h (c w) d")
        out = out.gather(3, inverse[..., None].expand(*inverse.shape, dim))
        lse = rearrange(lse, "r b h c w -> r b h (c w)").gather(3, inverse)
        merged, _ = merge_partial_attentions(list(zip(out.unbind(0), lse.unbind(0),
                                                      strict=True)))
        return tie_ignored_keys(merged.view(batch, kv_heads, groups, n, dim), k)

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
