"""`routing`: Routing Transformer attention (Roy et al., 2021), shared-QK with k-means routing.

Keys are the normalized queries `q̂ = q / ‖q‖` (the given `k` is ignored). Each query head
keeps `n_clusters` unit centroids μ; each centroid takes the `window` tokens of highest
`q̂·μ` (default `ceil(N / n_clusters)`), and the members of a cluster attend to each other
(themselves included; causal by position; padded keys never). A token's output is the mean of
its outputs over the clusters it belongs to, zero if none.

In training mode with gradients enabled, each forward then moves the centroids by one step of
spherical EMA k-means over the real tokens: a token belongs to its nearest centroid, and
`μ <- normalize(decay * μ + (1 - decay) * normalize(sum of its tokens' q̂))` for every centroid
that received a token. Evaluation (eval mode, or `torch.no_grad()`) never moves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor

from attn_zoo.attention import Attention, with_sink
from attn_zoo.cache import GrowingCache, attend_selected, recent_in_group, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.registry import register
from attn_zoo.shared_qk import gather_rows, kv_rows, masked_attention, tie_ignored_keys

MAX_CLUSTERS = 4096
"""Upper bound of `n_clusters`: each head keeps that many centroids and scores every token
against each (Routing Transformer uses about sqrt(N))."""


@dataclass
class RoutingParams(Params):
    n_clusters: int = at_most(8, MAX_CLUSTERS)
    window: int | None = None
    decay: float = 0.999

    def validate(self) -> None:
        require(self.n_clusters >= 1, "n_clusters", self.n_clusters, ">= 1")
        require(self.window is None or self.window >= 1, "window", self.window, ">= 1 or None")
        require(0 < self.decay < 1, "decay", self.decay, "in (0, 1)")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"n_clusters": 3, "window": 4}


@register("routing")
class RoutingAttention(Attention):
    """Attention inside k-means clusters of the normalized queries.

    Scores n_clusters * window ** 2 pairs per (batch, head): with the default window
    ceil(N / n_clusters) that is N ** 2 / n_clusters, quadratic in N at a fixed n_clusters
    (the default), linear at a fixed window. Memory holds n_clusters x window x window
    scores per head, never N x N. The centroids are a buffer of shape (heads, n_clusters,
    head_dim), drawn from the torch RNG on the first call (heads and head_dim are unknown
    before) and saved and loaded with `state_dict` like any buffer.
    """

    Params = RoutingParams
    backends = ("torch", "triton")
    content_based = True
    head_axes: ClassVar[dict[str, str]] = {"sink": "q", "centroids": "q"}
    centroids: Tensor | None

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.register_buffer("centroids", None)

    def clusters(self, q: Tensor) -> Tensor:
        """Member positions of every cluster for q (B, H, N, D): (B, H, n_clusters, window)
        long, increasing along the last axis; the ones the next forward with this q uses."""
        work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        keys = F.normalize(q.to(work).contiguous(), dim=-1)
        return self._members(self._affinity(keys))

    def _window(self, n: int) -> int:
        window = self.params.window or math.ceil(n / self.params.n_clusters)
        return min(window, n)

    def buffer_shapes(self, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"centroids": (q_heads, self.params.n_clusters, head_dim)}

    def initialize_heads(self, q_heads: int, kv_heads: int, head_dim: int,
                         device: torch.device) -> None:
        super().initialize_heads(q_heads, kv_heads, head_dim, device)
        if self.centroids is None:
            self._draw_centroids(self.buffer_shapes(q_heads, kv_heads, head_dim)["centroids"],
                                 device)

    def _draw_centroids(self, shape: tuple[int, ...], device: torch.device) -> None:
        """Unit centroids (heads, n_clusters, head_dim) from the torch RNG."""
        self.centroids = F.normalize(torch.randn(shape), dim=-1).to(device)

    def _affinity(self, keys: Tensor) -> Tensor:
        """q̂·μ of keys (B, H, N, D) with every centroid: (B, H, n_clusters, N), no gradient."""
        _, heads, _, dim = keys.shape
        shape = (heads, self.params.n_clusters, dim)
        if self.centroids is None:
            self._draw_centroids(shape, keys.device)
        if self.centroids.shape != shape:
            raise ValueError(f"routing centroids have shape (heads, n_clusters, head_dim) = "
                             f"{tuple(self.centroids.shape)}, got q with {heads} heads of "
                             f"dimension {dim}")
        with torch.no_grad():  # membership is discrete: no gradient reaches the centroids
            return einsum(keys, self.centroids.to(keys), "b h n d, h c d -> b h c n")

    def _members(self, affinity: Tensor) -> Tensor:
        window = self._window(affinity.shape[-1])
        return affinity.topk(window, dim=-1).indices.sort(dim=-1).values

    def _update_centroids(self, keys: Tensor, affinity: Tensor, real: Tensor | None) -> None:
        """One EMA k-means step from keys (B, H, N, D); real: (B, N) bool or None."""
        nearest = F.one_hot(affinity.argmax(2), self.params.n_clusters).to(keys)  # (B, H, N, C)
        if real is not None:  # padding holds no token to learn from
            nearest = nearest * real[:, None, :, None]
        sums = einsum(nearest, keys, "b h n c, b h n d -> h c d")
        reached = nearest.sum((0, 2)) > 0  # (H, C)
        decay = self.params.decay
        centroids = self.centroids.to(keys)
        moved = F.normalize(decay * centroids + (1 - decay) * F.normalize(sums, dim=-1), dim=-1)
        self.centroids.copy_(torch.where(reached[..., None], moved, centroids))

    def _route(self, queries: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Shared-QK keys of queries (B, H, N, D) and the members of every cluster: keys
        (B, H, N, D), normalized in float32 when the queries are half precision (so that both
        backends route alike), and members (B, H, n_clusters, window) long, increasing along
        the last axis. In training mode with gradients enabled, the centroids then take one
        EMA k-means step."""
        half = queries.dtype in (torch.bfloat16, torch.float16)
        keys = F.normalize(queries.to(torch.float32) if half else queries, dim=-1)
        affinity = self._affinity(keys)
        members = self._members(affinity)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self._update_centroids(keys, affinity, key_padding_mask)
        return keys, members

    @staticmethod
    def _cluster_mean(out: Tensor, members: Tensor, n: int) -> Tensor:
        """Mean over the clusters each token belongs to of out (B, H, C, W, D) at members
        (B, H, C, W): (B, H, N, D); tokens in no cluster stay zero."""
        batch, heads, dim = out.shape[0], out.shape[1], out.shape[-1]
        rows = (torch.arange(batch * heads, device=out.device).view(batch, heads, 1, 1) * n
                + members).flatten()
        total = out.new_zeros(batch * heads * n, dim).index_add(0, rows, out.reshape(-1, dim))
        count = out.new_zeros(batch * heads * n).index_add_(0, rows, out.new_ones(rows.shape))
        return (total / count.clamp_min(1)[:, None]).view(batch, heads, n, dim)

    def _with_sink(self, out: Tensor, lse: Tensor) -> Tensor:
        """Each cluster's attention out (B, H, C, W, D), lse (B, H, C, W) with the sink as a
        null key in its softmax (a token's output is a mean over its clusters' softmaxes)."""
        return out if self.sink is None else with_sink(out, lse, self.sink.view(-1, 1, 1))

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        from attn_zoo.kernels.bucket import routing_attention

        batch, kv_heads, groups, n, dim = q.shape
        queries = q.reshape(batch, kv_heads * groups, n, dim).contiguous()
        keys, members = self._route(queries, key_padding_mask)
        out, lse = routing_attention(queries, keys.to(q.dtype), v, members, causal=causal,
                                     scale=scale, key_padding_mask=key_padding_mask)
        out = self._cluster_mean(self._with_sink(out.float(), lse), members, n)
        return tie_ignored_keys(out.view(batch, kv_heads, groups, n, dim), k), None

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        batch, kv_heads, groups, n, dim = q.shape
        heads = kv_heads * groups
        queries = q.reshape(batch, heads, n, dim).contiguous()
        keys, members = self._route(queries, key_padding_mask)  # members: (B, H, C, W)

        # Row indices into the inputs flattened to (rows, D).
        rows = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n + members
        value_rows = kv_rows(batch, kv_heads, groups, n, q.device)[..., None, None] + members
        allowed = torch.ones_like(members, dtype=torch.bool)[..., None, :]
        if key_padding_mask is not None:
            batch_index = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
            allowed = key_padding_mask[batch_index, members][..., None, :]
        if causal:
            allowed = allowed & (members[..., None, :] <= members[..., :, None])
        out, lse = masked_attention(gather_rows(queries, rows), gather_rows(keys, rows),
                                    gather_rows(v, value_rows), allowed, scale)
        out = self._cluster_mean(self._with_sink(out, lse), members, n)
        return tie_ignored_keys(out.view(batch, kv_heads, groups, n, dim), k), None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A module not called yet has no centroids: take their shape from the checkpoint.
        saved = state_dict.get(prefix + "centroids")
        if self.centroids is None and saved is not None:
            self.centroids = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scored_pairs(self, n: int, causal: bool) -> int:
        """Pairs scored per (batch, head): window ** 2 per cluster; causal, window * (window +
        1) / 2 (the members are distinct positions, so this is exact)."""
        window = self._window(n)
        per_cluster = window * (window + 1) // 2 if causal else window * window
        return self.params.n_clusters * per_cluster


