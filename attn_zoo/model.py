"""The Transformer backbone: any registered attention variant behind one pre-norm block.

    lm = TransformerLM(vocab_size=256, dim=128, depth=4, heads=4, attention="local",
                       attention_params={"window": 64})
    logits = lm(tokens)                       # (B, N) -> (B, N, vocab_size)
    tokens = lm.generate(prompt, 32)          # (B, P) -> (B, P + 32), through KV caches
    logits = lm(tokens, document_ids=ids)     # packed rows: ids (B, N), equal ids = one document
    tokens = lm.generate(prompt, 32, document_ids=ids)  # continues each row's last document
    lm = TransformerLM(..., context_parallel=group)  # every rank: its shard of the tokens
    logits = lm(shard)                        # (B, n_local) -> (B, n_local, vocab_size)

`TransformerEncoder` (bidirectional), `TransformerLM` (decoder-only) and `Seq2SeqTransformer`
(encoder-decoder) share `Block`. Positions: "rope" rotates q and k inside every self-attention;
"sinusoidal" and "learned" are added to the embeddings; "none" uses no positions. On packed
rows every position restarts at each document. `sinks=True` gives every attention layer a
learnable sink logit per query head. Under context parallelism (`TransformerLM(...,
context_parallel=group)`) each rank holds a contiguous shard of the sequence, its positions
counted from the shard's start, and every self-attention runs `attn_zoo.context_parallel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from attn_zoo import generation
from attn_zoo.cache import ConvTail, CrossKV, DecodeCache, KVCache
from attn_zoo.documents import check_documents
from attn_zoo.layers import (
    RotaryEmbedding,
    ShortConv,
    make_mlp,
    make_norm,
    make_positions,
    token_positions,
)
from attn_zoo.parallel import context_parallel
from attn_zoo.parallel.comm import Shards, rows_before
from attn_zoo.params import require
from attn_zoo.registry import build, get


def _check_sizes(dim: int, heads: int, kv_heads: int | None, dropout: float) -> int:
    """Validate the attention sizes; returns kv_heads (None means heads)."""
    for name, value in (("dim", dim), ("heads", heads)):
        require(isinstance(value, int) and value >= 1, name, value, "a positive int")
    kv_heads = heads if kv_heads is None else kv_heads
    require(isinstance(kv_heads, int) and kv_heads >= 1 and heads % kv_heads == 0, "kv_heads",
            kv_heads, f"a positive divisor of heads ({heads})")
    require(dim % heads == 0, "dim", dim, f"a multiple of heads ({heads})")
    require(0.0 <= dropout < 1.0, "dropout", dropout, "in [0, 1)")
    return kv_heads


class MultiheadAttention(nn.Module):
    """Projections around a registered attention variant, with GQA and optional RoPE.

    forward(x (B, N, dim), context=None (B, M, dim)) -> (B, N, dim). Without `context` it is
    self-attention through the variant `attention`; with it, cross-attention (keys from
    `context`), which needs a variant that `supports_cross`. `dropout` drops the output (the
    residual branch): the variants' contract does not expose attention probabilities.
    `sinks=True` builds the variant with one learnable sink logit per query head
    (`attention.sink`, shape (heads,)).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        attention: str = "full",
        attention_params: dict[str, Any] | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        rope: bool = False,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.kv_heads = _check_sizes(dim, heads, kv_heads, dropout)
        self.heads, self.head_dim = heads, dim // heads
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool, got {sinks!r}")
        params = dict(attention_params or {})
        if "sinks" in params:
            raise ValueError(f"attention_params must not set sinks (got {params['sinks']!r}): "
                             "sinks=True gives one per query head")
        self.attention = build(attention, sinks=heads if sinks else 0, **params)
        self.attention.initialize(heads, self.kv_heads, self.head_dim)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.rope = RotaryEmbedding(self.head_dim) if rope else None

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | CrossKV | None = None,
        document_ids: Tensor | None = None,
        shards: Shards | None = None,
    ) -> Tensor:
        """key_padding_mask: (B, M) bool, True = real key (M = N without context).

        cache: for self-attention a `KVCache` (causal only, no padding mask): x holds the
        positions cache.seen .. cache.seen + N - 1 (a prompt, a chunk of one, or one new
        token); for cross-attention a `CrossKV` that keeps the context's keys/values after one
        call. document_ids: (B, N) integer, self-attention of packed rows (equal ids = one
        document; attention and RoPE positions restart at each document); not with a cache.
        shards: context-parallel self-attention: x is this rank's shard (positions
        shards.start ..) of a sequence split over shards.group; no cache, no document_ids.
        """
        q = self._heads(self.q_proj(x), self.heads)
        if context is None:
            out = self._self_attention(q, x, causal, key_padding_mask, cache, document_ids,
                                       shards)
        elif document_ids is not None or shards is not None:
            name = "document_ids" if document_ids is not None else "shards"
            raise ValueError(f"{name} applies to self-attention, got a context too")
        else:
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
                if cache is not None:
                    cache.k, cache.v = k, v
            out = self.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        return self.dropout(self.out_proj(rearrange(out, "b h n d -> b n (h d)")))

    def _heads(self, x: Tensor, heads: int | None = None) -> Tensor:
        """(B, N, heads * D) -> (B, heads, N, D); heads defaults to kv_heads."""
        return rearrange(x, "b n (h d) -> b h n d", h=heads or self.kv_heads)

    def _self_attention(self, q: Tensor, x: Tensor, causal: bool,
                        key_padding_mask: Tensor | None, cache: KVCache | None,
                        document_ids: Tensor | None, shards: Shards | None) -> Tensor:
        """q (B, Hq, N, D), x (B, N, dim) -> (B, Hq, N, D)."""
        if shards is not None and (cache is not None or document_ids is not None):
            raise ValueError("context parallel self-attention takes no cache and no "
                             "document_ids")
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids cannot be used with a KV cache: decode packed "
                                 "prompts with TransformerLM.generate(prompt, max_new_tokens, "
                                 "document_ids=...)")
            document_ids = check_documents(document_ids, None, *x.shape[:2], x.device)
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.rope is not None:
            start = cache.seen if cache is not None else shards.start if shards is not None else 0
            positions = token_positions(x.shape[1], x.device, start, document_ids)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if shards is not None:
            return context_parallel(self.attention, q, k, v, causal=causal,
                                    key_padding_mask=key_padding_mask, group=shards.group)
        if cache is None:
            return self.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                  document_ids=document_ids)
        require(causal, "causal", causal, "True with a KV cache")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask must be None with a KV cache, got one of shape "
                             f"{tuple(key_padding_mask.shape)}")
        return cache.extend(q, k, v)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross_attn(norm(x), context)] + mlp(norm(x)).

    forward(x (B, N, dim), ...) -> (B, N, dim). Cross-attention (`cross=True`, encoder-decoder)
    always uses `full`. `dropout` drops each residual branch. `sinks=True` gives every
    attention of the block (self and cross) a learnable sink per query head. `short_conv=k`
    (causal stacks): the self-attention reads `ShortConv(k)(norm(x))`, each position mixed
    with the k - 1 before it.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        attention: str = "full",
        attention_params: dict[str, Any] | None = None,
        *,
        norm: str = "rms",
        mlp: str = "swiglu",
        dropout: float = 0.0,
        rope: bool = False,
        cross: bool = False,
        bias: bool = False,
        sinks: bool = False,
        short_conv: int = 0,
    ) -> None:
        super().__init__()
        self.attn_norm = make_norm(norm, dim)
        self.conv = ShortConv(dim, short_conv) if short_conv else None
        self.attn = MultiheadAttention(dim, heads, kv_heads, attention, attention_params,
                                       dropout, bias, rope, sinks)
        self.cross_norm = make_norm(norm, dim) if cross else None
        self.cross_attn = (MultiheadAttention(dim, heads, kv_heads, "full", None, dropout, bias,
                                              sinks=sinks) if cross else None)
        self.mlp_norm = make_norm(norm, dim)
        self.mlp = make_mlp(mlp, dim, bias)
        self.mlp_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: CrossKV | None = None,
        document_ids: Tensor | None = None,
        shards: Shards | None = None,
        conv_tail: ConvTail | None = None,
    ) -> Tensor:
        """key_padding_mask: (B, N) for self-attention; context (B, M, dim) and context_mask
        (B, M) for cross-attention; True = real token. document_ids: (B, N), packed rows
        (self-attention only). shards: x is this rank's shard of a context-parallel sequence
        (see `MultiheadAttention`). conv_tail: the short convolution's state when decoding."""
        h = self.attn_norm(x)
        if self.conv is not None:
            before = (conv_tail.advance(h) if conv_tail is not None else
                      rows_before(h, shards, self.conv.kernel - 1) if shards is not None else
                      None)
            h = self.conv(h, before, document_ids)
        x = x + self.attn(h, causal=causal, key_padding_mask=key_padding_mask,
                          cache=cache, document_ids=document_ids, shards=shards)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, key_padding_mask=context_mask,
                                    cache=cross_cache)
        return x + self.mlp_dropout(self.mlp(self.mlp_norm(x)))


