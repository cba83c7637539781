"""Block-sparse flash attention over a `BlockLayout`: forward and backward Triton kernels.

FlashAttention-2 style: a program owns one query tile of one query head and runs an online
softmax over the key tiles its layout lists; full tiles need no mask, partial tiles read their
precomputed mask. The backward pass recomputes the probabilities from the saved log-sum-exp:
a preprocess kernel forms delta_i = rowsum(dO_i * O_i) - dlse_i, a dK/dV kernel walks the
transposed layout (one program per key tile and kv head, looping over that head's G query
heads, so no atomics), and a dQ kernel walks the forward layout.

Queries are grouped, (B, Hkv, G, N, D): k and v are read once per kv head, never repeated.
Inputs float32, bfloat16 or float16; scores, softmax and accumulators are float32 (float32
matmuls in IEEE precision, no TF32). Head dims up to 128 (padded to a power of two in-kernel).

`block_sparse_attention` is the autograd-aware entry point; it runs through the custom ops
`attn_zoo::block_sparse_fwd` / `attn_zoo::block_sparse_bwd`, so `torch.compile` traces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
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


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, KvIndex, KvCount, KvMask, Masks, KeyPad, KeyBias,
    N, M, kv_width, qk_scale,
    HEAD_DIM: tl.constexpr, GROUPS: tl.constexpr, KV_HEADS: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax of one query tile of one query head over its layout's key tiles.

    Scores run in log2 units (qk_scale = scale * log2(e)), so exp2 replaces exp.
    """
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)  # (b * Hkv + h) * G + g
    kv_head = head // GROUPS
    batch = kv_head // KV_HEADS
    row_in_tile = tl.arange(0, BLOCK_M)
    col_in_tile = tl.arange(0, BLOCK_N)
    rows = tile * BLOCK_M + row_in_tile
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_ok = rows < N
    q_offsets = head * N * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_base = kv_head * M * HEAD_DIM
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    count = tl.load(KvCount + tile)
    for slot in range(count):
        key_tile = tl.load(KvIndex + tile * kv_width + slot)
        mask_id = tl.load(KvMask + tile * kv_width + slot)
        cols = key_tile * BLOCK_N + col_in_tile
        col_ok = cols < M
        k = tl.load(K + kv_base + cols[None, :] * HEAD_DIM + dims[:, None],
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(V + kv_base + cols[:, None] * HEAD_DIM + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            bias = tl.load(KeyBias + batch * M + cols, mask=col_ok, other=0.0)
            s += bias[None, :] * 1.4426950408889634
        if HAS_PAD:
            keep &= tl.load(KeyPad + batch * M + cols, mask=col_ok, other=0)[None, :] != 0
        if mask_id >= 0:
            bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                           + row_in_tile[:, None] * BLOCK_N + col_in_tile[None, :])
            keep &= bits != 0
        s = tl.where(keep, s, float("-inf"))
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
    tl.store(Out + q_offsets, (acc / safe_sum[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + head * N + rows, lse, mask=row_ok)


@triton.jit
def _delta_kernel(Out, GradOut, GradLse, Delta, N, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) - dlse_i (d lse_i / d s_ij = p_ij)."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < N) & (dims[None, :] < HEAD_DIM)
    offsets = head * N * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    out = tl.load(Out + offsets, mask=inside, other=0.0).to(tl.float32)
    grad_out = tl.load(GradOut + offsets, mask=inside, other=0.0).to(tl.float32)
    grad_lse = tl.load(GradLse + head * N + rows, mask=rows < N, other=0.0)
    tl.store(Delta + head * N + rows, tl.sum(out * grad_out, 1) - grad_lse, mask=rows < N)


@triton.jit
def _grad_kv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, GradBias, QIndex, QCount, QMask, Masks,
    KeyPad, KeyBias, N, M, q_width, qk_scale, scale,
    HEAD_DIM: tl.constexpr, GROUPS: tl.constexpr, KV_HEADS: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV (and this kv head's share of d key_bias) of one key tile, from the query tiles
    of its G query heads that visit it; transposed scores (BLOCK_N, SUB_M) per step."""
    tl.static_assert(BLOCK_M % SUB_M == 0)
    key_tile = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    batch = kv_head // KV_HEADS
    col_in_tile = tl.arange(0, BLOCK_N)
    cols = key_tile * BLOCK_N + col_in_tile
    col_ok = cols < M
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kv_offsets = kv_head * M * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    kv_inside = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + kv_offsets, mask=kv_inside, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_inside, other=0.0)
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
    for group in range(GROUPS):
        head = kv_head * GROUPS + group
        for slot in range(count):
            query_tile = tl.load(QIndex + key_tile * q_width + slot)
            mask_id = tl.load(QMask + key_tile * q_width + slot)
            for sub in tl.static_range(BLOCK_M // SUB_M):
                row_in_tile = sub * SUB_M + tl.arange(0, SUB_M)
                rows = query_tile * BLOCK_M + row_in_tile
                row_ok = rows < N
                offsets = head * N * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
                inside = row_ok[:, None] & dim_ok[None, :]
                q = tl.load(Q + offsets, mask=inside, other=0.0)
                grad_out = tl.load(GradOut + offsets, mask=inside, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    grad_out = grad_out.to(tl.float32)
                lse = tl.load(Lse + head * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + head * N + rows, mask=row_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                if HAS_BIAS:
                    s_t += bias[:, None]
                keep = col_keep[:, None] & row_ok[None, :]
                if mask_id >= 0:
                    bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                                   + row_in_tile[None, :] * BLOCK_N + col_in_tile[:, None])
                    keep &= bits != 0
                # Rows without any key have lse = -inf; they are masked everywhere here.
                p_t = tl.where(keep, tl.exp2(s_t - lse[None, :]), 0.0)
                grad_v = tl.dot(p_t.to(grad_out.dtype), grad_out, grad_v,
                                input_precision=DOT_PRECISION)
                grad_p_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
                grad_s_t = p_t * (grad_p_t - delta[None, :])
                grad_k = tl.dot(grad_s_t.to(q.dtype), q, grad_k, input_precision=DOT_PRECISION)
                if BIAS_GRAD:
                    grad_bias += tl.sum(grad_s_t, 1)
    tl.store(GradK + kv_offsets, (grad_k * scale).to(GradK.dtype.element_ty), mask=kv_inside)
    tl.store(GradV + kv_offsets, grad_v.to(GradV.dtype.element_ty), mask=kv_inside)
    if BIAS_GRAD:
        tl.store(GradBias + kv_head * M + cols, grad_bias, mask=col_ok)


@triton.jit
def _grad_q_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, KvIndex, KvCount, KvMask, Masks, KeyPad, KeyBias,
    N, M, kv_width, qk_scale, scale,
    HEAD_DIM: tl.constexpr, GROUPS: tl.constexpr, KV_HEADS: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dQ of one query tile of one query head, over its layout's key tiles."""
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    kv_head = head // GROUPS
    batch = kv_head // KV_HEADS
    row_in_tile = tl.arange(0, BLOCK_M)
    col_in_tile = tl.arange(0, BLOCK_N)
    rows = tile * BLOCK_M + row_in_tile
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    offsets = head * N * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    inside = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + offsets, mask=inside, other=0.0)
    grad_out = tl.load(GradOut + offsets, mask=inside, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        grad_out = grad_out.to(tl.float32)
    lse = tl.load(Lse + head * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + head * N + rows, mask=row_ok, other=0.0)
    kv_base = kv_head * M * HEAD_DIM
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    count = tl.load(KvCount + tile)
    for slot in range(count):
        key_tile = tl.load(KvIndex + tile * kv_width + slot)
        mask_id = tl.load(KvMask + tile * kv_width + slot)
        cols = key_tile * BLOCK_N + col_in_tile
        col_ok = cols < M
        kv_inside = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=kv_inside,
                    other=0.0)
        v = tl.load(V + kv_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=kv_inside,
                    other=0.0)
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
        if mask_id >= 0:
            bits = tl.load(Masks + mask_id.to(tl.int64) * (BLOCK_M * BLOCK_N)
                           + row_in_tile[:, None] * BLOCK_N + col_in_tile[None, :])
            keep &= bits != 0
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        grad_p = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        grad_s = p * (grad_p - delta[:, None])
        grad_q = tl.dot(grad_s.to(k.dtype), k, grad_q, input_precision=DOT_PRECISION)
    tl.store(GradQ + offsets, (grad_q * scale).to(GradQ.dtype.element_ty), mask=inside)


# -- configs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings; a layout must be built at (block_m, block_n)."""

    block_m: int
    block_n: int
    sub_m: int  # query rows per step of the dK/dV kernel
    num_warps: int
    num_stages: int


def interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run in Triton's interpreter (TRITON_INTERPRET=1)."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def tile_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> TileConfig:
    """Tiles for inputs of `dtype` and `head_dim` on `device`.

    GPU, 16-bit: 128 x 64 tiles (FlashAttention-2's forward choice: a 128-row query tile
    reuses each key tile twice as long as a 64-row one), 8 warps and 2 stages at head dims
    above 64 (registers and shared memory), else 4 warps and 3 stages; the dK/dV kernel steps
    through a query tile 64 rows at a time to bound its registers. float32 tiles take twice
    the bytes: 64 x 64 (64 x 32 above head dim 64). The interpreter gets 32 x 32 tiles with
    16-row dK/dV steps: few programs for the CPU tests, and the stepping is exercised.
    """
    if interpreted(device):
        return TileConfig(32, 32, 16, 1, 1)
    wide = _padded_dim(head_dim) > 64
    if dtype == torch.float32:
        return TileConfig(64, 32 if wide else 64, 32, 4, 2)
    return TileConfig(128, 64, 64, 8 if wide else 4, 2 if wide else 3)


def _padded_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _launch_options(config: TileConfig, device: torch.device) -> dict:
    if interpreted(device):
        return {}
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def _config_for(q: Tensor, block_m: int, block_n: int) -> TileConfig:
    """The device's config for q, at the layout's tile sizes."""
    config = tile_config(q.dtype, q.shape[-1], q.device)
    return TileConfig(block_m, block_n, min(config.sub_m, block_m), config.num_warps,
                      config.num_stages)


# -- launchers ------------------------------------------------------------------------------


def _flags(key_padding_mask: Tensor | None, key_bias: Tensor | None, q: Tensor):
    """Kernel stand-ins for absent optional tensors (never read: the flag is off)."""
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty(
        1, dtype=torch.uint8)
    bias = key_bias if key_bias is not None else q.new_empty(1, dtype=torch.float32)
    return pad, bias


def _forward(q, k, v, kv_index, kv_count, kv_mask, masks, key_padding_mask, key_bias,
             scale, block_m, block_n):
    batch, kv_heads, groups, n, dim = q.shape
    m = k.shape[2]
    config = _config_for(q, block_m, block_n)
    out = torch.empty_like(q)
    lse = torch.empty(batch, kv_heads, groups, n, dtype=torch.float32, device=q.device)
    pad, bias = _flags(key_padding_mask, key_bias, q)
    grid = (kv_count.shape[0], batch * kv_heads * groups)
    _forward_kernel[grid](
        q, k, v, out, lse, kv_index, kv_count, kv_mask, masks, pad, bias,
        n, m, kv_index.shape[1], scale * LOG2E,
        HEAD_DIM=dim, GROUPS=groups, KV_HEADS=kv_heads,
        HAS_PAD=key_padding_mask is not None, HAS_BIAS=key_bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_padded_dim(dim),
        **_precision(q), **_launch_options(config, q.device),
    )
    return out, lse


def _precision(q: Tensor) -> dict:
    """float32 matmuls in IEEE precision (no TF32); UPCAST: see the kernels' preamble."""
    upcast = q.dtype == torch.bfloat16 and interpreted(q.device)
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    return {"DOT_PRECISION": precision, "UPCAST": upcast}


def _backward(grad_out, grad_lse, q, k, v, out, lse, layout_tensors, key_padding_mask,
              key_bias, scale, block_m, block_n, bias_grad):
    kv_index, kv_count, kv_mask, q_index, q_count, q_mask, masks = layout_tensors
    batch, kv_heads, groups, n, dim = q.shape
    m = k.shape[2]
    config = _config_for(q, block_m, block_n)
    options = _launch_options(config, q.device)
    padded_dim = _padded_dim(dim)
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(n, block_m), batch * kv_heads * groups)](
        out, grad_out, grad_lse, delta, n, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_D=padded_dim,
    )
    pad, bias = _flags(key_padding_mask, key_bias, q)
    grad_q = torch.empty_like(q)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    # Each kv head writes its own share of the bias gradient: summed below, no atomics.
    grad_bias = (torch.empty(batch, kv_heads, m, dtype=torch.float32, device=q.device)
                 if bias_grad else q.new_empty(1, dtype=torch.float32))
    common = dict(HEAD_DIM=dim, GROUPS=groups, KV_HEADS=kv_heads,
                  HAS_PAD=key_padding_mask is not None, HAS_BIAS=key_bias is not None,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_dim,
                  **_precision(q), **options)
    _grad_kv_kernel[(q_count.shape[0], batch * kv_heads)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, grad_bias, q_index, q_count, q_mask,
        masks, pad, bias, n, m, q_index.shape[1], scale * LOG2E, scale,
        BIAS_GRAD=bias_grad, SUB_M=config.sub_m, **common,
    )
    _grad_q_kernel[(kv_count.shape[0], batch * kv_heads * groups)](
        q, k, v, grad_out, lse, delta, grad_q, kv_index, kv_count, kv_mask, masks, pad, bias,
        n, m, kv_index.shape[1], scale * LOG2E, scale, **common,
    )
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
    return _backward(grad_out.contiguous(), grad_lse.contiguous(), q, k, v, out, lse,
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


def block_sparse_attention(
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
    float32, bfloat16, float16; D a multiple of 8 up to 128. layout: built for (N, M) at
    this device's `tile_config(q.dtype, D, q.device)` tiles (`cached_layout`).
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
    out, lse = _forward_op(q.contiguous(), k.contiguous(), v.contiguous(), *layout.tensors(),
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
