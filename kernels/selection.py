"""Selection attention: every query attends to the keys of the units its index row lists.

Unit u covers key positions `u * unit .. u * unit + unit - 1` (those < M); each query row i of
selection head h lists S units (`index[b, h, i]`, distinct, -1 = an empty slot). Causal: key j
only when `j <= i + M - N`; padded keys never. A row with no allowed key has out 0 and
lse -inf.

All query heads sharing one selection attend together, as NSA's kernel does: one program per
(batch, selection head, query position) holds the G query heads of that selection as the rows
of one tile (padded to at least 16 rows for `tl.dot`) and runs an online softmax over the
row's selected keys, so every key it loads serves G queries. Units of at least 16 keys are
read as contiguous blocks (BLOCK_N keys of one unit per step, units and their causal tails
skipped when empty); smaller units (unit 1: top-k token selection) are gathered, BLOCK_N
listed positions per step (position = index[s] * unit + offset).

Softmax and accumulation run in float32; float32 matmuls in IEEE precision, or on TF32 tensor
cores when `torch.set_float32_matmul_precision` allows it (as `block_sparse`). The backward
pass recomputes the probabilities from the saved log-sum-exp: torch forms
delta = rowsum(dO * O) - dlse, then one kernel over the forward's programs writes dq of its
rows and adds dk and dv of the keys it read into float32 buffers with atomic adds (a key is
shared by many queries), cast back to the inputs' dtype. Head dims multiples of 8 up to 128,
padded to a power of two in-kernel. Block sizes, warps and stages come from `CONFIGS`, each
entry natively compile-checked.

`selection_attention` runs through the custom ops `attn_zoo::selection_fwd` /
`attn_zoo::selection_bwd`, so `torch.compile` traces it.
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

from attn_zoo.selection import check_selection

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATHER_BELOW = 16
"""Units smaller than this are gathered position by position; larger ones read as blocks."""

# -- helpers ----------------------------------------------------------------------------------
# Few, coarse helpers: the interpreter (the CPU test path) pays for every device-function call.
#
# UPCAST: Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits, so there
# bfloat16 tiles are widened to float32 as they are loaded (products of bfloat16 values are
# exact in float32). Compiled kernels never set it.


@triton.jit
def _program(Q, K, V, Index, KeyPad, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
             stride_vb, stride_vh, stride_ib, stride_ih, stride_in, shift, N, M, HEADS,
             KV_GROUP, GROUPS):
    """This program's query position i (int64), (batch * HEADS + head), its q rows' base, the
    kv head's k and v, its index row, its padding row, the last key position it may see, and
    the row offset of its (batch, head, g = 0) in results of shape (B, H, G, N)."""
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // HEADS
    head = bh % HEADS
    kv = head // KV_GROUP
    limit = tl.minimum(M - 1, i + shift)  # shift: M - N causal, M otherwise
    return (i, bh, Q + batch * stride_qb + head * stride_qh + i * stride_qn,
            K + batch * stride_kb + kv * stride_kh, V + batch * stride_vb + kv * stride_vh,
            Index + batch * stride_ib + head * stride_ih + i * stride_in, KeyPad + batch * M,
            limit, bh * GROUPS * N + i)


@triton.jit
def _keys(K, V, KeyPad, pos, ok, d, stride_kn, stride_vn, HEAD_DIM: tl.constexpr,
          HAS_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """k and v (BLOCK_N, BLOCK_D) at key positions `pos`, zero where not `ok`, and `ok` less
    the padded keys."""
    if HAS_PAD:
        ok = ok & (tl.load(KeyPad + pos, mask=ok, other=0) != 0)
    rows = pos.to(tl.int64)[:, None]
    mask = ok[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + rows * stride_kn + d[None, :], mask=mask, other=0.0)
    v = tl.load(V + rows * stride_vn + d[None, :], mask=mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v, ok


@triton.jit
def _gathered(Index, c, lanes, unit, S, limit):
    """Positions (BLOCK_N,) of the listed entries c .. c + BLOCK_N - 1 (entry t: offset
    t % unit of slot t // unit), and which of them are keys at or before `limit`."""
    t = c + lanes
    inside = t < S * unit
    slot = t // unit
    u = tl.load(Index + slot, mask=inside, other=-1)
    pos = u * unit + (t - slot * unit)
    return pos, inside & (u >= 0) & (pos <= limit)


# Sizes are not specialized on: one compiled kernel serves every length and head count. The
# unit is (unit 1 folds the gather's arithmetic away), and so are strides, for aligned loads.
_SIZES = ["N", "M", "S", "shift", "HEADS", "KV_GROUP", "GROUPS"]


# -- forward ----------------------------------------------------------------------------------


@triton.jit
def _fwd_step(q, K, V, KeyPad, pos, ok, row_ok, d, m_i, l_i, acc, stride_kn, stride_vn,
              qk_scale, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step of the rows over the keys at `pos` (where `ok`)."""
    k, v, ok = _keys(K, V, KeyPad, pos, ok, d, stride_kn, stride_vn, HEAD_DIM, HAS_PAD, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(row_ok[:, None] & ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed so far keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=_SIZES)
def _selection_fwd_kernel(
    Q, K, V, Index, KeyPad, Out, Lse,
    stride_qb, stride_qh, stride_qg, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_og, stride_on,
    stride_ib, stride_ih, stride_in,
    qk_scale, unit, N, M, S, shift, HEADS, KV_GROUP, GROUPS,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax of the G query heads of one (batch, selection head, position) over the
    keys of the units their index row lists. Scores in log2 units (qk_scale = scale * log2 e).
    """
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    i, bh, Q, K, V, Index, KeyPad, limit, row0 = _program(
        Q, K, V, Index, KeyPad, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
        stride_vb, stride_vh, stride_ib, stride_ih, stride_in, shift, N, M, HEADS, KV_GROUP,
        GROUPS)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_N)
    row_ok = g < GROUPS
    q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + g[:, None] * stride_qg + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if GATHER:
        for c in range(0, S * unit, BLOCK_N):
            pos, ok = _gathered(Index, c, lanes, unit, S, limit)
            m_i, l_i, acc = _fwd_step(q, K, V, KeyPad, pos, ok, row_ok, d, m_i, l_i, acc,
                                      stride_kn, stride_vn, qk_scale, HEAD_DIM, HAS_PAD,
                                      DOT_PRECISION, UPCAST)
    else:
        for s in range(S):
            u = tl.load(Index + s)
            first = u * unit
            # Keys of the unit up to `limit`: none for an empty slot.
            hi = tl.where(u >= 0, tl.minimum(unit, limit - first + 1), 0)
            for off in range(0, hi, BLOCK_N):
                m_i, l_i, acc = _fwd_step(q, K, V, KeyPad, first + off + lanes,
                                          off + lanes < hi, row_ok, d, m_i, l_i, acc,
                                          stride_kn, stride_vn, qk_scale, HEAD_DIM, HAS_PAD,
                                          DOT_PRECISION, UPCAST)
    reached = l_i > 0.0
    l_safe = tl.where(reached, l_i, 1.0)
    lse = tl.where(reached, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    b = bh // HEADS
    h = bh % HEADS
    out_rows = Out + b * stride_ob + h * stride_oh + i * stride_on + g[:, None] * stride_og
    tl.store(out_rows + d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=q_mask)
    tl.store(Lse + row0 + g * N, lse, mask=row_ok)


# -- backward ---------------------------------------------------------------------------------


@triton.jit
def _bwd_step(q, do, lse, delta, K, V, KeyPad, DK, DV, pos, ok, row_ok, d, dq, stride_kn,
              stride_vn, qk_scale, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dq of the rows from the keys at `pos` (where `ok`), returned; their dk (unscaled) and
    dv added to DK and DV (float32, rows of HEAD_DIM)."""
    k, v, ok = _keys(K, V, KeyPad, pos, ok, d, stride_kn, stride_vn, HEAD_DIM, HAS_PAD, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(row_ok[:, None] & ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    offsets = pos.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    mask = ok[:, None] & (d[None, :] < HEAD_DIM)
    tl.atomic_add(DK + offsets, dk, mask=mask, sem="relaxed")
    tl.atomic_add(DV + offsets, dv, mask=mask, sem="relaxed")
    return dq


@triton.jit(do_not_specialize=_SIZES)
def _selection_bwd_kernel(
    Q, K, V, Index, KeyPad, DOut, Lse, Delta, DQ, DK, DV,
    stride_qb, stride_qh, stride_qg, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_og, stride_on,
    stride_ib, stride_ih, stride_in,
    qk_scale, unit, N, M, S, shift, HEADS, KV_GROUP, GROUPS,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dq of the G query heads of one (batch, selection head, position) (DQ: strides of DOut,
    i.e. of the output), and their share of dk (unscaled) and dv of every key they read
    (DK, DV: float32 (B, Hkv, M, HEAD_DIM), added atomically)."""
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    i, bh, Q, K, V, Index, KeyPad, limit, row0 = _program(
        Q, K, V, Index, KeyPad, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
        stride_vb, stride_vh, stride_ib, stride_ih, stride_in, shift, N, M, HEADS, KV_GROUP,
        GROUPS)
    kv_row = (bh // HEADS * (HEADS // KV_GROUP) + bh % HEADS // KV_GROUP) * M * HEAD_DIM
    DK += kv_row
    DV += kv_row
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_N)
    row_ok = g < GROUPS
    mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + g[:, None] * stride_qg + d[None, :], mask=mask, other=0.0)
    b = bh // HEADS
    h = bh % HEADS
    out_rows = b * stride_ob + h * stride_oh + i * stride_on + g[:, None] * stride_og + d[None, :]
    do = tl.load(DOut + out_rows, mask=mask, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(Lse + row0 + g * N, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no allowed key: p is 0 anyway
    delta = tl.load(Delta + row0 + g * N, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if GATHER:
        for c in range(0, S * unit, BLOCK_N):
            pos, ok = _gathered(Index, c, lanes, unit, S, limit)
            dq = _bwd_step(q, do, lse, delta, K, V, KeyPad, DK, DV, pos, ok, row_ok, d, dq,
                           stride_kn, stride_vn, qk_scale, HEAD_DIM, HAS_PAD, DOT_PRECISION,
                           UPCAST)
    else:
        for s in range(S):
            u = tl.load(Index + s)
            first = u * unit
            hi = tl.where(u >= 0, tl.minimum(unit, limit - first + 1), 0)
            for off in range(0, hi, BLOCK_N):
                dq = _bwd_step(q, do, lse, delta, K, V, KeyPad, DK, DV, first + off + lanes,
                               off + lanes < hi, row_ok, d, dq, stride_kn, stride_vn, qk_scale,
                               HEAD_DIM, HAS_PAD, DOT_PRECISION, UPCAST)
    scale = qk_scale * 0.6931471805599453
    tl.store(DQ + out_rows, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# -- configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionConfig:
    """Keys per step (the largest; a block unit smaller than it takes the next power of two
    >= 16 holding it), and the warps and stages of the forward and backward kernels."""

    block_n: int
    fwd_warps: int
    fwd_stages: int
    bwd_warps: int
    bwd_stages: int


INTERPRETER_CONFIG = SelectionConfig(16, 1, 1, 1, 1)
"""Steps of 16 keys: units of 32 keys take two steps, gathers of more than 16 entries several."""

# (family, precision kind) -> padded head dim -> SelectionConfig(block_n, fwd_warps,
# fwd_stages, bwd_warps, bwd_stages). Chosen by `python -m attn_zoo.kernels.compile_check
# --tune --kernels selection` (sm_80 and sm_90; sm_100 takes sm_90's): the first keys per step,
# warps and stages whose kernels compile natively without register spills at units 64 and 1
# (within 64 bytes with padding; sm_80 16-bit head dim 128: 8 bytes in the backward, the
# fewest found). Every entry is compiled by the compile check.
_S = SelectionConfig
_SM90 = {
    "16bit": {16: _S(64, 4, 2, 4, 1), 32: _S(64, 4, 2, 4, 1), 64: _S(64, 4, 2, 4, 1),
              128: _S(64, 8, 2, 8, 1)},
    "tf32": {16: _S(64, 4, 2, 4, 1), 32: _S(64, 4, 2, 4, 1), 64: _S(64, 4, 2, 4, 1),
             128: _S(64, 8, 2, 8, 1)},
    "ieee": {16: _S(32, 4, 2, 4, 1), 32: _S(32, 4, 2, 4, 1), 64: _S(32, 4, 2, 8, 1),
             128: _S(32, 8, 2, 8, 1)},
}
CONFIGS: dict[tuple[int, str], dict[int, SelectionConfig]] = {
    (80, "16bit"): {16: _S(64, 4, 2, 4, 1), 32: _S(64, 4, 2, 4, 2), 64: _S(64, 4, 2, 8, 1),
                    128: _S(64, 8, 2, 8, 2)},
    (80, "tf32"): {16: _S(64, 4, 2, 4, 1), 32: _S(64, 4, 2, 4, 1), 64: _S(32, 4, 2, 4, 1),
                   128: _S(32, 8, 2, 8, 1)},
    (80, "ieee"): {16: _S(32, 4, 2, 4, 2), 32: _S(32, 4, 2, 4, 2), 64: _S(32, 4, 2, 4, 1),
                   128: _S(32, 8, 2, 8, 1)},
    **{(family, kind): dict(dims) for family in (90, 100) for kind, dims in _SM90.items()},
}


def selection_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> SelectionConfig:
    """The checked config of `device`'s architecture for `dtype` and `head_dim`, or the
    interpreter's."""
    arch = target_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    return CONFIGS[arch_family(arch), precision(dtype)][padded_dim(head_dim)]


# -- launchers --------------------------------------------------------------------------------


def _call(q: Tensor, k: Tensor, index: Tensor, key_padding_mask: Tensor | None, unit: int,
          scale: float, causal: bool) -> tuple[dict, dict, dict, dict]:
    """Runtime arguments, constants, and the forward's and backward's launch options."""
    batch, heads, groups, n, dim = q.shape
    m = k.shape[2]
    config = selection_config(q.dtype, dim, q.device)
    gather = unit < GATHER_BELOW
    block_n = config.block_n if gather else min(config.block_n, padded_dim(unit))
    interpreter = target_arch(q.device) is None
    upcast = interpreter and q.dtype == torch.bfloat16
    args = dict(qk_scale=scale * LOG2E, unit=unit, N=n, M=m, S=index.shape[3],
                shift=m - n if causal else m, HEADS=heads, KV_GROUP=heads // k.shape[1],
                GROUPS=groups)
    constants = dict(HEAD_DIM=dim, HAS_PAD=key_padding_mask is not None, GATHER=gather,
                     BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_N=block_n,
                     BLOCK_D=padded_dim(dim),
                     DOT_PRECISION="ieee" if upcast or precision(q.dtype) == "ieee" else "tf32",
                     UPCAST=upcast)
    if interpreter:
        return args, constants, {}, {}
    return (args, constants, dict(num_warps=config.fwd_warps, num_stages=config.fwd_stages),
            dict(num_warps=config.bwd_warps, num_stages=config.bwd_stages))


def _pad(key_padding_mask: Tensor | None, q: Tensor) -> Tensor:
    """The padding mask as bytes, or a stand-in never read."""
    if key_padding_mask is None:
        return q.new_empty(1, dtype=torch.uint8)
    return key_padding_mask.contiguous().view(torch.uint8)


def _forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, key_padding_mask: Tensor | None,
             unit: int, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    batch, heads, groups, n, dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty(batch, heads, groups, n, dtype=torch.float32)
    if out.numel():
        args, constants, options, _ = _call(q, k, index, key_padding_mask, unit, scale, causal)
        launch(_selection_fwd_kernel, (n, batch * heads), q, k, v, index,
               _pad(key_padding_mask, q), out, lse, *q.stride()[:4], *k.stride()[:3],
               *v.stride()[:3], *out.stride()[:4], *index.stride()[:3], *args.values(),
               **constants, **options)
    return out, lse


def _backward(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
              index: Tensor, key_padding_mask: Tensor | None, out: Tensor, lse: Tensor,
              unit: int, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, groups, n, dim = q.shape
    grad_out = grad_out.to(q.dtype).contiguous()
    # d lse_i / d s_ij = p_ij: the lse gradient shifts the softmax-backward term delta; rows
    # without keys have no probabilities, and a zero delta keeps them finite.
    delta = (grad_out.float() * out.float()).sum(-1) - grad_lse.float()
    delta = delta.masked_fill_(lse == float("-inf"), 0.0).contiguous()
    grad_q = torch.empty_like(grad_out)
    grad_k, grad_v = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (k, v))
    if grad_q.numel():
        args, constants, _, options = _call(q, k, index, key_padding_mask, unit, scale, causal)
        launch(_selection_bwd_kernel, (n, batch * heads), q, k, v, index,
               _pad(key_padding_mask, q), grad_out, lse.contiguous(), delta, grad_q, grad_k,
               grad_v, *q.stride()[:4], *k.stride()[:3], *v.stride()[:3],
               *grad_out.stride()[:4], *index.stride()[:3], *args.values(), **constants,
               **options)
    return grad_q, (grad_k * scale).to(k.dtype), grad_v.to(v.dtype)


# -- custom ops and autograd ------------------------------------------------------------------


@torch.library.custom_op("attn_zoo::selection_fwd", mutates_args=())
def _selection_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                   key_padding_mask: Tensor | None, unit: int, scale: float,
                   causal: bool) -> tuple[Tensor, Tensor]:
    """out (B, H, G, N, D) in q's dtype and lse (B, H, G, N) float32."""
    return _forward(q, k, v, index, key_padding_mask, unit, scale, causal)


@_selection_fwd.register_fake
def _(q, k, v, index, key_padding_mask, unit, scale, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attn_zoo::selection_bwd", mutates_args=())
def _selection_bwd(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   index: Tensor, key_padding_mask: Tensor | None, out: Tensor, lse: Tensor,
                   unit: int, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, H, G, N, D), dk and dv (B, Hkv, M, D) in the inputs' dtype."""
    return _backward(grad_out, grad_lse, q, k, v, index, key_padding_mask, out, lse, unit,
                     scale, causal)


@_selection_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, index, key_padding_mask, out, lse, unit, scale, causal):
    return q.new_empty(q.shape), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, key_padding_mask, unit, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, key_padding_mask, out, lse)
    ctx.options = (unit, scale, causal)


def _selection_grad(ctx, grad_out, grad_lse):
    q, k, v, index, key_padding_mask, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_q, grad_k, grad_v = _selection_bwd(grad_out, grad_lse, q, k, v, index,
                                            key_padding_mask, out, lse, *ctx.options)
    return grad_q, grad_k, grad_v, None, None, None, None, None


_selection_fwd.register_autograd(_selection_grad, setup_context=_setup_context)


def selection_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, unit: int,
                        scale: float, causal: bool,
                        key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every query to the keys of the units its index row lists.

    q: (B, H, G, N, D), H selection heads each shared by G query heads; k, v: (B, Hkv, M, D)
    with H % Hkv == 0 (selection head h reads kv head h // (H // Hkv)); one dtype among
    float32, bfloat16, float16; D a multiple of 8 up to 128; any strides with a contiguous
    last dim. index: (B, H, N, S) int32 or int64, the distinct units of each query, -1 = an
    empty slot; unit u covers key positions u * unit .. u * unit + unit - 1 (those < M).
    causal: key j only when j <= i + M - N. key_padding_mask: (B, M) bool, True = a real key.

    Returns out (B, H, G, N, D) in q's dtype and lse (B, H, G, N) float32; a row with no
    allowed key has out 0 and lse -inf. Both are differentiable (q, k, v).
    """
    _check(q, k, v, index, unit, key_padding_mask)
    q, k, v = inner_contiguous(q), inner_contiguous(k), inner_contiguous(v)
    index = index.to(torch.int32).contiguous()  # one compiled kernel for either int type
    return _selection_fwd(q, k, v, index, key_padding_mask, int(unit), float(scale),
                          bool(causal))


def _check(q: Tensor, k: Tensor, v: Tensor, index: Tensor, unit: int,
           key_padding_mask: Tensor | None) -> None:
    check_selection(q, k, v, index, unit, key_padding_mask)
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if q.shape[-1] % 8 or not 8 <= q.shape[-1] <= 128:
        raise ValueError(f"head_dim must be a multiple of 8 in 8..128, got {q.shape[-1]}")
