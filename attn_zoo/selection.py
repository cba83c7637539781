"""Selection attention in plain torch: every query attends, with one softmax, to the keys of its
own list of selected units (key blocks of MoBA and NSA, single keys of a top-k indexer).

    out, lse = selection_attention(q, k, v, index, unit=64, scale=scale, causal=True)

The selected keys are gathered per query, in chunks of rows that hold about
`GATHER_ELEMENTS` gathered values, and the backward pass recomputes the scores from
`(q, k, v, out, lse)`: memory is the output plus one chunk, never N x N and never the whole
(N x selected keys) score tensor. `attn_zoo.kernels.selection.selection_attention` is the
Triton kernel with the same signature.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_zoo.blocksparse import finite

GATHER_ELEMENTS = 1 << 22
"""Gathered key (or value) elements per chunk of query rows: bounds one step's memory."""


def selection_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, unit: int,
                        scale: float, causal: bool,
                        key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the keys of its selected units.

    q: (B, H, G, N, D), H selection heads each shared by G query heads; k, v: (B, Hkv, M, D)
    with H % Hkv == 0 (selection head h reads kv head h // (H // Hkv)). index: (B, H, N, S)
    integer, the selected units of every query: unit u covers the key positions
    u * unit .. u * unit + unit - 1 that are < M; -1 is an empty slot; the units of one row
    are distinct. causal: key j is allowed only when j <= i + M - N. key_padding_mask: (B, M)
    bool, True = a real key. Returns out (B, H, G, N, D) in q's dtype and lse (B, H, G, N)
    (float32, float64 for float64 input); a row with no allowed key has out 0 and lse -inf.
    Differentiable in q, k and v (and through lse).
    """
    _check(q, k, v, index, unit, key_padding_mask)
    return _Selection.apply(q, k, v, index, unit, scale, causal, key_padding_mask)


def _check(q: Tensor, k: Tensor, v: Tensor, index: Tensor, unit: int,
           key_padding_mask: Tensor | None) -> None:
    if q.dim() != 5 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"selection_attention needs q (B, H, G, N, D) and k, v (B, Hkv, M, D), "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, _, n, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or heads % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and "
                         f"head_dim, with H a multiple of Hkv")
    if index.dim() != 4 or index.shape[:3] != (batch, heads, n) or index.is_floating_point():
        raise ValueError(f"index must be an integer tensor (B, H, N, S) = ({batch}, {heads}, {n},"
                         f" S), got {index.dtype} {tuple(index.shape)}")
    if not isinstance(unit, int) or unit < 1:
        raise ValueError(f"unit must be an int >= 1, got {unit!r}")
    if key_padding_mask is not None and key_padding_mask.shape != (batch, k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape (B, M) = {(batch, k.shape[2])}, got "
                         f"{tuple(key_padding_mask.shape)}")


class _Rows:
    """The selected keys of query rows t0 .. t1 - 1: their row numbers in k, v flattened to
    (B * Hkv * M, D) (B, H, t, W) and which of them are allowed (valid, same shape)."""

    def __init__(self, index: Tensor, t0: int, t1: int, unit: int, kv_heads: int, m: int,
                 n: int, causal: bool, key_padding_mask: Tensor | None) -> None:
        batch, heads = index.shape[:2]
        chosen = index[:, :, t0:t1].long()  # (B, H, t, S)
        offsets = torch.arange(unit, device=index.device)
        position = (chosen[..., None] * unit + offsets).flatten(-2)  # (B, H, t, S * unit)
        valid = (chosen >= 0).repeat_interleave(unit, dim=-1) & (position < m)
        if causal:
            last = torch.arange(t0, t1, device=index.device) + (m - n)
            valid &= position <= last[:, None]
        position = position.masked_fill(~valid, 0)
        if key_padding_mask is not None:
            valid &= key_padding_mask.gather(1, position.flatten(1)).view_as(position)
        kv_head = torch.arange(heads, device=index.device) // (heads // kv_heads)
        base = (torch.arange(batch, device=index.device)[:, None] * kv_heads + kv_head) * m
        self.rows = base[:, :, None, None] + position
        self.valid = valid

    def gather(self, x: Tensor, clean: bool) -> Tensor:
        """The selected rows of x (B * Hkv * M, D): (B, H, t, W, D); with `clean`, rows that
        are not allowed read as zeros (a non-finite value must not meet a zero probability)."""
        out = x.index_select(0, self.rows.flatten()).view(*self.rows.shape, x.shape[-1])
        return out.masked_fill(~self.valid[..., None], 0.0) if clean else out

    def scatter(self, target: Tensor, grad: Tensor) -> None:
        """Add per-selected-key gradients (B, H, t, W, D) into target (B * Hkv * M, D)."""
        target.index_add_(0, self.rows.flatten(), grad.reshape(-1, grad.shape[-1]))


def _chunk_rows(q: Tensor, width: int) -> int:
    batch, heads, groups, _, dim = q.shape
    return max(1, GATHER_ELEMENTS // max(1, batch * heads * width * max(dim, groups)))


def _probabilities(qc: Tensor, keys: Tensor, valid: Tensor, scale: float,
                   lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax of scale * qc (B, H, G, t, D) . keys (B, H, t, W, D) over the valid keys:
    probabilities (B, H, G, t, W) and lse (B, H, G, t) (given, in the backward)."""
    scores = torch.einsum("bhgtd,bhtwd->bhgtw", qc, keys).mul_(scale)
    scores = scores.masked_fill_(~valid[:, :, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]), lse


class _Selection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, unit, scale, causal, key_padding_mask):
        batch, heads, groups, n, dim = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        flat_k, flat_v = k.to(work).reshape(-1, dim), v.to(work).reshape(-1, dim)
        clean = not finite(v)
        out = q.new_empty(q.shape)
        lse = torch.empty(batch, heads, groups, n, dtype=work, device=q.device)
        step = _chunk_rows(q, index.shape[-1] * unit)
        for t0 in range(0, n, step):
            t1 = min(n, t0 + step)
            rows = _Rows(index, t0, t1, unit, kv_heads, m, n, causal, key_padding_mask)
            probs, lse[..., t0:t1] = _probabilities(q[..., t0:t1, :].to(work),
                                                    rows.gather(flat_k, False), rows.valid, scale)
            out[..., t0:t1, :] = torch.einsum("bhgtw,bhtwd->bhgtd", probs,
                                              rows.gather(flat_v, clean))
        ctx.save_for_backward(q, k, v, index, out, lse, key_padding_mask)
        ctx.settings = (unit, scale, causal)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, index, out, lse, key_padding_mask = ctx.saved_tensors
        unit, scale, causal = ctx.settings
        batch, heads, groups, n, dim = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        work = lse.dtype
        flat_k, flat_v = k.to(work).reshape(-1, dim), v.to(work).reshape(-1, dim)
        clean = not finite(v)
        grad_out = torch.zeros_like(out, dtype=work) if grad_out is None else grad_out.to(work)
        # d lse / d score = probability: the lse gradient joins delta, row by row.
        delta = (grad_out * out.to(work)).sum(-1)
        if grad_lse is not None:
            delta = delta - torch.nan_to_num(grad_lse.to(work), posinf=0.0, neginf=0.0)
        grad_q = torch.zeros_like(q, dtype=work)
        grad_k, grad_v = torch.zeros_like(flat_k), torch.zeros_like(flat_v)
        step = _chunk_rows(q, index.shape[-1] * unit)
        for t0 in range(0, n, step):
            t1 = min(n, t0 + step)
            rows = _Rows(index, t0, t1, unit, kv_heads, m, n, causal, key_padding_mask)
            qc, keys, values = (q[..., t0:t1, :].to(work), rows.gather(flat_k, False),
                                rows.gather(flat_v, clean))
            probs, _ = _probabilities(qc, keys, rows.valid, scale, lse[..., t0:t1])
            go = grad_out[..., t0:t1, :]
            grad_probs = torch.einsum("bhgtd,bhtwd->bhgtw", go, values)
            grad_scores = probs * (grad_probs - delta[..., t0:t1, None]) * scale
            grad_q[..., t0:t1, :] = torch.einsum("bhgtw,bhtwd->bhgtd", grad_scores, keys)
            rows.scatter(grad_k, torch.einsum("bhgtw,bhgtd->bhtwd", grad_scores, qc))
            rows.scatter(grad_v, torch.einsum("bhgtw,bhgtd->bhtwd", probs, go))
        return (grad_q.to(q.dtype), grad_k.view(k.shape).to(k.dtype),
                grad_v.view(v.shape).to(v.dtype), None, None, None, None, None)
