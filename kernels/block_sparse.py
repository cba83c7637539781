"""Block-sparse flash attention over a `BlockLayout`: forward and backward Triton kernels.

FlashAttention-2 style: a program owns one query tile of one query head and runs an online
softmax over the key tiles its layout lists; full tiles need no mask, partial tiles read their
precomputed mask. The backward pass recomputes the probabilities from the saved log-sum-exp:
a preprocess kernel forms delta_i = rowsum(dO_i * O_i) - dlse_i, a dK/dV kernel walks the
transposed layout (one program per key tile and kv head, looping over that head's G query
heads, so no atomics), and a dQ kernel walks the forward layout.

Queries are grouped, (B, Hkv, G, N, D): k and v are read once per kv head, never repeated.
Every tensor is read and written through its strides (only the head dim must be contiguous),
so a (B, N, H, D) projection output viewed as (B, H, N, D) is never copied. Inputs float32,
bfloat16 or float16; scores, softmax and accumulators are float32; float32 matmuls run in
IEEE precision, or on TF32 tensor cores when `torch.set_float32_matmul_precision` allows it.
Head dims up to 128 (padded to a power of two in-kernel). Tiles, warps and stages come from
`CONFIGS`, per architecture family, precision and head dim, each natively compile-checked.

`layout_attention` is the autograd-aware entry point; it runs through the custom ops
`attn_zoo::block_sparse_fwd` / `attn_zoo::block_sparse_bwd`, so `torch.compile` traces it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
from attn_zoo.kernels.layout import BlockLayout
from torch import Tensor

LOG2E = 1.4426950408889634

# -- kernels --------------------------------------------------------------------------------
# Helpers are written inline: every nested jit call costs a patching step in the interpreter,
# which the CPU test suite runs under.
#
# UPCAST: Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits, so there
# bfloat16 tiles are widened to float32 as they are loaded (products of bfloat16 values are
# exact in float32). Compiled kernels never set it.


# Lengths, table widths and head counts are not specialized on: one compiled kernel serves
# every sequence length and head count. Strides are, for aligned vector loads.
_SIZES = ["N", "M", "kv_width", "q_width", "GROUPS", "KV_HEADS"]


@triton.jit(do_not_specialize=_SIZES)
def _forward_kernel(
    Q, K, V, Out, Lse, KvIndex, KvCount, KvMask, Masks, KeyPad, KeyBias, BadKeys, BadTiles,
    stride_qb, stride_qh, stride_qg, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_og, stride_on,
    N, M, kv_width, qk_scale,
    GROUPS, KV_HEADS, HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, REPAIR: tl.constexpr,
):
    """Online softmax of one query tile of one query head over its layout's key tiles.

    Scores run in log2 units (qk_scale = scale * log2(e)), so exp2 replaces exp.

    REPAIR (a second launch after the first): only the query tiles that visit a key tile
    holding a key whose k or v is inf or NaN (`BadTiles`, per kv head and key tile) run, and
    rewrite their rows with such keys (`BadKeys`) read as zeros and scored NaN, so a row they
    are allowed to comes out NaN and no other row sees them (in the first launch,
    0 * NaN in p @ v reaches the whole tile). The others exit at once; the first launch keeps
    its registers.
    """
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)  # (b * Hkv + h) * G + g
    group = head % GROUPS
    kv_head = head // GROUPS
    batch = kv_head // KV_HEADS
    kv_in_batch = kv_head % KV_HEADS
    row_in_tile = tl.arange(0, BLOCK_M)
    col_in_tile = tl.arange(0, BLOCK_N)
    rows = tile * BLOCK_M + row_in_tile
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_ok = rows < N
    count = tl.load(KvCount + tile)
    if REPAIR:
        hits = tl.full([], 0, tl.int32)
        for slot in range(count):
            key_tile = tl.load(KvIndex + tile * kv_width + slot)
            hits += tl.load(BadTiles + kv_head * tl.cdiv(M, BLOCK_N) + key_tile).to(tl.int32)
        count = tl.where(hits > 0, count, 0)
        # Nothing loaded or stored without a bad key tile (hits widened to the rows first:
        # the interpreter mishandles a scalar mask broadcast).
        row_ok = row_ok & (tl.zeros((BLOCK_M,), tl.int32) + hits > 0)
    first_row = (tile * BLOCK_M).to(tl.int64)
    q_tile = (Q + batch * stride_qb + kv_in_batch * stride_qh + group * stride_qg
              + first_row * stride_qn)
    q = tl.load(q_tile + row_in_tile[:, None] * stride_qn + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_head = K + batch * stride_kb + kv_in_batch * stride_kh
    v_head = V + batch * stride_vb + kv_in_batch * stride_vh
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for slot in range(count):
        key_tile = tl.load(KvIndex + tile * kv_width + slot)
        mask_id = tl.load(KvMask + tile * kv_width + slot)
        cols = key_tile * BLOCK_N + col_in_tile
        col_ok = cols < M
        readable = col_ok
        if REPAIR:
            readable = col_ok & (tl.load(BadKeys + kv_head * M + cols, mask=col_ok, other=0) == 0)
        first_col = (key_tile * BLOCK_N).to(tl.int64)
        k = tl.load(k_head + first_col * stride_kn + col_in_tile[None, :] * stride_kn
                    + dims[:, None], mask=readable[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_head + first_col * stride_vn + col_in_tile[:, None] * stride_vn
                    + dims[None, :], mask=readable[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if REPAIR:
            s = tl.where(readable[None, :] | ~col_ok[None, :], s, float("nan"))
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            bias = tl.load(KeyBias + batch * M + cols, mask=col_ok, other=0.0)
            s += bias[None, :] * 1.4426950408889634
        if HAS_PAD:
            keep &= tl.load(KeyPad + batch * M + cols, mask=col_ok, other=0)[None, :] != 0
        s = tl.where(keep, s, float("-inf"))
        # The tile mask is applied where it is loaded: a boolean tile carried out of this
        # branch breaks the native compiler's float32 layouts.
        if mask_id >= 0:
            bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                           + row_in_tile[:, None] * BLOCK_N + col_in_tile[None, :])
            s = tl.where(bits != 0, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row with nothing allowed so far keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
    reached = row_sum > 0.0
    safe_sum = tl.where(reached, row_sum, 1.0)
    lse = tl.where(reached, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
    if REPAIR:  # a row that sees such a key has a NaN lse, as its output (the torch engine's)
        lse = tl.where(row_sum == row_sum, lse, float("nan"))
    out_tile = (Out + batch * stride_ob + kv_in_batch * stride_oh + group * stride_og
                + first_row * stride_on)
    tl.store(out_tile + row_in_tile[:, None] * stride_on + dims[None, :],
             (acc / safe_sum[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + head * N + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=_SIZES)
def _delta_kernel(Out, GradOut, GradLse, Delta,
                  stride_ob, stride_oh, stride_og, stride_on,
                  stride_gb, stride_gh, stride_gg, stride_gn,
                  N, GROUPS, KV_HEADS, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) - dlse_i (d lse_i / d s_ij = p_ij)."""
    head = tl.program_id(1).to(tl.int64)
    group = head % GROUPS
    kv_head = head // GROUPS
    batch = kv_head // KV_HEADS
    kv_in_batch = kv_head % KV_HEADS
    first_row = (tl.program_id(0) * BLOCK_M).to(tl.int64)
    row_in_tile = tl.arange(0, BLOCK_M)
    rows = first_row + row_in_tile
    dims = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < N) & (dims[None, :] < HEAD_DIM)
    out_tile = (Out + batch * stride_ob + kv_in_batch * stride_oh + group * stride_og
                + first_row * stride_on)
    grad_tile = (GradOut + batch * stride_gb + kv_in_batch * stride_gh + group * stride_gg
                 + first_row * stride_gn)
    out = tl.load(out_tile + row_in_tile[:, None] * stride_on + dims[None, :], mask=inside,
                  other=0.0).to(tl.float32)
    grad_out = tl.load(grad_tile + row_in_tile[:, None] * stride_gn + dims[None, :],
                       mask=inside, other=0.0).to(tl.float32)
    grad_lse = tl.load(GradLse + head * N + rows, mask=rows < N, other=0.0)
    tl.store(Delta + head * N + rows, tl.sum(out * grad_out, 1) - grad_lse, mask=rows < N)