# -- decoding cache -------------------------------------------------------------------------


@register_cache("routing")
class RoutingCache(GrowingCache):
    """Every past normalized query (the shared-QK keys), value and nearest centroid; the decode
    rule:

    Position j belongs to one cluster, its nearest centroid (argmax q̂_j·μ, the centroids the
    module holds now; decoding never moves them). Query i attends to the `cap` most recent
    positions j <= i of its own cluster, itself included, with cap = `window`, or
    ceil((i + 1) / n_clusters) when `window` is None (the forward's default window for the
    prefix that ends at i). The forward instead lets each centroid take its top-`window`
    tokens of the whole sequence, which a causal decoder cannot know. Memory grows with the
    sequence.
    """

    exact = False

    def _clusters(self, keys: Tensor) -> Tensor:
        """Nearest centroid (B, H, T, 1) of normalized keys (B, H, T, D)."""
        if self.attention.centroids is None:  # drawn on the first call, as the forward does
            self.attention.clusters(keys[:, :, :1])
        affinity = einsum(keys, self.attention.centroids.to(keys), "b h n d, h c d -> b h n c")
        return affinity.argmax(-1, keepdim=True)

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys = F.normalize(q, dim=-1)
        self._append(k=keys, v=v, clusters=self._clusters(keys))
        end = self.seen + q.shape[2]
        rows = torch.arange(self.seen, end, device=q.device)
        n_clusters, window = self.attention.params.n_clusters, self.attention.params.window
        width = min(window or -(-end // n_clusters), end)  # no more keys exist
        index, valid = recent_in_group(self.held("clusters", end)[..., 0], rows, width,
                                       inclusive=True)
        if window is None:  # row i keeps its ceil((i + 1) / n_clusters) newest
            cap = (rows + n_clusters) // n_clusters
            valid &= torch.arange(width - 1, -1, -1, device=q.device) < cap[:, None]
        return attend_selected(q, self.held("k", end), self.held("v", end), index, valid,
                               self.scale(q.shape[3]))
