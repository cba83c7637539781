"""attn-zoo: long-context efficient attention variants behind one interface."""

from attn_zoo import variants
from attn_zoo.attention import Attention
from attn_zoo.cache import DecodeCache, KVCache, cache_for, register_cache
from attn_zoo.model import (
    Block,
    MultiheadAttention,
    Seq2SeqTransformer,
    TransformerEncoder,
    TransformerLM,
)
from attn_zoo.parallel import context_parallel
from attn_zoo.params import Params
from attn_zoo.registry import available, build, register

__all__ = [
    "Attention",
    "Block",
    "DecodeCache",
    "KVCache",
    "MultiheadAttention",
    "Params",
    "Seq2SeqTransformer",
    "TransformerEncoder",
    "TransformerLM",
    "available",
    "build",
    "cache_for",
    "context_parallel",
    "register",
    "register_cache",
    "variants",
]
