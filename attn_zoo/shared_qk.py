"""Pieces shared by the shared-QK variants (`lsh`, `routing`): softmax attention of small
gathered groups, row gathers, and the zero gradient of the keys they ignore."""

from __future__ import annotations

import torch
from torch import Tensor

from attn_zoo.blocksparse import finite


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of small gathered groups.

    q: (..., R, D); k, v: (..., K, D); allowed: (..., R, K) bool. Returns out (..., R, D) and
    lse (..., R); a row with no allowed key has out = 0 and lse = -inf, with finite gradients.
    A value that is inf or NaN reaches only the rows that give it a probability (as NaN).
    """
    scores = (q * scale) @ k.transpose(-1, -2)
    has_key = allowed.any(-1, keepdim=True)
    # Empty rows get finite stand-in scores: a softmax of -inf alone is NaN, forward and back.
    scores = torch.where(allowed, scores, torch.where(has_key, float("-inf"), 0.0))
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~has_key.squeeze(-1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if finite(v):
        out = probs @ v
    else:  # inf or NaN values reach only the rows that give them a probability, as NaN
        finite_values = torch.isfinite(v)
        out = probs @ torch.where(finite_values, v, 0.0)
        bad_keys = (~finite_values).any(-1)[..., None, :]
        out = out.masked_fill(((probs > 0) & bad_keys).any(-1, keepdim=True), float("nan"))
    return out.masked_fill(~has_key, 0.0), lse


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
