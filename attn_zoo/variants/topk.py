"""`topk`: DeepSeek-V3.2 DSA's lightning indexer with top-k token selection.

Parameters: `top_k` (256), `index_heads` (4), `index_dim` (32).

The lightning indexer runs per kv head g; its selection is shared by the G query heads of that
kv head (as DSA shares it across heads). The index input of query i is x_i, the concatenation
of the group's G query vectors q_i (G * D features); with learned weights per kv head
WQ (G * D -> index_heads * index_dim), Ww (G * D -> index_heads) and WK (D -> index_dim):

    qI_h(i) = WQ_h x_i,   w_h(i) = Ww_h x_i,   kI(j) = WK k_j (from the kv head's key)
    I(i, j) = sum_h w_h(i) * relu(qI_h(i) · kI(j))

The indexer reads its inputs detached (as DSA): it is trained only by its own loss; the main
attention's loss does not reach it, and the indexer loss does not reach q or k. Each query
attends, with one softmax, to its `top_k` keys of highest I(i, j) among the allowed keys
(causal: j <= i; bidirectional: every key, an extension of DSA's causal rule; real keys only
under padding), all allowed keys when there are fewer than `top_k`; ties go to the lower key
index. The selection is not differentiable. (Inputs outside the rule: an index score that is
not finite, from a non-finite key, ranks below every finite one.)

`indexer_loss()` is DSA's indexer loss over the selected set (its sparse training stage; the
dense warm-up's loss is the same with every key selected, top_k >= N): for each query i,
p_i = the main attention distribution over its selected keys (each query head's softmax over
them, without the sink), summed over the G query heads of the group and L1-normalised,
detached; the indexer distribution is the softmax over the same selected keys of I(i, j); the
loss is the mean over real queries (query positions whose key is real), kv heads and batch of
KL(p_i || indexer_i). A forward in training mode with gradients enabled stores it, a scalar
tensor whose graph reaches only the indexer weights; `indexer_loss()` returns the last one,
None before any such forward (`auxiliary_loss()` returns the same). The training app adds it
with a weight (`aux_loss_weight`). A call on some of the heads (`forward_on_heads`: context
parallelism over heads) stores their share, their KL terms over the whole call's count: the
shares of the ranks sum to the single-process loss, and so do their gradients.

Memory and compute: the indexer scores are computed in chunks of query rows holding about
`CHUNK_ELEMENTS` values (never N x N at once beyond one chunk), top-k per chunk; the indexer
itself is O(N^2 * index_heads * index_dim) compute by design (DSA says so: it is cheap per
pair, not sparse). The attention is O(N * top_k) through `attn_zoo.selection` (torch) or
`attn_zoo.kernels.selection` (triton), one selection head per kv head (unit = 1: the index
lists key positions). The indexer and its loss are computed in torch on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import einsum
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import CHUNK_ELEMENTS
from attn_zoo.cache import GrowingCache, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.registry import register
from attn_zoo.selection import selection_attention

MAX_TOP_K = 1 << 20
"""Upper bound of `top_k` (keys per query)."""
MAX_INDEX_HEADS = 64
"""Upper bound of `index_heads` (DSA uses 64)."""
MAX_INDEX_DIM = 1024
"""Upper bound of `index_dim` (DSA uses 128)."""


@dataclass
class TopkParams(Params):
    top_k: int = at_most(256, MAX_TOP_K)
    index_heads: int = at_most(4, MAX_INDEX_HEADS)
    index_dim: int = at_most(32, MAX_INDEX_DIM)

    def validate(self) -> None:
        require(self.top_k >= 1, "top_k", self.top_k, ">= 1")
        require(self.index_heads >= 1, "index_heads", self.index_heads, ">= 1")
        require(self.index_dim >= 1, "index_dim", self.index_dim, ">= 1")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"top_k": 8, "index_heads": 2, "index_dim": 8}


def _index_dtype(dtype: torch.dtype) -> torch.dtype:
    """The indexer computes in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_queries(x: Tensor, wq: Tensor, ww: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """qI (B, Hkv, T, heads, index_dim) and w (B, Hkv, T, heads) of index inputs x
    (B, Hkv, T, G * D), with wq (Hkv, G * D, heads * index_dim) and ww (Hkv, G * D, heads)."""
    qi = einsum(x, wq, "b g t f, g f e -> b g t e").unflatten(-1, (heads, -1))
    return qi, einsum(x, ww, "b g t f, g f h -> b g t h")


def index_inputs(q: Tensor) -> Tensor:
    """x (B, Hkv, T, G * D): each query's G head vectors side by side, detached, in the
    indexer's dtype; q: (B, Hkv, G, T, D)."""
    batch, kv_heads, groups, rows, dim = q.shape
    x = q.detach().to(_index_dtype(q.dtype)).permute(0, 1, 3, 2, 4)
    return x.reshape(batch, kv_heads, rows, groups * dim)


def index_keys(k: Tensor, wk: Tensor) -> Tensor:
    """kI (B, Hkv, M, index_dim) of keys k (B, Hkv, M, D), detached, with wk (Hkv, D, dim)."""
    keys = k.detach().to(_index_dtype(k.dtype))
    return einsum(keys, wk.to(keys.dtype), "b g m d, g d e -> b g m e")


def select_keys(qi: Tensor, w: Tensor, ki: Tensor, top_k: int, first_row: int, causal: bool,
                real: Tensor | None) -> Tensor:
    """The selected keys of every query: index (B, Hkv, T, S) long, S = min(top_k, M), the
    positions of the S allowed keys of highest I(i, j) (ties to the lower key index) in no
    particular order, -1 in the slots beyond a row's allowed keys.

    qi (B, Hkv, T, Hi, Di), w (B, Hkv, T, Hi): the index queries of rows first_row ..
    first_row + T - 1; ki (B, Hkv, M, Di): the index keys of positions 0 .. M - 1; causal:
    key j allowed only when j <= the row's position; real: (B, M) bool or None. Scores are
    computed in chunks of rows holding about `CHUNK_ELEMENTS` values (one row at least); a
    score that is not finite (from a non-finite key) ranks below every finite one.
    """
    batch, kv_heads, rows, heads, _ = qi.shape
    keys = ki.shape[2]
    width = min(top_k, keys)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * kv_heads * heads * keys))
    positions = torch.arange(keys, device=qi.device)
    chunks = []
    with torch.no_grad():
        for t0 in range(0, rows, step):
            t1 = min(rows, t0 + step)
            dots = einsum(qi[:, :, t0:t1], ki, "b g t h e, b g m e -> b g t h m").relu_()
            scores = einsum(w[:, :, t0:t1], dots, "b g t h, b g t h m -> b g t m")
            scores.masked_fill_(~scores.isfinite(), float("-inf"))
            allowed = torch.ones_like(scores, dtype=torch.bool)
            if causal:
                row = torch.arange(first_row + t0, first_row + t1, device=qi.device)
                allowed &= positions <= row[:, None]
            if real is not None:
                allowed &= real[:, None, None, :]
            scores.masked_fill_(~allowed, float("-inf"))
            chunks.append(_top_keys(scores, allowed, width, positions))
    return torch.cat(chunks, dim=2)


