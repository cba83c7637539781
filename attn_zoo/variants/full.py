"""`full`: every query attends to every key (exact softmax attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attn_zoo.attention import Attention
from attn_zoo.blocksparse import Pattern
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.registry import register


def full_pattern(causal: bool, offset: int = 0) -> Pattern:
    """Every key; causal keeps j <= i + offset (offset = M - N aligns bottom-right)."""

    def allowed(i: Tensor, j: Tensor) -> Tensor:
        return j <= i + offset if causal else torch.ones_like(i - j, dtype=torch.bool)

    return allowed


@register("full")
class FullAttention(Attention):
    """Dense attention through `scaled_dot_product_attention`; also cross-attention (M != N)."""

    supports_cross = True
    static_pattern = True
    backends = ("torch", "triton")
    # On CUDA, SDPA (FlashAttention) is the dense fast path; backend="triton" runs the kernel.
    auto_backends = ("torch",)

    def pattern(self, n: int, causal: bool) -> Pattern:
        return full_pattern(causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        batch, kv_heads, groups, n, dim = q.shape
        m = k.shape[2]
        q = q.reshape(batch, kv_heads * groups, n, dim)
        if key_padding_mask is None and (not causal or m == n):
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1
            )
        else:
            allowed = torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device)
            if causal:
                positions = torch.arange(max(n, m), device=q.device)
                allowed = allowed & full_pattern(True, m - n)(positions[:n, None], positions[:m])
            if key_padding_mask is not None:
                allowed = allowed & key_padding_mask[:, None, None, :]
            # SDPA gives NaN on rows with no key; let them see everything, then zero them.
            has_key = allowed.any(-1, keepdim=True)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed | ~has_key, scale=scale, enable_gqa=groups > 1
            ).masked_fill(~has_key, 0.0)
        return out.reshape(batch, kv_heads, groups, n, dim)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale):
        n, m = q.shape[3], k.shape[2]
        out, _ = self.triton_attention(q, k, v, "pattern", full_pattern(causal, m - n), causal,
                                       key_padding_mask, scale)
        return out

    def scored_pairs(self, n: int, causal: bool) -> int:
        return n * (n + 1) // 2 if causal else n * n


# -- decoding cache -------------------------------------------------------------------------


@register_cache("full")
class FullCache(PatternCache):
    """Every past key: grows with the sequence; a new row attends to every key up to itself."""

    def pattern(self) -> Pattern:
        return full_pattern(True)
