"""The `flex` backend: a static variant's pattern as a FlexAttention mask.

`pattern(i, j)` becomes the `mask_mod` of `torch.nn.attention.flex_attention`; its block mask
is built by a compiled `create_block_mask`, which never holds the dense (N, M) mask. Both are
compiled on first use (seconds, once per shape and pattern). FlexAttention has no backward on
CPU: there the backend serves inference, and training needs the torch backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from attn_zoo.blocksparse import Pattern


@functools.cache
def _compiled() -> tuple[Callable, Callable]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(create_block_mask), torch.compile(flex_attention, dynamic=False)


def flex_block_mask(pattern: Pattern, batch: int | None, n: int, m: int, device: torch.device,
                    key_padding_mask: Tensor | None = None):
    """FlexAttention `BlockMask` of `pattern` (and the real keys of `key_padding_mask`)."""
    create_block_mask, _ = _compiled()
    if key_padding_mask is None:
        return create_block_mask(lambda b, h, i, j: pattern(i, j), None, None, n, m,
                                 device=device)
    return create_block_mask(lambda b, h, i, j: pattern(i, j) & key_padding_mask[b, j],
                             batch, None, n, m, device=device)


def flex_forward(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float,
                 score_mod: Callable | None = None) -> Tensor:
    """q (B, Hkv, G, N, D), k, v (B, Hkv, M, D) -> (B, Hkv, G, N, D) through FlexAttention,
    with `score_mod(score, b, h, i, j)` (h: the query head) when given.

    Rows with no allowed key come back as zeros.
    """
    batch, kv_heads, groups, n, dim = q.shape
    _, flex_attention = _compiled()
    out = flex_attention(q.reshape(batch, kv_heads * groups, n, dim), k, v,
                         score_mod=score_mod, block_mask=block_mask, scale=scale,
                         enable_gqa=groups > 1)
    return out.view(batch, kv_heads, groups, n, dim)