def _top_keys(scores: Tensor, allowed: Tensor, width: int, positions: Tensor) -> Tensor:
    """index (..., width) of the `width` allowed keys of highest score (ties to the lower
    index), -1 in the slots beyond a row's allowed keys; scores (..., M) are -inf where not
    allowed (..., M)."""
    top = scores.topk(width, dim=-1, sorted=False)
    last = top.values.amin(-1, keepdim=True)  # the S-th highest score
    tied = (scores == last) & allowed
    # A row whose S-th score is finite and whose keys of that score were all taken has no tie
    # to break: topk's keys are the rule's.
    settled = (last[..., 0] > float("-inf")) & (tied.sum(-1) == (top.values == last).sum(-1))
    index = top.indices
    if not bool(settled.all()):
        rest = ~settled
        index[rest] = _break_ties(scores[rest], tied[rest], last[rest], width, positions)
    return index


def _break_ties(scores: Tensor, tied: Tensor, last: Tensor, width: int,
                positions: Tensor) -> Tensor:
    """index (R, width) of rows scores (R, M) whose S-th highest score is last (R, 1), tied
    (R, M) marking the allowed keys of that score: every key above it, and as many tied keys
    as still fit, lowest indices first, in position order; -1 beyond a row's taken keys."""
    above = scores > last
    room = width - above.sum(-1, keepdim=True)
    take = above | (tied & (tied.cumsum(-1) <= room))
    # Taken keys into slots 0 .. taken - 1, the others into a spare slot `width`, dropped.
    slot = torch.where(take, take.cumsum(-1) - 1, width)
    index = scores.new_full((scores.shape[0], width + 1), -1, dtype=torch.long)
    index.scatter_(-1, slot, positions.expand_as(slot))
    return index[:, :width]


