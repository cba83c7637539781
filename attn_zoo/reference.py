"""Dense float64 reference attention: the test oracle every variant is checked against.

It materialises the (N, M) score matrix, so it exists for tests and small checks only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from attn_zoo.blocksparse import Pattern


class PooledKeys(NamedTuple):
    """Extra keys that stand for groups of keys (hierarchical / compressive memories).

    k, v: (B, Hkv, P, D); allowed: bool broadcastable to (B, Hq, N, P); bias: float added to
    their scores, broadcastable to (B, Hq, N, P) (e.g. log(block_len)).
    """

    k: Tensor
    v: Tensor
    allowed: Tensor
    bias: Tensor


def dense_mask(pattern: Pattern, n: int, m: int | None = None) -> Tensor:
    """The (n, m) boolean matrix `pattern(i, j)` over all positions (m defaults to n)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n if m is None else m)[None, :]
    return pattern(i, j).expand(n, j.shape[1])


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    pooled: PooledKeys | None = None,
    sink: Tensor | None = None,
) -> Tensor:
    """Softmax attention over the allowed pairs, in float64.

    q: (B, Hq, N, D); k, v: (B, Hkv, M, D); allowed: bool broadcastable to (B, Hq, N, M);
    key_padding_mask: (B, M) bool, True = real key; sink: (Hq,), one more key in every row's
    softmax with score sink[h] and value 0. Returns (B, Hq, N, D) float64; a row with no
    allowed key is zero.
    """
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = allowed.to(q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    if pooled is not None:
        pooled_k = pooled.k.double().repeat_interleave(groups, 1)
        pooled_v = pooled.v.double().repeat_interleave(groups, 1)
        pooled_scores = torch.einsum("bhnd,bhpd->bhnp", q, pooled_k) * scale + pooled.bias
        pooled_scores = pooled_scores.masked_fill(~pooled.allowed, float("-inf"))
        scores = torch.cat([scores, pooled_scores], dim=-1)
        v = torch.cat([v, pooled_v], dim=2)
    has_key = (scores > float("-inf")).any(-1, keepdim=True)
    scores = scores.masked_fill(~has_key, 0.0)
    if sink is not None:  # the null key: a column of scores with a zero value
        null = sink.double()[:, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, null], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
        has_key = has_key.expand(*has_key.shape[:-1], scores.shape[-1]).clone()
        has_key[..., -1] = True
    probs = torch.softmax(scores, dim=-1) * has_key
    return probs @ v
