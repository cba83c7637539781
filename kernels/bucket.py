"""Bucketed attention kernels of `lsh` and `routing`: gathered groups attend through an index.

An index table `slots` (T, S) int32 lists positions; its row t belongs to (batch, head)
`t % (B * H)`. Group g of a row holds the slots `[g * group, (g + 1) * group)` (the last one
may be shorter); its queries attend to the keys at the same slots and, with look-back, to
those of group `g - 1` (mod the number of groups; no look-back with one group). The kernels
read q, k and v through the table, so no gathered copy of them is ever made.

* `lsh`: one row per (round, batch, head) holding the positions sorted by (bucket,
  position); groups are the chunks of `bucket_size` sorted positions, with look-back. A
  query's own key counts only when no other key is allowed. Every position appears once per
  row, so results are stored at the original positions: out (R, B, H, N, D), lse (R, B, H, N).
* `routing`: one row per (batch, head) holding every cluster's members, cluster after
  cluster, increasing positions within a cluster; groups are the clusters, without look-back.
  A position may sit in several clusters, so results stay in slot order: out (B, H, C, W, D).

Both mask keys by position (causal: key position <= query position) and by the padding
mask, and return the log-sum-exp beside the output; a query with no allowed key has out 0
and lse -inf. Softmax and accumulation run in float32 whatever the input dtype (float32
matmuls as in `block_sparse`: IEEE, or TF32 when torch's float32 matmul precision allows).
q, k and v are read through their strides (the head dim contiguous), never copied. Block
sizes, warps and stages come from `CONFIGS`, each entry natively compile-checked.

The backward pass is deterministic, without atomics: one kernel computes dq by query block,
another dk and dv by key block (the keys of group g are read by the queries of g and, through
their look-back, of g + 1), each writing every position once per row into a float32 buffer
of its own row; torch then sums the rows over rounds and over the query heads that share a
kv head (lsh), or adds them at the member positions (routing, with `index_add_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from attn_zoo.kernels.launch import (
    arch_family,
    inner_contiguous,
    launch,
    padded_dim,
    precision,
    target_arch,
)
from torch import Tensor

LOG2E = 1.4426950408889634
LAYOUTS = ("lsh", "routing")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 128


# -- helpers ----------------------------------------------------------------------------------
# Few, coarse helpers: the interpreter (the CPU test path) pays for every device-function call.


@triton.jit
def _program(BH, HEADS, KV_GROUP, N, GROUP, N_GROUPS, stride_qb, stride_qh, stride_kb,
             stride_kh, stride_vb, stride_vh, BLOCK: tl.constexpr):
    """This program's block start inside its group, its group, table row t (int64), the
    offsets of t's (batch, head) in q, k and v (v: its kv head), and its padding row."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(GROUP, BLOCK)
    start = (pid % blocks) * BLOCK
    rest = pid // blocks
    t = (rest // N_GROUPS).to(tl.int64)
    bh = t % BH
    batch = bh // HEADS
    head = bh % HEADS
    return (start, rest % N_GROUPS, t, batch * stride_qb + head * stride_qh,
            batch * stride_kb + head * stride_kh,
            batch * stride_vb + (head // KV_GROUP) * stride_vh, batch * N)


@triton.jit
def _slots(Slots, t, g, start, GROUP, S, L, BLOCK: tl.constexpr, BY_POSITION: tl.constexpr):
    """`BLOCK` slots of group g from `start`: (position, valid, rows of the per-row results
    (T * L): at the position for lsh, at the slot for routing)."""
    offset = start + tl.arange(0, BLOCK)
    slot = g * GROUP + offset
    valid = (offset < GROUP) & (slot < S)
    position = tl.load(Slots + t * S + slot, mask=valid, other=0)
    if BY_POSITION:
        rows = t * L + position
    else:
        rows = t * L + slot
    return position, valid, rows


@triton.jit
def _load_rows(X, rows, stride, valid, d, HEAD_DIM):
    """Rows of X (row stride `stride`) as a (len(rows), BLOCK_D) tile, zero where masked."""
    mask = valid[:, None] & (d[None, :] < HEAD_DIM)
    return tl.load(X + rows[:, None].to(tl.int64) * stride + d[None, :], mask=mask, other=0.0)


@triton.jit
def _allowed(q_pos, q_valid, q_alone, k_pos, k_valid, key_ok,
             CAUSAL: tl.constexpr, ALONE: tl.constexpr):
    """(M, N) bool: real keys (`key_ok`), causal by position; with ALONE a query's own key
    only when `q_alone` (no other key allowed: the forward pass finds it, the backward pass
    reads it back)."""
    allowed = q_valid[:, None] & key_ok[None, :]
    if CAUSAL:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    if ALONE:
        own = (k_pos[None, :] == q_pos[:, None]) & k_valid[None, :]
        allowed = (allowed & ~own) | (own & q_alone[:, None])
    return allowed


@triton.jit
def _key_block(Slots, K, V, Pad, t, g, start, stride_kn, stride_vn, pad_base, q_pos, q_valid,
               q_alone, d, GROUP, S, HEAD_DIM, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
               ALONE: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """Keys and values (BLOCK, BLOCK_D) of group g from `start` (K, V: the head's rows), and
    which of them each query may see: (M, BLOCK) bool."""
    offset = start + tl.arange(0, BLOCK)
    slot = g * GROUP + offset
    k_valid = (offset < GROUP) & (slot < S)
    k_pos = tl.load(Slots + t * S + slot, mask=k_valid, other=0)
    key_ok = k_valid
    if HAS_PAD:
        key_ok = key_ok & (tl.load(Pad + pad_base + k_pos, mask=k_valid, other=0) != 0)
    allowed = _allowed(q_pos, q_valid, q_alone, k_pos, k_valid, key_ok, CAUSAL, ALONE)
    mask = k_valid[:, None] & (d[None, :] < HEAD_DIM)
    rows = k_pos[:, None].to(tl.int64)
    k = tl.load(K + rows * stride_kn + d[None, :], mask=mask, other=0.0)
    v = tl.load(V + rows * stride_vn + d[None, :], mask=mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v, allowed


# Sizes are not specialized on: one compiled kernel serves every length and head count.
# Strides and HEAD_DIM (the row stride of the results) are, for aligned vector loads.
_SIZES = ["BH", "HEADS", "KV_GROUP", "N", "S", "L", "GROUP", "N_GROUPS"]


# -- forward ----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def _bucket_fwd_kernel(
    Q, K, V, Slots, Pad, Out, Lse, Alone,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    scale, BH, HEADS, KV_GROUP, N, S, L, GROUP, N_GROUPS, HEAD_DIM,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, N_PARTS: tl.constexpr, ALONE: tl.constexpr,
    BY_POSITION: tl.constexpr, INCREASING: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m, g, t, q_off, k_off, v_off, pad_base = _program(
        BH, HEADS, KV_GROUP, N, GROUP, N_GROUPS, stride_qb, stride_qh, stride_kb, stride_kh,
        stride_vb, stride_vh, BLOCK_M)
    q_pos, q_valid, rows = _slots(Slots, t, g, start_m, GROUP, S, L, BLOCK_M, BY_POSITION)
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + q_off, q_pos, stride_qn, q_valid, d, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    not_yet = tl.zeros([BLOCK_M], dtype=tl.int1)  # own keys wait until the others are known
    qk_scale = scale * 1.4426950408889634  # scores in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(N_PARTS):  # part 0: own group; part 1: the previous one
        key_group = (g + N_GROUPS - part) % N_GROUPS
        if INCREASING and CAUSAL:  # positions increase along the group: no key past the block
            hi = tl.minimum(GROUP, start_m + BLOCK_M)
        else:
            hi = GROUP
        for start_n in range(0, hi, BLOCK_N):
            k, v, allowed = _key_block(Slots, K + k_off, V + v_off, Pad, t, key_group, start_n,
                                       stride_kn, stride_vn, pad_base, q_pos, q_valid, not_yet, d,
                                       GROUP, S, HEAD_DIM, CAUSAL, HAS_PAD, ALONE, UPCAST,
                                       BLOCK_N)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without keys yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    has_key = m_i > float("-inf")
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    if ALONE:  # no other key: the query's own key alone, so out = v_own and lse = its score
        alone = q_valid & ~has_key
        if HAS_PAD:
            alone = alone & (tl.load(Pad + pad_base + q_pos, mask=q_valid, other=0) != 0)
        k_own = _load_rows(K + k_off, q_pos, stride_kn, alone, d, HEAD_DIM).to(tl.float32)
        v_own = _load_rows(V + v_off, q_pos, stride_vn, alone, d, HEAD_DIM).to(tl.float32)
        out = tl.where(alone[:, None], v_own, out)
        lse = tl.where(alone, tl.sum(q.to(tl.float32) * k_own, 1) * scale, lse)
        tl.store(Alone + rows, alone.to(tl.int8), mask=q_valid)
    mask = q_valid[:, None] & (d[None, :] < HEAD_DIM)
    tl.store(Out + rows[:, None] * HEAD_DIM + d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + rows, lse, mask=q_valid)


# -- backward ---------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def _bucket_bwd_dq_kernel(
    Q, K, V, Slots, Pad, DOut, Lse, Delta, Alone, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    scale, BH, HEADS, KV_GROUP, N, S, L, GROUP, N_GROUPS, HEAD_DIM,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, N_PARTS: tl.constexpr, ALONE: tl.constexpr,
    BY_POSITION: tl.constexpr, INCREASING: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq of a block of queries, from every key block they read."""
    start_m, g, t, q_off, k_off, v_off, pad_base = _program(
        BH, HEADS, KV_GROUP, N, GROUP, N_GROUPS, stride_qb, stride_qh, stride_kb, stride_kh,
        stride_vb, stride_vh, BLOCK_M)
    q_pos, q_valid, rows = _slots(Slots, t, g, start_m, GROUP, S, L, BLOCK_M, BY_POSITION)
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + q_off, q_pos, stride_qn, q_valid, d, HEAD_DIM)
    do = _load_rows(DOut, rows, HEAD_DIM, q_valid, d, HEAD_DIM)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(Lse + rows, mask=q_valid, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no allowed key: p is 0 anyway
    delta = tl.load(Delta + rows, mask=q_valid, other=0.0)
    if ALONE:
        alone = tl.load(Alone + rows, mask=q_valid, other=0) != 0
    else:
        alone = tl.zeros([BLOCK_M], dtype=tl.int1)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(N_PARTS):
        key_group = (g + N_GROUPS - part) % N_GROUPS
        if INCREASING and CAUSAL:
            hi = tl.minimum(GROUP, start_m + BLOCK_M)
        else:
            hi = GROUP
        for start_n in range(0, hi, BLOCK_N):
            k, v, allowed = _key_block(Slots, K + k_off, V + v_off, Pad, t, key_group, start_n,
                                       stride_kn, stride_vn, pad_base, q_pos, q_valid, alone, d,
                                       GROUP, S, HEAD_DIM, CAUSAL, HAS_PAD, ALONE, UPCAST,
                                       BLOCK_N)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    mask = q_valid[:, None] & (d[None, :] < HEAD_DIM)
    tl.store(DQ + rows[:, None] * HEAD_DIM + d[None, :], dq * scale, mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def _bucket_bwd_dkdv_kernel(
    Q, K, V, Slots, Pad, DOut, Lse, Delta, Alone, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    scale, BH, HEADS, KV_GROUP, N, S, L, GROUP, N_GROUPS, HEAD_DIM,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, N_PARTS: tl.constexpr, ALONE: tl.constexpr,
    BY_POSITION: tl.constexpr, INCREASING: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk and dv of a block of keys of group g, from the queries of g and of g + 1 (whose
    look-back is g)."""
    start_n, g, t, q_off, k_off, v_off, pad_base = _program(
        BH, HEADS, KV_GROUP, N, GROUP, N_GROUPS, stride_qb, stride_qh, stride_kb, stride_kh,
        stride_vb, stride_vh, BLOCK_N)
    k_pos, k_valid, k_rows = _slots(Slots, t, g, start_n, GROUP, S, L, BLOCK_N, BY_POSITION)
    key_ok = k_valid
    if HAS_PAD:
        key_ok = key_ok & (tl.load(Pad + pad_base + k_pos, mask=k_valid, other=0) != 0)
    d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + k_off, k_pos, stride_kn, k_valid, d, HEAD_DIM)
    v = _load_rows(V + v_off, k_pos, stride_vn, k_valid, d, HEAD_DIM)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for part in tl.static_range(N_PARTS):
        query_group = (g + part) % N_GROUPS
        if INCREASING and CAUSAL:  # queries before this key block see none of it
            lo = (start_n // BLOCK_M) * BLOCK_M
        else:
            lo = 0
        for start_m in range(lo, GROUP, BLOCK_M):
            # The query block, inline: the interpreter pays for every device-function call.
            offset = start_m + tl.arange(0, BLOCK_M)
            slot = query_group * GROUP + offset
            q_valid = (offset < GROUP) & (slot < S)
            q_pos = tl.load(Slots + t * S + slot, mask=q_valid, other=0)
            if BY_POSITION:
                rows = t * L + q_pos
            else:
                rows = t * L + slot
            mask = q_valid[:, None] & (d[None, :] < HEAD_DIM)
            q = tl.load(Q + q_off + q_pos[:, None].to(tl.int64) * stride_qn + d[None, :], mask=mask,
                        other=0.0)
            do = tl.load(DOut + rows[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(Lse + rows, mask=q_valid, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + rows, mask=q_valid, other=0.0)
            if ALONE:
                alone = tl.load(Alone + rows, mask=q_valid, other=0) != 0
            else:
                alone = tl.zeros([BLOCK_M], dtype=tl.int1)
            allowed = _allowed(q_pos, q_valid, alone, k_pos, k_valid, key_ok, CAUSAL, ALONE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = k_valid[:, None] & (d[None, :] < HEAD_DIM)
    offsets = k_rows[:, None] * HEAD_DIM + d[None, :]
    tl.store(DK + offsets, dk * scale, mask=mask)
    tl.store(DV + offsets, dv, mask=mask)


# -- launchers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketConfig:
    """Largest query/key block of the bucket kernels, and their warps and stages."""

    block: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = BucketConfig(64, 1, 1)

# (family, precision kind) -> padded head dim -> BucketConfig(block, num_warps, num_stages),
# chosen and compile-checked as block_sparse.CONFIGS is (sm_100 takes sm_90's); a call with
# buckets or clusters smaller than `block` uses the next power of two >= 16 instead.
_B = BucketConfig
CONFIGS: dict[tuple[int, str], dict[int, BucketConfig]] = {
    (80, "16bit"): {16: _B(64, 8, 2),
                    32: _B(64, 4, 2),
                    64: _B(32, 4, 2),
                    128: _B(64, 8, 1)},
    (80, "tf32"): {16: _B(64, 4, 1),
                   32: _B(64, 4, 1),
                   64: _B(32, 4, 2),
                   128: _B(16, 8, 2)},
    (80, "ieee"): {16: _B(32, 8, 1),
                   32: _B(64, 8, 1),
                   64: _B(16, 8, 2),
                   128: _B(16, 8, 1)},
    (90, "16bit"): {16: _B(64, 4, 2),
                    32: _B(64, 4, 2),
                    64: _B(64, 4, 2),
                    128: _B(32, 8, 2)},
    (90, "tf32"): {16: _B(64, 4, 2),
                   32: _B(64, 4, 2),
                   64: _B(64, 8, 2),
                   128: _B(32, 4, 2)},
    (90, "ieee"): {16: _B(64, 4, 1),
                   32: _B(64, 8, 1),
                   64: _B(32, 8, 1),
                   128: _B(16, 8, 1)},
    (100, "16bit"): {16: _B(64, 4, 2),
                     32: _B(64, 4, 2),
                     64: _B(64, 4, 2),
                     128: _B(32, 8, 2)},
    (100, "tf32"): {16: _B(64, 4, 2),
                    32: _B(64, 4, 2),
                    64: _B(64, 8, 2),
                    128: _B(32, 4, 2)},
    (100, "ieee"): {16: _B(64, 4, 1),
                    32: _B(64, 8, 1),
                    64: _B(32, 8, 1),
                    128: _B(16, 8, 1)},
}


def bucket_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> BucketConfig:
    """The checked config of `device`'s architecture for `dtype` and `head_dim`, or the
    interpreter's."""
    arch = target_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    return CONFIGS[arch_family(arch), precision(dtype)][padded_dim(head_dim)]


class _Call:
    """Shapes, strides, flags, block sizes and grid of one call, shared by the three kernels."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                 key_padding_mask: Tensor | None, group: int, causal: bool, scale: float,
                 layout: str) -> None:
        batch, heads, n, dim = q.shape
        lsh = layout == "lsh"
        n_groups = -(-slots.shape[1] // group)
        config = bucket_config(q.dtype, dim, q.device)
        self.block = min(config.block, max(16, triton.next_power_of_2(group)))
        self.grid = (-(-group // self.block) * n_groups * slots.shape[0],)
        self.pad = (q.new_empty(0, dtype=torch.uint8) if key_padding_mask is None
                    else key_padding_mask.contiguous().view(torch.uint8))
        self.rows = slots.shape[0]
        self.length = n if lsh else slots.shape[1]  # L: rows of the results per table row
        self.strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        interpreter = target_arch(q.device) is None
        self.args = dict(
            scale=scale, BH=batch * heads, HEADS=heads, KV_GROUP=heads // v.shape[1], N=n,
            S=slots.shape[1], L=self.length, GROUP=group, N_GROUPS=n_groups, HEAD_DIM=dim,
            CAUSAL=causal, HAS_PAD=key_padding_mask is not None,
            N_PARTS=2 if lsh and n_groups > 1 else 1, ALONE=lsh, BY_POSITION=lsh,
            INCREASING=not lsh, PRECISION="tf32" if precision(q.dtype) == "tf32" else "ieee",
            # The interpreter multiplies bfloat16 tiles as their raw bits (triton 3.9): there
            # they are multiplied in float32.
            UPCAST=interpreter and q.dtype == torch.bfloat16,
            BLOCK_M=self.block, BLOCK_N=self.block, BLOCK_D=padded_dim(dim),
        )
        if not interpreter:
            self.args.update(num_warps=config.num_warps, num_stages=config.num_stages)


def _forward(q: Tensor, k: Tensor, v: Tensor, slots: Tensor, key_padding_mask: Tensor | None,
             group: int, causal: bool, scale: float,
             layout: str) -> tuple[Tensor, Tensor, Tensor]:
    call = _Call(q, k, v, slots, key_padding_mask, group, causal, scale, layout)
    rows, length, dim = call.rows, call.length, q.shape[3]
    out = q.new_empty(rows, length, dim)
    lse = q.new_empty(rows, length, dtype=torch.float32)
    alone = q.new_empty((rows, length) if layout == "lsh" else (0,), dtype=torch.int8)
    launch(_bucket_fwd_kernel, call.grid, q, k, v, slots, call.pad, out, lse, alone,
           *call.strides, **call.args)
    return out, lse, alone


def _backward(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
              slots: Tensor, key_padding_mask: Tensor | None, out: Tensor, lse: Tensor,
              alone: Tensor, group: int, causal: bool, scale: float,
              layout: str) -> tuple[Tensor, Tensor, Tensor]:
    call = _Call(q, k, v, slots, key_padding_mask, group, causal, scale, layout)
    grad_out = grad_out.to(q.dtype).contiguous()
    # d lse_i / d s_ij = p_ij: the lse gradient shifts the softmax-backward term delta; rows
    # without keys have no probabilities, and a zero delta keeps them finite.
    delta = (grad_out.float() * out.float()).sum(-1) - grad_lse.float()
    delta = delta.masked_fill_(lse == float("-inf"), 0.0).contiguous()
    grad_q, grad_k, grad_v = (torch.zeros(call.rows, call.length, q.shape[3],
                                          dtype=torch.float32, device=q.device)
                              for _ in range(3))
    common = (q, k, v, slots, call.pad, grad_out, lse, delta, alone)
    launch(_bucket_bwd_dq_kernel, call.grid, *common, grad_q, *call.strides, **call.args)
    launch(_bucket_bwd_dkdv_kernel, call.grid, *common, grad_k, grad_v, *call.strides,
           **call.args)
    batch, heads, n, dim = q.shape
    kv_heads = v.shape[1]
    if layout == "lsh":  # per round and query head, at the positions: sum them
        grad_q = grad_q.view(-1, batch, heads, n, dim).sum(0)
        grad_k = grad_k.view(-1, batch, heads, n, dim).sum(0)
        grad_v = grad_v.view(-1, batch, kv_heads, heads // kv_heads, n, dim).sum((0, 3))
    else:  # per cluster slot: add them at the member positions
        head_rows = torch.arange(batch * heads, device=q.device)
        q_rows = (head_rows[:, None] * n + slots).flatten()
        kv_head = (head_rows // heads) * kv_heads + (head_rows % heads) // (heads // kv_heads)
        v_rows = (kv_head[:, None] * n + slots).flatten()
        grad_q = grad_q.new_zeros(batch * heads * n, dim).index_add_(
            0, q_rows, grad_q.view(-1, dim)).view(batch, heads, n, dim)
        grad_k = grad_k.new_zeros(batch * heads * n, dim).index_add_(
            0, q_rows, grad_k.view(-1, dim)).view(batch, heads, n, dim)
        grad_v = grad_v.new_zeros(batch * kv_heads * n, dim).index_add_(
            0, v_rows, grad_v.view(-1, dim)).view(batch, kv_heads, n, dim)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


# -- autograd wrappers ------------------------------------------------------------------------


@torch.library.custom_op("attn_zoo::bucket_attention", mutates_args=())
def _bucket_attention(q: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                      key_padding_mask: Tensor | None, group: int, causal: bool, scale: float,
                      layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """out (T, L, D) in q's dtype, lse (T, L) float32 and the lone-query flags (T, L) int8
    (lsh; empty for routing), with L = N (lsh) or S (routing)."""
    return _forward(q, k, v, slots, key_padding_mask, group, causal, scale, layout)


@_bucket_attention.register_fake
def _(q, k, v, slots, key_padding_mask, group, causal, scale, layout):
    length = q.shape[2] if layout == "lsh" else slots.shape[1]
    rows = slots.shape[0]
    alone = (rows, length) if layout == "lsh" else (0,)
    return (q.new_empty(rows, length, q.shape[3]),
            q.new_empty(rows, length, dtype=torch.float32),
            q.new_empty(alone, dtype=torch.int8))


@torch.library.custom_op("attn_zoo::bucket_attention_backward", mutates_args=())
def _bucket_attention_backward(
    grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, slots: Tensor,
    key_padding_mask: Tensor | None, out: Tensor, lse: Tensor, alone: Tensor, group: int,
    causal: bool, scale: float, layout: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk (B, H, N, D) and dv (B, Hkv, N, D) in the inputs' dtypes."""
    return _backward(grad_out, grad_lse, q, k, v, slots, key_padding_mask, out, lse, alone,
                     group, causal, scale, layout)


@_bucket_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, slots, key_padding_mask, out, lse, alone, group, causal,
      scale, layout):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, slots, key_padding_mask, group, causal, scale, layout = inputs
    out, lse, alone = output
    ctx.save_for_backward(q, k, v, slots, key_padding_mask, out, lse, alone)
    ctx.options = (group, causal, scale, layout)
    ctx.mark_non_differentiable(alone)


def _bucket_attention_grad(ctx, grad_out, grad_lse, _grad_alone):
    q, k, v, slots, key_padding_mask, out, lse, alone = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_q, grad_k, grad_v = _bucket_attention_backward(
        grad_out, grad_lse, q, k, v, slots, key_padding_mask, out, lse, alone, *ctx.options)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


_bucket_attention.register_autograd(_bucket_attention_grad, setup_context=_setup_context)


def _check(q: Tensor, k: Tensor, v: Tensor, index: Tensor, index_name: str,
           key_padding_mask: Tensor | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got ({x.dtype}, {x.device})")
    batch, heads, n, dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != batch or v.shape[2:] != (n, dim) or heads % v.shape[1]:
        raise ValueError(f"v must have shape (B, Hkv, N, D) = ({batch}, Hkv, {n}, {dim}) with "
                         f"{heads} % Hkv == 0, got {tuple(v.shape)}")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {dim}")
    if index.dtype not in (torch.int32, torch.int64) or index.device != q.device:
        raise TypeError(f"{index_name} must be an int32 or int64 tensor on {q.device}, got "
                        f"{index.dtype} on {index.device}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (batch, n)):
        raise ValueError(f"key_padding_mask must be a bool tensor of shape {(batch, n)}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def lsh_attention(q: Tensor, k: Tensor, v: Tensor, order: Tensor, bucket_size: int, *,
                  causal: bool, scale: float,
                  key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reformer attention of every hashing round, from the sorted order.

    q, k: (B, H, N, D) (k: the shared-QK keys, normalized q, given apart so that autograd
    differentiates the normalization outside); v: (B, Hkv, N, D) with H % Hkv == 0; order:
    (R, B, H, N) int, each round's positions sorted by (bucket, position); key_padding_mask:
    (B, N) bool, True = a real key. Chunks of `min(bucket_size, N)` sorted queries attend to
    their own chunk and the previous one (chunk 0 to the last; no look-back with one chunk),
    causal by position, their own key only when no other is allowed.

    Returns out (R, B, H, N, D) in q's dtype and lse (R, B, H, N) float32 at the original
    positions; a query with no allowed key has out 0 and lse -inf. Both are differentiable.
    """
    _check(q, k, v, order, "order", key_padding_mask)
    batch, heads, n, dim = q.shape
    if order.dim() != 4 or order.shape[1:] != (batch, heads, n):
        raise ValueError(f"order must have shape (R, B, H, N) = (R, {batch}, {heads}, {n}), "
                         f"got {tuple(order.shape)}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    slots = order.reshape(-1, n).to(torch.int32).contiguous()
    q, k, v = inner_contiguous(q), inner_contiguous(k), inner_contiguous(v)
    out, lse, _ = _bucket_attention(q, k, v, slots,
                                    key_padding_mask, min(bucket_size, n), causal, scale, "lsh")
    rounds = order.shape[0]
    return out.view(rounds, batch, heads, n, dim), lse.view(rounds, batch, heads, n)


def routing_attention(q: Tensor, k: Tensor, v: Tensor, members: Tensor, *, causal: bool,
                      scale: float,
                      key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention inside clusters: the members of each cluster attend to each other.

    q, k: (B, H, N, D) (k: the shared-QK keys); v: (B, Hkv, N, D) with H % Hkv == 0;
    members: (B, H, C, W) int, distinct positions increasing along W; key_padding_mask:
    (B, N) bool, True = a real key. Causal by position; padded keys never.

    Returns out (B, H, C, W, D) in q's dtype and lse (B, H, C, W) float32, one per member;
    a member with no allowed key has out 0 and lse -inf. Both are differentiable.
    """
    _check(q, k, v, members, "members", key_padding_mask)
    batch, heads, n, dim = q.shape
    if members.dim() != 4 or members.shape[:2] != (batch, heads):
        raise ValueError(f"members must have shape (B, H, C, W) = ({batch}, {heads}, C, W), "
                         f"got {tuple(members.shape)}")
    clusters, window = members.shape[2:]
    slots = members.reshape(batch * heads, clusters * window).to(torch.int32).contiguous()
    q, k, v = inner_contiguous(q), inner_contiguous(k), inner_contiguous(v)
    out, lse, _ = _bucket_attention(q, k, v, slots,
                                    key_padding_mask, window, causal, scale, "routing")
    return (out.view(batch, heads, clusters, window, dim),
            lse.view(batch, heads, clusters, window))