def _kl_rows(x: Tensor, wq: Tensor, ww: Tensor, ki: Tensor, index: Tensor, p: Tensor,
             heads: int) -> Tensor:
    """KL(p_i || softmax of I over the selected keys) of each row: (B, Hkv, T); rows without
    a selected key give 0. x (B, Hkv, T, G * D), ki (B, Hkv, M, Di), index and p
    (B, Hkv, T, S) (p detached, 0 on empty slots). The rows' scores against every key are
    computed (matrix products, as the selection does) and the selected ones read from them."""
    qi, w = index_queries(x, wq, ww, heads)
    valid = index >= 0
    dots = einsum(qi, ki, "b g t h e, b g m e -> b g t h m").relu()
    logits = einsum(w, dots, "b g t h, b g t h m -> b g t m").gather(-1, index.clamp_min(0))
    log_q = logits.masked_fill(~valid, float("-inf")).log_softmax(-1)
    terms = torch.xlogy(p, p) - p * log_q.masked_fill(~valid, 0.0)
    return terms.sum(-1)


@register("topk")
class TopkAttention(Attention):
    """DSA's top-k selection by a learned lightning indexer; see the module docstring.

    Scores min(top_k, allowed keys) pairs per query: O(N * top_k) attention, plus the
    indexer's O(N^2 * index_heads * index_dim) scoring, which `flops` does not count (it is
    not attention pairs). Weights, per kv head: index_q (Hkv, G * D, index_heads *
    index_dim), index_w (Hkv, G * D, index_heads), index_k (Hkv, D, index_dim).
    """

    Params = TopkParams
    backends = ("torch", "triton")
    content_based = True
    shared_selection = True
    weight_names = ("index_q", "index_w", "index_k")
    head_axes: ClassVar[dict[str, str]] = {"sink": "q", "index_q": "kv", "index_w": "kv",
                                           "index_k": "kv"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._loss: Tensor | None = None
        self._loss_terms: list[tuple[Tensor, int]] | None = None

    def weight_shapes(self, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, ...]]:
        features = q_heads // kv_heads * head_dim
        heads, dim = self.params.index_heads, self.params.index_dim
        return {"index_q": (kv_heads, features, heads * dim),
                "index_w": (kv_heads, features, heads),
                "index_k": (kv_heads, head_dim, dim)}

    def reset_weights(self) -> None:
        """Normal weights scaled so that qI, kI have unit-size entries for unit-size inputs and
        I(i, j) stays of order one: std features^-0.5 for index_q, (features * index_heads)^-0.5
        for index_w, (head_dim * index_dim)^-0.5 for index_k."""
        features, head_dim = self.index_q.shape[1], self.index_k.shape[1]
        torch.nn.init.normal_(self.index_q, std=features**-0.5)
        torch.nn.init.normal_(self.index_w, std=(features * self.params.index_heads)**-0.5)
        torch.nn.init.normal_(self.index_k, std=(head_dim * self.params.index_dim)**-0.5)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, document_ids: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """The contract's call; in training mode with gradients enabled it also stores the
        indexer loss of this call (over every document group the call runs)."""
        training = self.training and torch.is_grad_enabled()
        self._loss_terms = [] if training else None
        try:
            out = super().forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                  document_ids=document_ids, cu_seqlens=cu_seqlens)
            if training:
                # Zero times the weights: a loss with their graph even when no row is real.
                total = sum(weight.sum() * 0 for weight in self._weights())
                count = 0
                for kl, rows in self._loss_terms:
                    total, count = total + kl, count + rows
                self._loss = total / max(count, 1)
        finally:
            self._loss_terms = None
        return out

    def forward_on_heads(self, kv_start: int, all_kv_heads: int, q: Tensor, k: Tensor,
                         v: Tensor, *, causal: bool = False,
                         key_padding_mask: Tensor | None = None) -> Tensor:
        """The base class's call on some heads; the indexer loss it stores is these heads'
        share of the whole call's (their KL terms over the whole call's count of real rows
        times kv heads), so that the losses of calls covering every head once sum to the
        loss of the call on all of them."""
        out = super().forward_on_heads(kv_start, all_kv_heads, q, k, v, causal=causal,
                                       key_padding_mask=key_padding_mask)
        if self.training and torch.is_grad_enabled():
            self._loss = self._loss * (k.shape[1] / all_kv_heads)
        return out

    def indexer_loss(self) -> Tensor | None:
        """The indexer loss (a scalar) of the last forward in training mode with gradients
        enabled, None before any; its graph reaches only the indexer weights."""
        return self._loss

    def auxiliary_loss(self) -> Tensor | None:
        return self.indexer_loss()

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.index_q, self.index_w, self.index_k

    def _select(self, q: Tensor, k: Tensor, causal: bool,
                key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """index (B, Hkv, N, S) of the selected keys and the index inputs x (B, Hkv, N, G * D)
        of q (B, Hkv, G, N, D)."""
        x = index_inputs(q)
        wq, ww, wk = (weight.detach().to(x.dtype) for weight in self._weights())
        qi, w = index_queries(x, wq, ww, self.params.index_heads)
        index = select_keys(qi, w, index_keys(k, wk), self.params.top_k, 0, causal,
                            key_padding_mask)
        return index, x

    def _store_loss(self, q: Tensor, k: Tensor, x: Tensor, index: Tensor,
                    key_padding_mask: Tensor | None, scale: float) -> None:
        """Appends (sum of KL over real query rows and kv heads, their number) to this call's
        loss terms. Chunks of rows hold about `CHUNK_ELEMENTS` scores and are recomputed in
        the backward (checkpointed), so the graph holds O(N * S) values."""
        batch, kv_heads, groups, rows, dim = q.shape
        keys = k.shape[2]
        wq, ww, wk = (weight.to(x.dtype) for weight in self._weights())
        ki = index_keys(k, wk)
        real = (torch.ones(batch, rows, dtype=torch.bool, device=q.device)
                if key_padding_mask is None else key_padding_mask)
        per_row = batch * kv_heads * keys * max(groups, self.params.index_heads)
        step = max(1, CHUNK_ELEMENTS // per_row)
        total = x.new_zeros(())
        for t0 in range(0, rows, step):
            t1 = min(rows, t0 + step)
            part = index[:, :, t0:t1]
            p = self._main_distribution(q[:, :, :, t0:t1], k, part, scale)
            kl = checkpoint(_kl_rows, x[:, :, t0:t1], wq, ww, ki, part, p,
                            self.params.index_heads, use_reentrant=False)
            total = total + (kl * real[:, None, t0:t1]).sum()
        self._loss_terms.append((total, int(real.sum()) * kv_heads))

    @staticmethod
    def _main_distribution(q: Tensor, k: Tensor, index: Tensor, scale: float) -> Tensor:
        """p (B, Hkv, T, S): each query head's softmax of scale * q·k over the selected keys,
        summed over the G heads and L1-normalised, detached; 0 on empty slots. The rows'
        scores against every key are computed and the selected ones read from them."""
        groups = q.shape[2]
        with torch.no_grad():
            work = _index_dtype(q.dtype)
            valid = index >= 0
            scores = einsum(q.to(work) * scale, k.to(work), "b g h t d, b g m d -> b g h t m")
            chosen = index.clamp_min(0)[:, :, None].expand(-1, -1, groups, -1, -1)
            scores = scores.gather(-1, chosen)
            probs = scores.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1)
            p = probs.nan_to_num(0.0).sum(2)  # a row without keys: all -inf, NaN -> 0
            return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(work).tiny)

    def _run(self, attend, q, k, v, causal, key_padding_mask, scale):
        index, x = self._select(q, k, causal, key_padding_mask)
        if self._loss_terms is not None:
            self._store_loss(q, k, x, index, key_padding_mask, scale)
        return attend(q, k, v, index, unit=1, scale=scale, causal=causal,
                      key_padding_mask=key_padding_mask)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        return self._run(selection_attention, q, k, v, causal, key_padding_mask, scale)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        from attn_zoo.kernels.selection import selection_attention as kernel

        return self._run(kernel, q, k, v, causal, key_padding_mask, scale)

    def scored_pairs(self, n: int, causal: bool) -> int:
        """Selected keys per query summed over the queries (no padding): min(top_k, N) each
        bidirectional, min(top_k, i + 1) causal. The indexer's own scoring of every allowed
        pair is not attention pairs and is not counted."""
        width = min(self.params.top_k, n)
        if not causal:
            return n * width
        return width * (width + 1) // 2 + (n - width) * width


# -- decoding cache -------------------------------------------------------------------------


@register_cache("topk")
class TopkCache(GrowingCache):
    """Every past key, value and index key kI; the decode rule is the forward's causal rule
    (exact): each new query scores every cached index key j <= its position with the lightning
    indexer and attends to its top_k (ties to the lower index). Memory grows with the sequence.
    """

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        attention = self.attention
        batch, q_heads, rows, dim = q.shape
        grouped = q.view(batch, k.shape[1], -1, rows, dim)
        x = index_inputs(grouped)
        wq, ww, wk = (weight.detach().to(x.dtype) for weight in attention._weights())
        self._append(k=k, v=v, index_k=index_keys(k, wk))
        end = self.seen + rows
        qi, w = index_queries(x, wq, ww, attention.params.index_heads)
        index = select_keys(qi, w, self.held("index_k", end), attention.params.top_k, self.seen,
                            True, None)
        out, lse = selection_attention(grouped, self.held("k", end), self.held("v", end), index,
                                       unit=1, scale=self.scale(dim), causal=True)
        return out.view(batch, q_heads, rows, dim), lse.view(batch, q_heads, rows)