@triton.jit(do_not_specialize=_SIZES)
def _grad_kv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, GradBias, QIndex, QCount, QMask, Masks,
    KeyPad, KeyBias, BadKeys, Repair,
    stride_qb, stride_qh, stride_qg, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gg, stride_gn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    N, M, q_width, qk_scale, scale,
    GROUPS, KV_HEADS, HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, REPAIR: tl.constexpr,
):
    """dK, dV (and this kv head's share of d key_bias) of one key tile, from the query tiles
    of its G query heads that visit it; transposed scores (BLOCK_N, SUB_M) per step.

    REPAIR (a second launch after the first): only the key tiles flagged in `Repair` (per kv
    head and key tile) run, and rewrite their gradients with keys holding inf or NaN
    (`BadKeys`) read as zeros and NaN deltas as zeros (`Delta` is such a copy), so a row that
    sees such a key (NaN lse and delta) reaches only the keys it sees through its NaN
    probabilities (in the first launch, 0 * NaN reaches the whole tile). The others exit at
    once; the first launch keeps its registers.
    """
    tl.static_assert(BLOCK_M % SUB_M == 0)
    key_tile = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    batch = kv_head // KV_HEADS
    kv_in_batch = kv_head % KV_HEADS
    col_in_tile = tl.arange(0, BLOCK_N)
    cols = key_tile * BLOCK_N + col_in_tile
    col_ok = cols < M
    readable = col_ok
    if REPAIR:
        hit = tl.load(Repair + kv_head * tl.cdiv(M, BLOCK_N) + key_tile).to(tl.int32)
        # Nothing loaded or stored without the flag (widened to the keys first: the
        # interpreter mishandles a scalar mask broadcast).
        col_ok = col_ok & (tl.zeros((BLOCK_N,), tl.int32) + hit > 0)
        readable = col_ok & (tl.load(BadKeys + kv_head * M + cols, mask=col_ok, other=0) == 0)
    first_col = (key_tile * BLOCK_N).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kv_inside = col_ok[:, None] & dim_ok[None, :]
    kv_read = readable[:, None] & dim_ok[None, :]
    k = tl.load(K + batch * stride_kb + kv_in_batch * stride_kh + first_col * stride_kn
                + col_in_tile[:, None] * stride_kn + dims[None, :], mask=kv_read, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_in_batch * stride_vh + first_col * stride_vn
                + col_in_tile[:, None] * stride_vn + dims[None, :], mask=kv_read, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    col_keep = col_ok
    if HAS_PAD:
        col_keep &= tl.load(KeyPad + batch * M + cols, mask=col_ok, other=0) != 0
    if HAS_BIAS:
        bias = tl.load(KeyBias + batch * M + cols, mask=col_ok, other=0.0) * 1.4426950408889634
    grad_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), tl.float32)
    count = tl.load(QCount + key_tile)
    if REPAIR:
        count = tl.where(hit > 0, count, 0)
    for group in range(GROUPS):
        head = kv_head * GROUPS + group
        q_head = Q + batch * stride_qb + kv_in_batch * stride_qh + group * stride_qg
        grad_head = GradOut + batch * stride_gb + kv_in_batch * stride_gh + group * stride_gg
        for slot in range(count):
            query_tile = tl.load(QIndex + key_tile * q_width + slot)
            mask_id = tl.load(QMask + key_tile * q_width + slot)
            for sub in tl.static_range(BLOCK_M // SUB_M):
                row_in_tile = sub * SUB_M + tl.arange(0, SUB_M)
                rows = query_tile * BLOCK_M + row_in_tile
                row_ok = rows < N
                first_row = (query_tile * BLOCK_M).to(tl.int64)
                inside = row_ok[:, None] & dim_ok[None, :]
                q = tl.load(q_head + first_row * stride_qn + row_in_tile[:, None] * stride_qn
                            + dims[None, :], mask=inside, other=0.0)
                grad_out = tl.load(grad_head + first_row * stride_gn
                                   + row_in_tile[:, None] * stride_gn + dims[None, :],
                                   mask=inside, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    grad_out = grad_out.to(tl.float32)
                lse = tl.load(Lse + head * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + head * N + rows, mask=row_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                if HAS_BIAS:
                    s_t += bias[:, None]
                keep = col_keep[:, None] & row_ok[None, :]
                # Rows without any key have lse = -inf; they are masked everywhere here.
                p_t = tl.where(keep, tl.exp2(s_t - lse[None, :]), 0.0)
                if mask_id >= 0:  # applied where loaded, as in the forward kernel
                    bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                                   + row_in_tile[None, :] * BLOCK_N + col_in_tile[:, None])
                    p_t = tl.where(bits != 0, p_t, 0.0)
                grad_v = tl.dot(p_t.to(grad_out.dtype), grad_out, grad_v,
                                input_precision=DOT_PRECISION)
                grad_p_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
                grad_s_t = p_t * (grad_p_t - delta[None, :])
                grad_k = tl.dot(grad_s_t.to(q.dtype), q, grad_k, input_precision=DOT_PRECISION)
                if BIAS_GRAD:
                    grad_bias += tl.sum(grad_s_t, 1)
    tl.store(GradK + batch * stride_dkb + kv_in_batch * stride_dkh + first_col * stride_dkn
             + col_in_tile[:, None] * stride_dkn + dims[None, :],
             (grad_k * scale).to(GradK.dtype.element_ty), mask=kv_inside)
    tl.store(GradV + batch * stride_dvb + kv_in_batch * stride_dvh + first_col * stride_dvn
             + col_in_tile[:, None] * stride_dvn + dims[None, :],
             grad_v.to(GradV.dtype.element_ty), mask=kv_inside)
    if BIAS_GRAD:
        tl.store(GradBias + kv_head * M + cols, grad_bias, mask=col_ok)


@triton.jit(do_not_specialize=_SIZES)
def _grad_q_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, KvIndex, KvCount, KvMask, Masks, KeyPad, KeyBias,
    BadKeys, Repair,
    stride_qb, stride_qh, stride_qg, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gg, stride_gn,
    stride_dqb, stride_dqh, stride_dqg, stride_dqn,
    N, M, kv_width, qk_scale, scale,
    GROUPS, KV_HEADS, HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, REPAIR: tl.constexpr,
):
    """dQ of one query tile of one query head, over its layout's key tiles, SUB_N keys a step.

    REPAIR (a second launch after the first): only the query tiles flagged in `Repair` (per
    kv head and query tile) run, and rewrite their rows with keys holding inf or NaN
    (`BadKeys`) read as zeros (a row that sees one has a NaN lse and stays NaN; in the first
    launch, 0 * NaN reaches the whole tile). The others exit at once; the first launch keeps
    its registers.
    """
    tl.static_assert(BLOCK_N % SUB_N == 0)
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    group = head % GROUPS
    kv_head = head // GROUPS
    batch = kv_head // KV_HEADS
    kv_in_batch = kv_head % KV_HEADS
    row_in_tile = tl.arange(0, BLOCK_M)
    rows = tile * BLOCK_M + row_in_tile
    row_ok = rows < N
    if REPAIR:
        hit = tl.load(Repair + kv_head * tl.cdiv(N, BLOCK_M) + tile).to(tl.int32)
        row_ok = row_ok & (tl.zeros((BLOCK_M,), tl.int32) + hit > 0)  # widened: see dK/dV
    first_row = (tile * BLOCK_M).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    inside = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + batch * stride_qb + kv_in_batch * stride_qh + group * stride_qg
                + first_row * stride_qn + row_in_tile[:, None] * stride_qn + dims[None, :],
                mask=inside, other=0.0)
    grad_out = tl.load(GradOut + batch * stride_gb + kv_in_batch * stride_gh
                       + group * stride_gg + first_row * stride_gn
                       + row_in_tile[:, None] * stride_gn + dims[None, :],
                       mask=inside, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        grad_out = grad_out.to(tl.float32)
    lse = tl.load(Lse + head * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + head * N + rows, mask=row_ok, other=0.0)
    k_head = K + batch * stride_kb + kv_in_batch * stride_kh
    v_head = V + batch * stride_vb + kv_in_batch * stride_vh
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    count = tl.load(KvCount + tile)
    if REPAIR:
        count = tl.where(hit > 0, count, 0)
    for slot in range(count):
        key_tile = tl.load(KvIndex + tile * kv_width + slot)
        mask_id = tl.load(KvMask + tile * kv_width + slot)
        for sub in tl.static_range(BLOCK_N // SUB_N):
            col_in_tile = sub * SUB_N + tl.arange(0, SUB_N)
            cols = key_tile * BLOCK_N + col_in_tile
            col_ok = cols < M
            first_col = (key_tile * BLOCK_N).to(tl.int64)
            readable = col_ok
            if REPAIR:
                readable = col_ok & (tl.load(BadKeys + kv_head * M + cols, mask=col_ok,
                                             other=0) == 0)
            kv_inside = readable[:, None] & dim_ok[None, :]
            k = tl.load(k_head + first_col * stride_kn + col_in_tile[:, None] * stride_kn
                        + dims[None, :], mask=kv_inside, other=0.0)
            v = tl.load(v_head + first_col * stride_vn + col_in_tile[:, None] * stride_vn
                        + dims[None, :], mask=kv_inside, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            keep = row_ok[:, None] & col_ok[None, :]
            if HAS_BIAS:
                bias = tl.load(KeyBias + batch * M + cols, mask=col_ok, other=0.0)
                s += bias[None, :] * 1.4426950408889634
            if HAS_PAD:
                keep &= tl.load(KeyPad + batch * M + cols, mask=col_ok, other=0)[None, :] != 0
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            if mask_id >= 0:  # applied where loaded, as in the forward kernel
                bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                               + row_in_tile[:, None] * BLOCK_N + col_in_tile[None, :])
                p = tl.where(bits != 0, p, 0.0)
            grad_p = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
            grad_s = p * (grad_p - delta[:, None])
            grad_q = tl.dot(grad_s.to(k.dtype), k, grad_q, input_precision=DOT_PRECISION)
    tl.store(GradQ + batch * stride_dqb + kv_in_batch * stride_dqh + group * stride_dqg
             + first_row * stride_dqn + row_in_tile[:, None] * stride_dqn + dims[None, :],
             (grad_q * scale).to(GradQ.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M"])
def _bad_rows_kernel(X, Bad, stride_xb, stride_xh, stride_xn, M, HEADS,
                     HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Bad[h, r] = 1 when row r of head h of X holds inf or NaN, else 0."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < M) & (dims[None, :] < HEAD_DIM)
    x = tl.load(X + (head // HEADS) * stride_xb + (head % HEADS) * stride_xh
                + rows[:, None].to(tl.int64) * stride_xn + dims[None, :], mask=inside,
                other=0.0).to(tl.float32)
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int8), 1)
    tl.store(Bad + head * M + rows, bad, mask=rows < M)


def bad_keys(k: Tensor, v: Tensor, block_n: int) -> tuple[Tensor, Tensor]:
    """Keys whose k or v row holds inf or NaN, found on the device in one pass each (no host
    synchronisation): per key (B * Hkv, M) and per key tile (B * Hkv, ceil(M / block_n)),
    uint8."""
    batch, heads, m, dim = k.shape
    flags = []
    for x in (k, v):
        bad = torch.empty(batch * heads, m, dtype=torch.uint8, device=x.device)
        launch(_bad_rows_kernel, (triton.cdiv(m, 64), batch * heads), x, bad,
               *_strides(x)[:3], m, heads, HEAD_DIM=dim, BLOCK_R=64, BLOCK_D=padded_dim(dim))
        flags.append(bad)
    keys = flags[0] | flags[1]
    tiles = torch.nn.functional.pad(keys, (0, -m % block_n)).view(batch * heads, -1, block_n)
    return keys, tiles.amax(2)


def _visiting(flags: Tensor, index: Tensor, count: Tensor) -> Tensor:
    """(H, T) uint8: whether tile t lists a tile flagged in `flags` (H, T'); index (T, W)
    lists the tiles t visits, its first count[t] entries."""
    listed = torch.arange(index.shape[1], device=index.device) < count[:, None]
    return (flags[:, index.long()] * listed).amax(2)


# -- configs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings; a layout must be built at (block_m, block_n).

    Warps and stages of the forward kernel; of the dK/dV kernel, which steps through a query
    tile `sub_m` rows at a time; and of the dQ kernel, which steps through a key tile `sub_n`
    keys at a time.
    """

    block_m: int
    block_n: int
    fwd_warps: int
    fwd_stages: int
    sub_m: int
    kv_warps: int
    kv_stages: int
    sub_n: int
    q_warps: int
    q_stages: int


INTERPRETER_CONFIG = TileConfig(32, 32, 1, 1, 16, 1, 1, 16, 1, 1)
"""Small tiles with stepped backward kernels: few programs for the CPU tests, stepping tested."""

# (family, precision kind) -> padded head dim -> TileConfig(block_m, block_n, fwd_warps,
# fwd_stages, sub_m, kv_warps, kv_stages, sub_n, q_warps, q_stages). Chosen by
# `python -m attn_zoo.kernels.compile_check --tune` (sm_80 and sm_90; sm_100 takes sm_90's):
# the first tiles, warps, stages and steps whose kernels compile natively without register
# spills (and within 64 bytes with padding and key bias), within the family's shared memory.
# Every entry is compiled by the check; results/compile/compile_check.md has the numbers.
_T = TileConfig
CONFIGS: dict[tuple[int, str], dict[int, TileConfig]] = {
    (80, "16bit"): {16: _T(128, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    32: _T(128, 64, 4, 3, 32, 4, 1, 64, 4, 1),
                    64: _T(128, 64, 8, 3, 16, 8, 1, 64, 8, 1),
                    128: _T(128, 32, 8, 3, 32, 8, 2, 32, 8, 1)},
    (80, "tf32"): {16: _T(64, 64, 4, 3, 64, 8, 1, 64, 4, 1),
                   32: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                   64: _T(64, 32, 4, 3, 64, 4, 1, 32, 4, 1),
                   128: _T(64, 32, 8, 2, 16, 8, 2, 32, 8, 1)},
    (80, "ieee"): {16: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                   32: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                   64: _T(32, 32, 8, 3, 32, 4, 1, 32, 4, 1),
                   128: _T(32, 16, 8, 3, 32, 8, 1, 16, 8, 1)},
    (90, "16bit"): {16: _T(128, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    32: _T(128, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    64: _T(128, 64, 4, 2, 32, 4, 1, 64, 4, 1),
                    128: _T(128, 32, 8, 3, 32, 8, 2, 32, 8, 1)},
    (90, "tf32"): {16: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                   32: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                   64: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                   128: _T(64, 32, 8, 3, 64, 8, 1, 32, 8, 1)},
    (90, "ieee"): {16: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                   32: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                   64: _T(32, 16, 4, 3, 32, 8, 1, 16, 4, 1),
                   128: _T(32, 16, 8, 3, 32, 8, 1, 16, 8, 1)},
    (100, "16bit"): {16: _T(128, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                     32: _T(128, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                     64: _T(128, 64, 4, 2, 32, 4, 1, 64, 4, 1),
                     128: _T(128, 32, 8, 3, 32, 8, 2, 32, 8, 1)},
    (100, "tf32"): {16: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    32: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    64: _T(64, 64, 4, 3, 64, 4, 1, 64, 4, 1),
                    128: _T(64, 32, 8, 3, 64, 8, 1, 32, 8, 1)},
    (100, "ieee"): {16: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                    32: _T(32, 32, 4, 3, 32, 4, 1, 32, 4, 1),
                    64: _T(32, 16, 4, 3, 32, 8, 1, 16, 4, 1),
                    128: _T(32, 16, 8, 3, 32, 8, 1, 16, 8, 1)},
}


def interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run in Triton's interpreter (TRITON_INTERPRET=1)."""
    return target_arch(device) is None


def tile_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> TileConfig:
    """Tiles and launch settings for inputs of `dtype` and `head_dim` on `device`.

    Natively: the checked `CONFIGS` entry of the device's architecture family, precision and
    padded head dim (a ValueError for an architecture without one); in the interpreter:
    `INTERPRETER_CONFIG`.
    """
    arch = target_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    return CONFIGS[arch_family(arch), precision(dtype)][padded_dim(head_dim)]


def _options(config: TileConfig, kernel: str, device: torch.device) -> dict:
    """Warps and stages of `kernel` ("fwd", "kv" or "q") natively; nothing in the interpreter."""
    if interpreted(device):
        return {}
    return {"num_warps": getattr(config, f"{kernel}_warps"),
            "num_stages": getattr(config, f"{kernel}_stages")}


def _config_for(q: Tensor, block_m: int, block_n: int) -> TileConfig:
    """The device's config for q, at the layout's tile sizes."""
    config = tile_config(q.dtype, q.shape[-1], q.device)
    return replace(config, block_m=block_m, block_n=block_n, sub_m=min(config.sub_m, block_m),
                   sub_n=min(config.sub_n, block_n))


def _strides(x: Tensor) -> tuple[int, ...]:
    """Strides of every dim but the last, which the kernels read contiguously."""
    return x.stride()[:-1]


# -- launchers ------------------------------------------------------------------------------


def _flags(key_padding_mask: Tensor | None, key_bias: Tensor | None, q: Tensor):
    """Kernel stand-ins for absent optional tensors (never read: the flag is off)."""
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty(
        1, dtype=torch.uint8)
    bias = key_bias if key_bias is not None else q.new_empty(1, dtype=torch.float32)
    return pad, bias


def _precision_args(q: Tensor) -> dict:
    """DOT_PRECISION for float32 tiles; UPCAST: see the kernels' preamble."""
    upcast = q.dtype == torch.bfloat16 and interpreted(q.device)
    dot = "ieee" if upcast or precision(q.dtype) == "ieee" else "tf32"
    return {"DOT_PRECISION": dot, "UPCAST": upcast}


def _forward(q, k, v, kv_index, kv_count, kv_mask, masks, key_padding_mask, key_bias,
             scale, block_m, block_n):
    batch, kv_heads, groups, n, dim = q.shape
    m = k.shape[2]
    config = _config_for(q, block_m, block_n)
    out = torch.empty_like(q)
    lse = torch.empty(batch, kv_heads, groups, n, dtype=torch.float32, device=q.device)
    pad, bias = _flags(key_padding_mask, key_bias, q)
    grid = (kv_count.shape[0], batch * kv_heads * groups)
    bad, bad_tiles = bad_keys(k, v, block_n)
    args = (q, k, v, out, lse, kv_index, kv_count, kv_mask, masks, pad, bias, bad, bad_tiles,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            n, m, kv_index.shape[1], scale * LOG2E)
    constants = dict(HEAD_DIM=dim, GROUPS=groups, KV_HEADS=kv_heads,
                     HAS_PAD=key_padding_mask is not None, HAS_BIAS=key_bias is not None,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_dim(dim),
                     **_precision_args(q))
    options = _options(config, "fwd", q.device)
    launch(_forward_kernel, grid, *args, REPAIR=False, **constants, **options)
    launch(_forward_kernel, grid, *args, REPAIR=True, **constants,
           **_repair_options(options, block_m * block_n))
    return out, lse


def _repair_options(options: dict, tile_pairs: int) -> dict:
    """Warps and stages of a repair launch (tiles that read a key holding inf or NaN are
    rewritten): 8 warps and, for tiles of 1024 pairs or more, one stage, where the compile
    check finds the repair launches without register spills; nothing in the interpreter."""
    if not options:
        return options
    return {"num_warps": 8,
            "num_stages": 1 if tile_pairs >= 1024 else options["num_stages"]}


def _backward(grad_out, grad_lse, q, k, v, out, lse, layout_tensors, key_padding_mask,
              key_bias, scale, block_m, block_n, bias_grad):
    kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks = layout_tensors
    batch, kv_heads, groups, n, dim = q.shape
    m = k.shape[2]
    config = _config_for(q, block_m, block_n)
    width = padded_dim(dim)
    grad_lse = grad_lse.contiguous()
    delta = torch.empty_like(lse)
    launch(_delta_kernel, (triton.cdiv(n, block_m), batch * kv_heads * groups),
           out, grad_out, grad_lse, delta, *_strides(out), *_strides(grad_out),
           n, HEAD_DIM=dim, GROUPS=groups, KV_HEADS=kv_heads, BLOCK_M=block_m,
           BLOCK_D=width)
    pad, bias = _flags(key_padding_mask, key_bias, q)
    grad_q = torch.empty_like(q)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    # Each kv head writes its own share of the bias gradient: summed below, no atomics.
    grad_bias = (torch.empty(batch, kv_heads, m, dtype=torch.float32, device=q.device)
                 if bias_grad else q.new_empty(1, dtype=torch.float32))
    common = dict(HEAD_DIM=dim, GROUPS=groups, KV_HEADS=kv_heads,
                  HAS_PAD=key_padding_mask is not None, HAS_BIAS=key_bias is not None,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=width, **_precision_args(q))
    inputs = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    # A query tile that visits a key holding inf or NaN has rows with NaN lse and delta: its
    # dQ, and dK/dV of every key tile it visits, are rewritten by a repair launch (no host
    # synchronisation; for finite inputs an empty launch each).
    bad, bad_tiles = bad_keys(k, v, block_n)
    repair_q = _visiting(bad_tiles, kv_index, kv_count)
    repair_kv = _visiting(repair_q, q_index, q_count)
    kv_args = (q, k, v, grad_out, lse, delta, grad_k, grad_v, grad_bias, q_index, q_count,
               q_mask, masks, pad, bias, bad, repair_kv, *inputs, *_strides(grad_k),
               *_strides(grad_v), n, m, q_index.shape[1], scale * LOG2E, scale)
    q_args = (q, k, v, grad_out, lse, delta, grad_q, kv_index, kv_count, kv_mask, masks, pad,
              bias, bad, repair_q, *inputs, *_strides(grad_q), n, m, kv_index.shape[1],
              scale * LOG2E, scale)
    for kernel, grid, args, options, constants in (
            (_grad_kv_kernel, (q_count.shape[0], batch * kv_heads), kv_args,
             _options(config, "kv", q.device), dict(BIAS_GRAD=bias_grad, SUB_M=config.sub_m)),
            (_grad_q_kernel, (kv_count.shape[0], batch * kv_heads * groups), q_args,
             _options(config, "q", q.device), dict(SUB_N=config.sub_n))):
        launch(kernel, grid, *args, REPAIR=False, **constants, **common, **options)
        if kernel is _grad_kv_kernel:
            # A row that sees a flagged key has a NaN lse and delta: its probabilities carry
            # its NaN to the keys it sees, its delta (read as 0) to no other key. The launch
            # keeps the first one's warps and stages: without spills there.
            args = (*args[:5], torch.nan_to_num(delta, nan=0.0), *args[6:])
            launch(kernel, grid, *args, REPAIR=True, **constants, **common, **options)
        else:
            launch(kernel, grid, *args, REPAIR=True, **constants, **common,
                   **_repair_options(options, block_m * block_n))
    grad_bias = grad_bias.sum(1) if bias_grad else grad_bias.new_empty(0)
    return grad_q, grad_k, grad_v, grad_bias


# -- custom ops and autograd ----------------------------------------------------------------


@torch.library.custom_op("attn_zoo::block_sparse_fwd", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor,
                kv_mask: Tensor, q_index: Tensor, q_count: Tensor, q_mask: Tensor,
                masks: Tensor, key_padding_mask: Tensor | None, key_bias: Tensor | None,
                scale: float, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, kv_index, kv_count, kv_mask, masks, key_padding_mask, key_bias,
                    scale, block_m, block_n)


@_forward_op.register_fake
def _(q, k, v, kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks,
      key_padding_mask, key_bias, scale, block_m, block_n):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attn_zoo::block_sparse_bwd", mutates_args=())
def _backward_op(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 out: Tensor, lse: Tensor, kv_index: Tensor, kv_count: Tensor, kv_mask: Tensor,
                 q_index: Tensor, q_count: Tensor, q_mask: Tensor, masks: Tensor,
                 key_padding_mask: Tensor | None, key_bias: Tensor | None, scale: float,
                 block_m: int, block_n: int,
                 bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v, grad_key_bias (B, M) float32, or empty when not asked)."""
    layout_tensors = (kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks)
    return _backward(inner_contiguous(grad_out), grad_lse, q, k, v, out, lse,
                     layout_tensors, key_padding_mask, key_bias, scale, block_m, block_n,
                     bias_grad)


@_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, kv_index, kv_count, kv_mask, q_index, q_count,
      q_mask, masks, key_padding_mask, key_bias, scale, block_m, block_n, bias_grad):
    grad_bias = (q.new_empty(k.shape[0], k.shape[2], dtype=torch.float32) if bias_grad
                 else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_bias


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks, key_padding_mask,
     key_bias, scale, block_m, block_n) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_index, kv_count, kv_mask, q_index, q_count,
                          q_mask, masks, key_padding_mask, key_bias)
    ctx.scale, ctx.block_m, ctx.block_n = scale, block_m, block_n
    ctx.bias_grad = key_bias is not None and ctx.needs_input_grad[11]


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *layout_tensors, key_padding_mask, key_bias = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_q, grad_k, grad_v, grad_bias = _backward_op(
        grad_out, grad_lse, q, k, v, out, lse, *layout_tensors, key_padding_mask, key_bias,
        ctx.scale, ctx.block_m, ctx.block_n, ctx.bias_grad)
    return (grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None,
            grad_bias if ctx.bias_grad else None, None, None, None)


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def layout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    key_padding_mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the pairs `layout` visits (full tiles and set mask bits).

    q: (B, Hkv, G, N, D), G query heads per kv head; k, v: (B, Hkv, M, D); one dtype among
    float32, bfloat16, float16; D a multiple of 8 up to 128; any strides with a contiguous
    last dim are read in place. layout: built for (N, M) at this device's
    `tile_config(q.dtype, D, q.device)` tiles (`cached_layout`).
    key_padding_mask: (B, M) bool, True = a real key. key_bias: float broadcastable to (B, M),
    finite, added to the score of key j for every query and head: s_ij = scale * q_i.k_j +
    key_bias[b, j]; differentiable.
    Returns out (B, Hkv, G, N, D) in q's dtype and lse (B, Hkv, G, N) float32; a row with no
    allowed key has out = 0 and lse = -inf (finite gradients). The lse is differentiable, so
    partial attentions merge exactly (`attn_zoo.blocksparse.merge_partial_attentions`).
    """
    _check(q, k, v, layout, key_padding_mask)
    batch, m = k.shape[0], k.shape[2]
    if key_bias is not None:
        if not isinstance(key_bias, Tensor) or not key_bias.is_floating_point():
            raise TypeError(f"key_bias must be a float tensor, got {type(key_bias).__name__}")
        key_bias = key_bias.to(torch.float32).expand(batch, m).contiguous()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    q, k, v = inner_contiguous(q), inner_contiguous(k), inner_contiguous(v)
    out, lse = _forward_op(q, k, v, *layout.tensors(),
                           key_padding_mask, key_bias, float(scale), layout.block_m,
                           layout.block_n)
    return out, lse


def _check(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout,
           key_padding_mask: Tensor | None) -> None:
    if q.dim() != 5 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, Hkv, G, N, D) and k, v (B, Hkv, M, D), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, kv_heads, _, n, dim = q.shape
    if k.shape[:2] != (batch, kv_heads) or k.shape[3] != dim:
        raise ValueError(f"k must have shape (B, Hkv, M, D) = ({batch}, {kv_heads}, M, {dim}), "
                         f"got {tuple(k.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if dim % 8 or not 8 <= dim <= 128:
        raise ValueError(f"head_dim must be a multiple of 8 in 8..128, got {dim}")
    for label, size in (("block_m", layout.block_m), ("block_n", layout.block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"layout {label} must be a power of two >= 16, got {size}")
    if (layout.n, layout.m) != (n, k.shape[2]):
        raise ValueError(f"layout is for (N, M) = ({layout.n}, {layout.m}), got "
                         f"({n}, {k.shape[2]})")
    if layout.masks.device != q.device:
        raise ValueError(f"layout must be on q's device {q.device}, got {layout.masks.device}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (batch, k.shape[2])):
        raise ValueError(f"key_padding_mask must be (B, M) = ({batch}, {k.shape[2]}) bool, got "
                         f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")