class _Stack(nn.Module):
    """Positions (added to the input), `depth` blocks, final norm: (B, N, dim) -> (B, N, dim).

    With document_ids (B, N), every position (additive or RoPE) restarts at each document;
    with shards (context parallel), x is this rank's shard and positions start at its start.
    """

    def __init__(self, dim: int, depth: int, heads: int, kv_heads: int | None, attention: str,
                 attention_params: dict[str, Any] | None, max_seq_len: int, pos: str, norm: str,
                 mlp: str, dropout: float, sinks: bool, cross: bool = False,
                 short_conv: int = 0) -> None:
        super().__init__()
        require(isinstance(depth, int) and depth >= 1, "depth", depth, "a positive int")
        require(isinstance(max_seq_len, int) and max_seq_len >= 1, "max_seq_len", max_seq_len,
                "a positive int")
        self.positions = make_positions(pos, dim, max_seq_len)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, attention, attention_params, norm=norm, mlp=mlp,
                  dropout=dropout, rope=pos == "rope", cross=cross, sinks=sinks,
                  short_conv=short_conv)
            for _ in range(depth)
        )
        self.norm = make_norm(norm, dim)

    def forward(self, x: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                cache: DecodeCache | None = None, document_ids: Tensor | None = None,
                shards: Shards | None = None) -> Tensor:
        if document_ids is not None:
            document_ids = check_documents(document_ids, None, *x.shape[:2], x.device)
        start = cache.seen if cache is not None else shards.start if shards is not None else 0
        if self.positions is not None:
            x = self.positions(x, token_positions(x.shape[1], x.device, start, document_ids))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, causal=causal, key_padding_mask=key_padding_mask, context=context,
                      context_mask=context_mask,
                      cache=None if cache is None else cache.layers[i],
                      cross_cache=None if cache is None or cache.cross is None else cache.cross[i],
                      document_ids=document_ids, shards=shards,
                      conv_tail=None if cache is None or cache.convs is None else cache.convs[i])
        return self.norm(x)

    def init_cache(self) -> DecodeCache:
        first = self.blocks[0]
        kernel = 0 if first.conv is None else first.conv.kernel
        return DecodeCache.for_attentions([block.attn.attention for block in self.blocks],
                                          cross=first.cross_attn is not None, conv_kernel=kernel)


