"""`nsa`: Native Sparse Attention (Yuan et al., DeepSeek 2025): compressed, selected and
sliding-window branches on the same q, k, v, mixed by learned gates.

Parameters: `cmp_block` l (32), `cmp_stride` d (16), `sel_block` l' (64), `top_n` (16),
`window` w (512), `compress` ("mean" | "mlp"). Required: 1 <= d <= l (blocks cover every
key), l' a multiple of d (the paper's blocking), top_n >= 4 (up to four blocks are always
selected, see 2), w >= 1; l and d at most 1024, l' and top_n at most 65536.

1. Compressed. Block c covers keys [c*d, c*d + l); only whole blocks count (c*d + l <= N: a
   tail shorter than l is not pooled). Each is pooled into one key and one value: "mean", the
   mean of the block's real keys (values); "mlp", `W · vec((K_block + E) * real)` with E
   (l, D) an intra-block position term and W (D, l*D), one pair for keys and one for values,
   shared by every head and initialized to the mean (W the tiled identity / l, E = 0); padded
   rows of a block contribute nothing, and a block with no real key is not a key. Query i
   attends, with one softmax, to the pooled keys, scored `scale * q·k_c`; causal: block c
   only when it ends at or before i (c*d + l - 1 <= i); bidirectional: every block.
2. Selected. Keys are cut into selection blocks b of l' keys (the last one may be short).
   importance(i, b) = the compressed branch's softmax probabilities of query i (without the
   sink), summed over the compressed blocks that overlap block b (c*d < (b+1)*l' and
   c*d + l > b*l') and over the G query heads of i's kv head: all query heads of a kv head
   share one selection (as in the paper). Causal: the candidates are the blocks that start at
   or before i; block 0 and the two blocks nearest i, the block holding i and the one before
   it, are always selected; the raw keys are causal (j <= i). Bidirectional: every block is a
   candidate; always selected are block 0, the block holding i, the one before it (the one
   after it when i is in block 0) and, when N is not a multiple of l', the short last block
   (so how many keys a row reads does not depend on the content). A row selects
   min(top_n, candidates) blocks: those always selected, then the other candidates of highest
   importance, ties to the lower index. Query i attends, with one softmax, to the raw real
   keys of its selected blocks.
3. Sliding window: keys i - w < j <= i (causal), |i - j| < w (bidirectional).

Output `o_i = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win` with per-query-head gates
`g = sigmoid(W q_i + b)`, W (Hq, 3, D) and b (Hq, 3) learned by the variant (zero at start:
every gate 1/2); the paper computes the gates from the layer's hidden state through an MLP,
here they read the query (the attention contract sees no hidden state). With `sinks`, each
branch's softmax gets the null key (score sink_h, value 0). A branch with no key for a row
gives 0 there. Selection is discrete: no gradient flows through importance.

Cost per row (`scored_pairs` counts it exactly): the pooled keys it sees (up to N / d), the
raw keys of min(top_n, candidates) blocks and up to w (causal) or 2w - 1 window keys. Every
branch, and the importance, runs one chunk of rows at a time: memory is linear in N, never
N x N. Packed documents run each document alone (the base class regroups them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from attn_zoo.attention import Attention, with_sink
from attn_zoo.blocksparse import (
    CHUNK_ELEMENTS,
    block_sparse_attention,
    cached_key_blocks,
    part_attention,
)
from attn_zoo.cache import GrowingCache, attend, register_cache
from attn_zoo.params import Params, at_most, require
from attn_zoo.patterns import Part, Pattern, Pooled, Reach, every_key, everything
from attn_zoo.registry import register
from attn_zoo.selection import selection_attention

MAX_CMP_BLOCK = 1024
"""Upper bound of `cmp_block` (and so of `cmp_stride`): "mlp" holds a (D, cmp_block * D)
matrix for keys and one for values."""

MAX_SEL_BLOCK = 1 << 16
"""Upper bound of `sel_block` and `top_n`: a row reads top_n * sel_block raw keys."""

GATES = ("gate_weight", "gate_bias")
POOLING = ("key_pool_weight", "key_pool_position", "value_pool_weight", "value_pool_position")


@dataclass
class NSAParams(Params):
    cmp_block: int = at_most(32, MAX_CMP_BLOCK)
    cmp_stride: int = at_most(16, MAX_CMP_BLOCK)
    sel_block: int = at_most(64, MAX_SEL_BLOCK)
    top_n: int = at_most(16, MAX_SEL_BLOCK)
    window: int = 512
    compress: Literal["mean", "mlp"] = "mean"

    def validate(self) -> None:
        require(self.cmp_block >= 1, "cmp_block", self.cmp_block, ">= 1")
        require(self.cmp_stride >= 1, "cmp_stride", self.cmp_stride, ">= 1")
        require(self.cmp_stride <= self.cmp_block, "cmp_stride", self.cmp_stride,
                f"at most cmp_block ({self.cmp_block}): blocks must cover every key")
        require(self.sel_block >= 1 and self.sel_block % self.cmp_stride == 0, "sel_block",
                self.sel_block, f"a positive multiple of cmp_stride ({self.cmp_stride})")
        require(self.top_n >= 4, "top_n", self.top_n,
                ">= 4 (three blocks are always selected, a fourth in bidirectional rows)")
        require(self.window >= 1, "window", self.window, ">= 1")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "top_n": 4, "window": 16,
                "compress": "mlp"}


@register("nsa")
class NSAAttention(Attention):
    """Compressed, selected and window branches, merged by learned per-head gates.

    Torch: the compressed branch runs the block-sparse engine over the pooled keys, the
    selection `attn_zoo.selection.selection_attention` with one selection head per kv head,
    the window the engine's band. Triton: the block-sparse kernel for the compressed and window
    branches, `attn_zoo.kernels.selection` for the selected one. Importance is computed in
    torch, one chunk of rows at a time, from the compressed branch's log-sum-exp.
    """

    Params = NSAParams
    backends = ("torch", "triton")
    content_based = True
    shared_selection = True
    weight_names: ClassVar[tuple[str, ...]] = GATES
    head_axes: ClassVar[dict[str, str]] = {"sink": "q", "gate_weight": "q", "gate_bias": "q"}

    def __init__(self, **params: Any) -> None:
        if params.get("compress") == "mlp":  # read by the base class's __init__
            self.weight_names = GATES + POOLING
        super().__init__(**params)

    # -- learned weights ------------------------------------------------------------------

    def weight_shapes(self, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, ...]]:
        block = self.params.cmp_block
        shapes = {"gate_weight": (q_heads, 3, head_dim), "gate_bias": (q_heads, 3)}
        for kind in ("key", "value"):
            shapes[f"{kind}_pool_weight"] = (head_dim, block * head_dim)
            shapes[f"{kind}_pool_position"] = (block, head_dim)
        return {name: shapes[name] for name in self.weight_names}

    def reset_weights(self) -> None:
        self.gate_weight.zero_()
        self.gate_bias.zero_()
        if self.params.compress == "mlp":
            dim, block = self.key_pool_weight.shape[0], self.params.cmp_block
            mean = torch.eye(dim).repeat(1, block) / block  # W · vec(K) = mean of the rows
            for kind in ("key", "value"):
                getattr(self, f"{kind}_pool_weight").copy_(mean)
                getattr(self, f"{kind}_pool_position").zero_()

    # -- the branches -----------------------------------------------------------------------

    def n_pooled(self, m: int) -> int:
        """Whole compressed blocks among m keys."""
        block, stride = self.params.cmp_block, self.params.cmp_stride
        return (m - block) // stride + 1 if m >= block else 0

    def pool(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Pooled:
        """The compressed keys and values of k, v (B, Hkv, M, D): (B, Hkv, C, D) each, and
        whether each block holds a real key (B, C), or None without padding."""
        block, stride = self.params.cmp_block, self.params.cmp_stride
        batch, heads, m, dim = k.shape
        count = self.n_pooled(m)
        real = None
        if key_padding_mask is not None:
            real = key_padding_mask[:, :(count - 1) * stride + block].unfold(1, block, stride) \
                if count else key_padding_mask.new_zeros(batch, 0, block)
        pooled = [self._pool_rows(x, real, kind, count) for x, kind in ((k, "key"), (v, "value"))]
        return Pooled(*pooled, None, None if real is None else real.any(-1))

    def _pool_rows(self, x: Tensor, real: Tensor | None, kind: str, count: int) -> Tensor:
        """Pooled blocks of x (B, H, M, D): (B, H, count, D); real (B, count, l) or None."""
        block, stride = self.params.cmp_block, self.params.cmp_stride
        batch, heads, _, dim = x.shape
        if count == 0:
            return x.new_zeros(batch, heads, 0, dim)
        blocks = x[:, :, :(count - 1) * stride + block].unfold(2, block, stride)
        blocks = blocks.transpose(-1, -2)  # (B, H, C, l, D)
        mask = None if real is None else real[:, None, :, :, None]
        if self.params.compress == "mean":
            if mask is None:
                return blocks.mean(3)
            return torch.where(mask, blocks, 0.0).sum(3) / mask.sum(3).clamp_min(1)
        weight = getattr(self, f"{kind}_pool_weight").to(x.dtype)
        blocks = blocks + getattr(self, f"{kind}_pool_position").to(x.dtype)
        if mask is not None:
            blocks = torch.where(mask, blocks, 0.0)
        return torch.einsum("bhcld,eld->bhce", blocks, weight.view(dim, block, dim))

    def compressed_pattern(self, causal: bool) -> Pattern:
        """allowed(i, c): query i sees pooled key c (causal: the block ends at or before i)."""
        if not causal:
            return everything()
        block, stride = self.params.cmp_block, self.params.cmp_stride
        return lambda i, c: c * stride + block - 1 <= i

    def window_pattern(self, causal: bool) -> tuple[Pattern, Reach]:
        """The window's pairs and reach: i - w < j <= i (causal), |i - j| < w."""
        window = self.params.window
        if causal:
            return (lambda i, j: (j <= i) & (j > i - window)), (lambda i: (i - window + 1, i))
        return ((lambda i, j: (i - j).abs() < window),
                lambda i: (i - window + 1, i + window - 1))

    def select(self, q: Tensor, pooled: Pooled, lse: Tensor, positions: Tensor, m: int,
               causal: bool, scale: float) -> Tensor:
        """The selection blocks of every query.

        q: (B, Hkv, G, T, D), rows at `positions` (T,) of a sequence of m keys; pooled: the
        compressed keys; lse (B, Hkv, G, T): the compressed branch's log-sum-exp (no sink).
        Returns index (B, Hkv, T, S) long, S = min(top_n, blocks), -1 for an empty slot; the
        importance of a chunk of rows at a time, never T x C beyond it; no gradient.
        """
        p = self.params
        batch, heads, groups, rows, _ = q.shape
        q = q.to(pooled.k.dtype)  # half-precision queries score the float32 pooled keys
        count, n_blocks = pooled.k.shape[2], -(-m // p.sel_block)
        width = min(p.top_n, n_blocks)
        device = q.device
        starts = torch.arange(count, device=device) * p.cmp_stride
        blocks = torch.arange(n_blocks, device=device)
        # Compressed block c overlaps the selection blocks first[c] .. last[c], a run of at
        # most `spans`: importance gathers each block's probability into its run, O(T * C).
        first, last = starts // p.sel_block, (starts + p.cmp_block - 1) // p.sel_block
        spans = int((last - first).max()) + 1 if count else 0
        visible = self.compressed_pattern(causal)
        short_tail = m % p.sel_block != 0
        index = torch.empty(batch, heads, rows, width, dtype=torch.long, device=device)
        step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * (groups * count + n_blocks)))
        with torch.no_grad():
            for t0 in range(0, rows, step):
                t1 = min(rows, t0 + step)
                at = positions[t0:t1, None]
                seen = visible(at, torch.arange(count, device=device)[None, :])
                if pooled.real is not None:
                    seen = seen & pooled.real[:, None, None, None, :]
                scores = torch.einsum("bhgtd,bhcd->bhgtc", q[:, :, :, t0:t1], pooled.k) * scale
                probs = torch.where(seen, (scores - lse[:, :, :, t0:t1, None]).exp(), 0.0)
                summed = probs.sum(2)  # (B, Hkv, t, C): over the group's query heads
                importance = summed.new_zeros(*summed.shape[:-1], n_blocks)
                for offset in range(spans):
                    reaching = first + offset <= last
                    importance.index_add_(-1, (first + offset)[reaching], summed[..., reaching])
                own = at // p.sel_block
                if causal:
                    forced = (blocks == 0) | (blocks == own) | (blocks == own - 1)
                    candidate = blocks <= own
                else:
                    neighbour = torch.where(own > 0, own - 1, 1)
                    forced = (blocks == 0) | (blocks == own) | (blocks == neighbour)
                    if short_tail:
                        forced = forced | (blocks == n_blocks - 1)
                    candidate = torch.ones_like(forced)
                rank = torch.where(forced, float("inf"),
                                   torch.where(candidate, importance, float("-inf")))
                order = torch.sort(rank, dim=-1, descending=True, stable=True)
                chosen = order.indices[..., :width]
                index[:, :, t0:t1] = torch.where(order.values[..., :width] > float("-inf"),
                                                 chosen, -1)
        return index

    def combine(self, q: Tensor, results: list[tuple[Tensor, Tensor]]) -> Tensor:
        """o = sum of gate * branch output, each branch with its sink.

        q: (B, Hkv, G, N, D); results: (out (B, Hkv, G, N, D), lse (B, Hkv, G, N)) of the
        compressed, selected and window branches. Returns (B, Hkv, G, N, D) in float32
        (float64 for float64 q)."""
        _, kv_heads, groups, _, dim = q.shape
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        gates = torch.einsum("bhgnd,hgkd->bhgnk", q.to(work),
                             self.gate_weight.to(work).view(kv_heads, groups, 3, dim))
        gates = torch.sigmoid(gates + self.gate_bias.to(work).view(kv_heads, groups, 1, 3))
        out = None
        for branch, (part_out, lse) in enumerate(results):
            part_out = part_out.to(work)
            if self.sink is not None:
                part_out = with_sink(part_out, lse, self.sink.view(kv_heads, groups, 1))
            term = gates[..., branch, None] * part_out
            out = term if out is None else out + term
        return out

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        return self._forward(q, k, v, causal, key_padding_mask, scale, kernels=False), None

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        return self._forward(q, k, v, causal, key_padding_mask, scale, kernels=True), None

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                 key_padding_mask: Tensor | None, scale: float, kernels: bool) -> Tensor:
        """The three branches and their gated sum; the block-sparse and selection kernels
        when `kernels`, the torch engine and selection op otherwise."""
        n = q.shape[3]
        half = q.dtype in (torch.bfloat16, torch.float16)
        pooled = self.pool(k.float() if half else k, v.float() if half else v, key_padding_mask)
        compressed = self._compressed(q, pooled, causal, scale, kernels)
        index = self.select(q, pooled, compressed[1], torch.arange(n, device=q.device), n,
                            causal, scale)
        if kernels:
            from attn_zoo.kernels.selection import selection_attention as select_attend
        else:
            select_attend = selection_attention
        selected = select_attend(q, k, v, index, unit=self.params.sel_block, scale=scale,
                                 causal=causal, key_padding_mask=key_padding_mask)
        pattern, reach = self.window_pattern(causal)
        if kernels:
            window = self.triton_attention(q, k, v, "window", pattern, causal, key_padding_mask,
                                           scale, reach=reach)
        else:
            part = Part("window", pattern, reach, self.params.window)
            window = part_attention(part, q, k, v, key_padding_mask, scale,
                                    self._part_key("window", causal))
        return self.combine(q, [compressed, selected, window])

    def _compressed(self, q: Tensor, pooled: Pooled, causal: bool, scale: float,
                    kernels: bool) -> tuple[Tensor, Tensor]:
        """(out, lse) of the compressed branch: q (B, Hkv, G, N, D) over the pooled keys."""
        count = pooled.k.shape[2]
        if count == 0:  # shorter than one block: no compressed key
            return q.new_zeros(q.shape), q.new_full(q.shape[:4], float("-inf"))
        pattern = self.compressed_pattern(causal)
        pooled_k, pooled_v = pooled.k.to(q.dtype), pooled.v.to(q.dtype)
        if kernels:
            return self.triton_attention(q, pooled_k, pooled_v, "compressed", pattern, causal,
                                         pooled.real, scale, reach=every_key)
        part = Part("compressed", pattern, every_key, count)
        table = cached_key_blocks(self._part_key("compressed", causal), part, q.shape[3], count,
                                  q.device)
        return block_sparse_attention(q, pooled_k, pooled_v, table, pattern, block=part.block,
                                      scale=scale, key_padding_mask=pooled.real)

    # -- cost -------------------------------------------------------------------------------

    def scored_pairs(self, n: int, causal: bool) -> int:
        p = self.params
        i = torch.arange(n, dtype=torch.int64)
        count = self.n_pooled(n)
        own = i // p.sel_block
        if causal:
            compressed = ((i - p.cmp_block + 1).div(p.cmp_stride, rounding_mode="floor") + 1)
            compressed = compressed.clamp(0, count)
            selected = (torch.minimum(own + 1, torch.tensor(p.top_n)) - 1) * p.sel_block \
                + i % p.sel_block + 1
            window = torch.minimum(i + 1, torch.tensor(p.window))
        else:
            compressed = torch.full_like(i, count)
            n_blocks, tail = -(-n // p.sel_block), n % p.sel_block
            width = min(p.top_n, n_blocks)
            selected = torch.full_like(i, width * p.sel_block if not tail
                                       else (width - 1) * p.sel_block + tail)
            before = torch.minimum(i, torch.tensor(p.window - 1))
            after = torch.minimum(n - 1 - i, torch.tensor(p.window - 1))
            window = before + after + 1
        return int((compressed + selected + window).sum())


# -- decoding cache -------------------------------------------------------------------------


@register_cache("nsa")
class NSACache(GrowingCache):
    """Every raw key and value (the selection may read any block), plus the compressed keys
    and values, appended as their blocks complete; a new row reads the compressed keys that
    end at or before it, its top_n selected blocks of the raw cache and the window's tail. The
    causal rule reads only the prefix, so decoding equals teacher forcing (exact); the raw
    cache grows with the sequence (not bounded)."""

    bounded = False

    def __len__(self) -> int:
        pooled = self.buffers.get("pooled_k")
        return self.seen + (0 if pooled is None else pooled.shape[2])

    def _pool_new_blocks(self, end: int) -> None:
        """Append the compressed blocks completed by positions before `end`."""
        attention, p = self.attention, self.attention.params
        old = self.buffers.get("pooled_k")
        have = 0 if old is None else old.shape[2]
        count = attention.n_pooled(end)
        if count == have:
            return
        first = have * p.cmp_stride
        keys = self.held("k", end)[:, :, first:(count - 1) * p.cmp_stride + p.cmp_block]
        values = self.held("v", end)[:, :, first:(count - 1) * p.cmp_stride + p.cmp_block]
        pooled = attention.pool(keys, values, None)
        for name, new in (("pooled_k", pooled.k), ("pooled_v", pooled.v)):
            held = self.buffers.get(name)
            self.buffers[name] = new if held is None else torch.cat([held, new], dim=2)

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        attention, p = self.attention, self.attention.params
        batch, q_heads, rows, dim = q.shape
        kv_heads = k.shape[1]
        scale = self.scale(dim)
        self._append(k=k, v=v)
        end = self.seen + rows
        self._pool_new_blocks(end)
        positions = torch.arange(self.seen, end, device=q.device)
        grouped = q.unflatten(1, (kv_heads, -1))
        keys, values = self.held("k", end), self.held("v", end)
        empty = keys.new_zeros(batch, kv_heads, 0, dim)
        pooled = Pooled(self.buffers.get("pooled_k", empty), self.buffers.get("pooled_v", empty),
                        None, None)
        ends = torch.arange(pooled.k.shape[2], device=q.device) * p.cmp_stride + p.cmp_block - 1
        if ends.numel():
            compressed = attend(q, pooled.k, pooled.v,
                                lambda t0, t1: ends <= positions[t0:t1, None], scale)
        else:  # no block complete yet: no compressed key
            compressed = q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"))
        compressed = tuple(x.view(batch, kv_heads, -1, *x.shape[2:]) for x in compressed)
        index = attention.select(grouped, pooled, compressed[1], positions, end, True, scale)
        selected = selection_attention(grouped, keys, values, index, unit=p.sel_block,
                                       scale=scale, causal=True)
        first = max(0, self.seen - p.window + 1)
        tail = torch.arange(first, end, device=q.device)
        window = attend(q, keys[:, :, first:], values[:, :, first:],
                        lambda t0, t1: (tail <= positions[t0:t1, None])
                        & (tail > positions[t0:t1, None] - p.window), scale)
        window = tuple(x.view(batch, kv_heads, -1, *x.shape[2:]) for x in window)
        out = attention.combine(grouped, [compressed, selected, window])
        # The branches carry their sinks: an lse of +inf makes `extend`'s sink the identity.
        lse = torch.full((batch, q_heads, rows), float("inf"), dtype=out.dtype, device=q.device)
        return out.view(batch, q_heads, rows, dim), lse
