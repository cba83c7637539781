"""`full`: every query attends to every key (exact softmax attention)."""

from __future__ import annotations

import torch.nn.functional as F

from attn_zoo.attention import PatternAttention
from attn_zoo.blocksparse import finite
from attn_zoo.cache import PatternCache, register_cache
from attn_zoo.patterns import Part, Pattern, causal_pattern, every_key, everything
from attn_zoo.registry import register


def full_pattern(causal: bool, offset: int = 0) -> Pattern:
    """Every key; causal keeps j <= i + offset (offset = M - N aligns bottom-right)."""
    return causal_pattern(offset) if causal else everything()


@register("full")
class FullAttention(PatternAttention):
    """Dense attention: `scaled_dot_product_attention` when no mask is needed, else the
    block-sparse engine over every key (padding and a cross-attention's causal alignment
    never build an N x M mask); also cross-attention (M != N)."""

    supports_cross = True
    parallel = "ring"
    static_pattern = True
    relative_parts = True
    backends = ("torch", "triton")
    # On CUDA, SDPA (FlashAttention) is the dense fast path; backend="triton" runs the kernel.
    auto_backends = ("torch",)

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        return [Part("all", everything(), every_key, m)]

    def pattern(self, n: int, causal: bool) -> Pattern:
        return self.exact_pattern(n, causal)

    def runs_documents_in_place(self, backend: str, n: int, causal: bool) -> bool:
        # On torch, SDPA over the documents of each length beats the engine over packed rows
        # (16 documents in 16K on a CPU: 0.7 s against 1.8 s).
        return backend != "torch" and super().runs_documents_in_place(backend, n, causal)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale, documents=None):
        batch, kv_heads, groups, n, dim = q.shape
        # SDPA's causal mask lets inf or NaN in a later key reach earlier rows (0 * NaN).
        exact_causal = causal and (k.shape[2] != n or not (finite(k) and finite(v)))
        # SDPA gives no log-sum-exp, which a sink needs, and knows no documents.
        if (key_padding_mask is not None or exact_causal or self.sink is not None
                or documents is not None):
            return super()._forward_torch(q, k, v, causal, key_padding_mask, scale, documents)
        out = F.scaled_dot_product_attention(q.reshape(batch, kv_heads * groups, n, dim), k, v,
                                             is_causal=causal, scale=scale,
                                             enable_gqa=groups > 1)
        return out.reshape(batch, kv_heads, groups, n, dim), None

    def scored_pairs(self, n: int, causal: bool) -> int:
        return n * (n + 1) // 2 if causal else n * n


# -- decoding cache -------------------------------------------------------------------------


@register_cache("full")
class FullCache(PatternCache):
    """Every past key: grows with the sequence; a new row attends to every key up to itself."""

    def pattern(self) -> Pattern:
        return full_pattern(True)