@contextmanager
def _generating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd while generating; the previous mode comes back."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _init_weights(module: nn.Module) -> None:
    # Matrices keep the variance of their input (std 1 / sqrt(fan_in): GPT-2's 0.02 at width
    # 2500, but at widths near 64 a fixed 0.02 leaves attention logits so small that recall
    # waits long on a plateau); small embeddings keep the tied output logits near uniform.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _check_bidirectional(attention: str) -> None:
    if get(attention).causal_only:
        raise ValueError(f"attention {attention!r} is causal only; the encoder is bidirectional")


class TransformerEncoder(nn.Module):
    """Bidirectional encoder: (B, N, dim) features -> (B, N, dim), with a key padding mask
    and/or packed rows (document_ids). `sinks=True`: a learnable sink per head and layer."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        kv_heads: int | None = None,
        attention: str = "full",
        attention_params: dict[str, Any] | None = None,
        max_seq_len: int = 2048,
        pos: str = "rope",
        norm: str = "rms",
        mlp: str = "swiglu",
        dropout: float = 0.0,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        _check_bidirectional(attention)
        self.stack = _Stack(dim, depth, heads, kv_heads, attention, attention_params,
                            max_seq_len, pos, norm, mlp, dropout, sinks)
        self.apply(_init_weights)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                document_ids: Tensor | None = None) -> Tensor:
        """x: (B, N, dim); key_padding_mask: (B, N) bool, True = real token; document_ids:
        (B, N) integer, equal ids = one document (each encoded as if alone). -> (B, N, dim)."""
        return self.stack(x, causal=False, key_padding_mask=key_padding_mask,
                          document_ids=document_ids)


def _check_vocab(vocab_size: int) -> None:
    require(isinstance(vocab_size, int) and vocab_size >= 1, "vocab_size", vocab_size,
            "a positive int")


class TransformerLM(nn.Module):
    """Decoder-only causal LM with tied input/output embeddings: tokens (B, N) -> logits
    (B, N, vocab_size), on packed rows with `document_ids`. `sinks=True`: a learnable sink
    per head and layer. `short_conv=k` (k >= 1): every attention reads its input through a
    causal depthwise convolution of k taps (`attn_zoo.layers.ShortConv`), which hands each
    position the k - 1 tokens before it (recall then needs one attention hop, not an
    induction pair of layers); 0: none.

    `context_parallel=group` (a `torch.distributed` process group): every rank of the group
    calls `forward` with its contiguous shard of each sequence (shards in rank order) and gets
    the shard's logits; every self-attention runs `attn_zoo.context_parallel` over the group.
    Decoding (`cache`, `generate`) and packed rows (`document_ids`) are not supported then.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        kv_heads: int | None = None,
        attention: str = "full",
        attention_params: dict[str, Any] | None = None,
        max_seq_len: int = 2048,
        pos: str = "rope",
        norm: str = "rms",
        mlp: str = "swiglu",
        dropout: float = 0.0,
        sinks: bool = False,
        short_conv: int = 0,
        context_parallel: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        _check_vocab(vocab_size)
        require(isinstance(short_conv, int) and not isinstance(short_conv, bool)
                and short_conv >= 0, "short_conv", short_conv, "an int >= 0 (0: none)")
        if context_parallel is not None and not isinstance(context_parallel, dist.ProcessGroup):
            raise TypeError(f"context_parallel must be a torch.distributed ProcessGroup or None, "
                            f"got {type(context_parallel).__name__}")
        self.context_parallel = context_parallel
        self.embedding = nn.Embedding(vocab_size, dim)
        self.stack = _Stack(dim, depth, heads, kv_heads, attention, attention_params,
                            max_seq_len, pos, norm, mlp, dropout, sinks,
                            short_conv=short_conv)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, cache: DecodeCache | None = None,
                document_ids: Tensor | None = None) -> Tensor:
        """tokens: (B, N) long -> logits (B, N, vocab_size).

        With `cache` (from `init_cache`), tokens are positions `cache.seen ..`: a prompt, a
        chunk of one, or a single new token. document_ids: (B, N) integer, equal ids = one
        document; each document is modelled as if alone (positions from 0); not with a cache
        (`generate` takes packed prompts). Under context parallelism tokens (B, n_local) are
        this rank's shard -> its logits (B, n_local, vocab_size).
        """
        shards = None
        if self.context_parallel is not None:
            for name, value in (("cache", cache), ("document_ids", document_ids)):
                if value is not None:
                    raise ValueError(f"{name} must be None under context parallelism (decoding "
                                     "and packed rows are not supported), got one")
            shards = Shards.of(tokens.shape[1], self.context_parallel, device=tokens.device)
        x = self.stack(self.embedding(tokens), causal=True, cache=cache,
                       document_ids=document_ids, shards=shards)
        return x @ self.embedding.weight.T

    def init_cache(self) -> DecodeCache:
        """An empty KV cache for `forward` (every variant has one)."""
        return self.stack.init_cache()

    def generate(self, prompt: Tensor, max_new_tokens: int, document_ids: Tensor | None = None,
                 **options: Any) -> Tensor:
        """prompt (B, P) long -> (B, P + new) long, new <= max_new_tokens, through KV caches.

        document_ids: (B, P) integer for packed prompts: the new tokens continue the last
        document of each row (see `attn_zoo.generation.generate_last_documents`).
        options: see `attn_zoo.generation.generate`.
        """
        if self.context_parallel is not None:
            raise ValueError("generate is not supported under context parallelism: build the "
                             "model with context_parallel=None to decode")
        vocab_size = self.embedding.num_embeddings
        with _generating(self):
            if document_ids is None:
                return generation.generate(self, prompt, max_new_tokens, cache=self.init_cache(),
                                           vocab_size=vocab_size, **options)
            return generation.generate_last_documents(
                self, prompt, max_new_tokens, document_ids, new_cache=self.init_cache,
                vocab_size=vocab_size, **options)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder with one shared, tied token embedding.

    forward(source (B, S), target (B, T), source_mask, target_mask) -> logits (B, T, vocab).
    The encoder and the decoder's causal self-attention use `attention`; cross-attention uses
    `full`. Masks are (B, S) / (B, T) bool, True = real token. `sinks=True`: a learnable sink
    per head in every attention (self and cross).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        kv_heads: int | None = None,
        attention: str = "full",
        attention_params: dict[str, Any] | None = None,
        max_seq_len: int = 2048,
        pos: str = "rope",
        norm: str = "rms",
        mlp: str = "swiglu",
        dropout: float = 0.0,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        _check_vocab(vocab_size)
        _check_bidirectional(attention)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.encoder = _Stack(dim, depth, heads, kv_heads, attention, attention_params,
                              max_seq_len, pos, norm, mlp, dropout, sinks)
        self.decoder = _Stack(dim, depth, heads, kv_heads, attention, attention_params,
                              max_seq_len, pos, norm, mlp, dropout, sinks, cross=True)
        self.apply(_init_weights)

    def encode(self, source: Tensor, source_mask: Tensor | None = None) -> Tensor:
        """source (B, S) long -> memory (B, S, dim)."""
        return self.encoder(self.embedding(source), causal=False, key_padding_mask=source_mask)

    def decode(self, target: Tensor, memory: Tensor, source_mask: Tensor | None = None,
               target_mask: Tensor | None = None, cache: DecodeCache | None = None) -> Tensor:
        """target (B, T) long, memory (B, S, dim) -> logits (B, T, vocab_size).

        With `cache` (from `init_cache`, no target_mask): positions `cache.seen ..`, a prompt,
        a chunk of one, or a single new token.
        """
        x = self.decoder(self.embedding(target), causal=True, key_padding_mask=target_mask,
                         context=memory, context_mask=source_mask, cache=cache)
        return x @ self.embedding.weight.T

    def forward(self, source: Tensor, target: Tensor, source_mask: Tensor | None = None,
                target_mask: Tensor | None = None) -> Tensor:
        return self.decode(target, self.encode(source, source_mask), source_mask, target_mask)

    def init_cache(self) -> DecodeCache:
        """An empty decoder cache for `decode`."""
        return self.decoder.init_cache()

    def generate(self, source: Tensor, prompt: Tensor, max_new_tokens: int,
                 source_mask: Tensor | None = None, **options: Any) -> Tensor:
        """source (B, S), prompt (B, P) long (e.g. a start token) -> (B, P + new) long.

        The source is encoded once; options as in `TransformerLM.generate`.
        """
        checked = {key: value for key, value in options.items()
                   if key in generation.CHECKED_OPTIONS}
        # Checked before the encoder runs; `generate` checks the rest.
        generation.check_options(max_new_tokens=max_new_tokens,
                                 vocab_size=self.embedding.num_embeddings, **checked)
        with _generating(self):
            memory = self.encode(source, source_mask)
            context = {"memory": memory, "source_mask": source_mask}
            return generation.generate(self.decode, prompt, max_new_tokens,
                                       cache=self.init_cache(), context=context,
                                       vocab_size=self.embedding.num_embeddings, **options)
