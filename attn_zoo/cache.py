"""Key/value caches for incremental (causal) decoding: one `KVCache` class per attention variant.

A self-attention layer's cache lives through one generation:

    cache = cache_for(attention)        # empty; every registered variant has one
    out = cache.extend(q, k, v)         # T new positions (B, H, T, D) attend to the cache and
                                        # to themselves under the variant's pattern
    out = cache.step(q1, k1, v1)        # extend with T = 1; `prefill` is extend on an empty cache

Keys arrive as the attention sees them (after RoPE). Extending by T positions gives what T
single steps give. A cache class computes each row's output and log-sum-exp (`_extend`);
`extend` applies the attention's learnable sink from them, once, as the forward does. A cache
class declares `bounded = True` when its memory stops growing past the variant's window. A
cache whose class has `exact = True` reproduces the variant's teacher-forced forward: the output
of position i equals row i of `attention(q, k, v, causal=True)` over any longer sequence. The
others state their decode rule in their docstring (bigbird: each row follows the layout of the
prefix that ends at it; lsh, routing: the new query selects cached keys by content).

A variant gets its cache by registering a `KVCache` subclass in its own file:

    @register_cache("myvariant")
    class MyCache(KVCache): ...

Most caches build on the storages here: `GrowingCache` (every position, capacity doubling),
`PatternCache` (a growing cache read through the variant's `allowed(i, j)` pattern of
positions) and `RingCache` (a rolling buffer of the last `ring` positions plus the first
`sinks` positions kept for good, read through the pattern). Shared logic: `attend` (masked or
biased softmax attention of T rows, chunked), `recent_in_group` and `attend_selected`
(content-based selection), `merge_rounds`, `split_at_multiples`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from attn_zoo.attention import Attention, with_sink
from attn_zoo.blocksparse import CHUNK_ELEMENTS, Pattern

_CACHES: dict[str, type[KVCache]] = {}

C = TypeVar("C", bound="type[KVCache]")

Bias = Callable[[int, int], Tensor]
"""bias(t0, t1): for query rows t0 .. t1 - 1 of an `attend` call, a bool `allowed` or a float
additive score bias (-inf = not allowed), broadcastable to (B, Hq, t1 - t0, M)."""


def register_cache(name: str) -> Callable[[C], C]:
    """Class decorator: `cache_for` an attention registered as `name` builds this class."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, KVCache)):
            raise TypeError(f"register_cache({name!r}): {cls!r} is not a subclass of KVCache")
        if name in _CACHES:
            raise ValueError(f"register_cache({name!r}): the name is already taken by "
                             f"{_CACHES[name].__qualname__}")
        _CACHES[name] = cls
        return cls

    return decorator


def cached_variants() -> list[str]:
    """Sorted names of the variants that have a registered cache."""
    return sorted(_CACHES)


def cache_for(attention: Attention) -> KVCache:
    """A fresh, empty cache for causal decoding with `attention`."""
    if not isinstance(attention, Attention):
        raise TypeError(f"attention must be an attn_zoo.Attention, got {type(attention).__name__}")
    name = type(attention).name
    if name not in _CACHES:
        raise ValueError(f"attention {name!r} has no registered cache; caches exist for: "
                         f"{', '.join(cached_variants())}")
    return _CACHES[name](attention)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Bias, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of T queries over M keys under a per-row mask or bias, row-chunked.

    q: (B, Hq, T, D); k, v: (B, Hkv, M, D). Scores `scale * q·k` plus `bias(t0, t1)` (see
    `Bias`), in chunks of rows that hold about `CHUNK_ELEMENTS` scores. Returns out
    (B, Hq, T, D) and lse (B, Hq, T); a row with no allowed key has out 0 and lse -inf.
    """
    batch, q_heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * k.shape[2]))
    queries, keys = q.unflatten(1, (kv_heads, -1)), k.transpose(-1, -2)  # (B, Hkv, G, T, D)
    outs, lses = [], []
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        # One matmul per kv head for its G query heads: (B, Hkv, G * t, M) -> (B, Hq, t, M).
        scores = (queries[:, :, :, t0:t1].flatten(2, 3) @ keys).view(
            batch, q_heads, t1 - t0, -1).mul_(scale)
        extra = bias(t0, t1)
        allowed = extra if extra.dtype == torch.bool else extra > float("-inf")
        if extra.dtype != torch.bool:
            scores += extra.masked_fill(~allowed, 0.0).to(scores.dtype)
        # The maximum over allowed keys. Keys not allowed are zeroed after exp rather than set
        # to -inf before it (exp of -inf is a slow path on CPUs); the clamp keeps exp from
        # overflowing on them, and the fill drops them whatever they hold (inf, NaN).
        top = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
        top = top.masked_fill(top == float("-inf"), 0.0)
        probs = scores.sub_(top).clamp_max_(0.0).exp_().masked_fill_(~allowed, 0.0)
        total = probs.sum(-1, keepdim=True)
        out = (probs.view(batch, kv_heads, -1, probs.shape[-1]) @ v).view(
            batch, q_heads, t1 - t0, dim)
        outs.append(out / total.clamp_min(torch.finfo(total.dtype).tiny))
        lses.append((top + total.log())[..., 0])
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_rounds(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Partial attentions (out (..., T, D), lse (..., T)) merged into one: out = sum_r
    softmax_r(lse_r) o_r and lse = logsumexp_r lse_r; rows empty in every part stay zero
    (lse -inf)."""
    lse = torch.stack([part[1] for part in parts])
    top = lse.amax(0).masked_fill(lse.amax(0) == float("-inf"), 0.0)
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    weights = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
    out = sum(w[..., None] * part[0] for w, part in zip(weights, parts, strict=True))
    return out, top + total.log()


def recent_in_group(groups: Tensor, rows: Tensor, width: int,
                    inclusive: bool) -> tuple[Tensor, Tensor]:
    """Content-based selection: for each row i, the `width` most recent keys j < i (j <= i when
    `inclusive`) of its group (LSH bucket, k-means cluster), newest last.

    groups: (..., M) long, the group of every key position 0 .. M - 1 (rows are key positions
    too, so row i's group is groups[..., i]); rows: (T,) long. Returns index (..., T, width)
    long, the key positions, and valid (..., T, width) bool (False where the group has fewer
    keys). Sorting the keys by (group, position) puts a group's keys side by side in position
    order: a row's selection is the `width` entries before its own, O(T * width) after an
    O(M log M) sort.
    """
    keys = groups.shape[-1]
    order = (groups * keys + torch.arange(keys, device=groups.device)).argsort(dim=-1)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(keys, device=groups.device).expand_as(order))
    own = rank[..., rows]  # (..., T): each row's place in the sorted order
    offsets = torch.arange(-width + (1 if inclusive else 0), 1 if inclusive else 0,
                           device=groups.device)
    place = own[..., None] + offsets  # (..., T, width)
    index = order.gather(-1, place.clamp_min(0).flatten(-2)).view(place.shape)
    row_groups = groups[..., rows, None]
    valid = (place >= 0) & (groups.gather(-1, index.flatten(-2)).view(place.shape) == row_groups)
    return index, valid


def attend_selected(q: Tensor, k: Tensor, v: Tensor, index: Tensor, valid: Tensor,
                    scale: float) -> tuple[Tensor, Tensor]:
    """Each query over its own selected keys, chunked over rows.

    q: (B, Hq, T, D); k: (B, Hq, M, D); v: (B, Hkv, M, D); index, valid: (B, Hq, T, W) (key
    positions, and which of them count). Returns out (B, Hq, T, D) and lse (B, Hq, T); a row
    with no valid key has out 0 and lse -inf.
    """
    batch, heads, rows, dim = q.shape
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    width = index.shape[-1]
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * width * dim))
    outs, lses = [], []
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        chosen = index[:, :, t0:t1].flatten(-2)[..., None].expand(-1, -1, -1, dim)
        keys = k.gather(2, chosen).view(batch, heads, t1 - t0, width, dim)
        values = v.gather(2, chosen).view(batch, heads, t1 - t0, width, dim)
        scores = torch.einsum("bhtd,bhtwd->bhtw", q[:, :, t0:t1] * scale, keys)
        scores = scores.masked_fill(~valid[:, :, t0:t1], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append(torch.einsum("bhtw,bhtwd->bhtd", probs, values))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def work_dtype(x: Tensor) -> torch.dtype:
    """Softmax and accumulation run in float32 (float64 stays float64), as in the variants."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class KVCache(ABC):
    """The state one causal self-attention layer keeps between decoding calls.

    `seen`: positions consumed so far (prompt + generated); the next one is at `seen`.
    `buffers`: the state tensors by name, batch first, which `reorder` and `nbytes` walk.
    Subclasses implement `_extend`.
    """

    exact: ClassVar[bool] = True
    """True when every output equals the variant's teacher-forced forward at that position."""
    bounded: ClassVar[bool] = False
    """True when the cache's memory stays constant once the sequence passes the variant's
    window (a rolling buffer, a capped memory); False when it grows with the sequence."""

    def __init__(self, attention: Attention) -> None:
        self.attention = attention
        self.seen = 0
        self.buffers: dict[str, Tensor] = {}

    def scale(self, dim: int) -> float:
        """The variant's score scale for head_dim `dim`."""
        scale = self.attention.params.scale
        return scale if scale is not None else dim**-0.5

    @abstractmethod
    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Output (B, Hq, T, D) of positions seen .. seen + T - 1 (inputs in the work dtype),
        without the sink, and its log-sum-exp (B, Hq, T) (-inf for a row with no key; routing:
        of the one cluster a row reads); stores what later positions need. `seen` is advanced
        by the caller."""

    @abstractmethod
    def __len__(self) -> int:
        """Key positions held now (exact keys, plus pooled keys where a variant has them)."""

    def extend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, Hq, T, D), k, v (B, Hkv, T, D) of positions seen .. seen + T - 1 -> their
        attention outputs (B, Hq, T, D) in q's dtype."""
        for label, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"{label} must be a (B, H, T, D) tensor, got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
        if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or (
                q.shape[1] % k.shape[1]) or q.shape[2] < 1:
            raise ValueError(f"extend needs q (B, Hq, T, D) and k, v (B, Hkv, T, D) with "
                             f"Hq % Hkv == 0 and T >= 1, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if self.attention.weight_names:
            self.attention.initialize(q.shape[1], k.shape[1], q.shape[3])
        work = work_dtype(q)
        out, lse = self._extend(q.to(work), k.to(work), v.to(work))
        sink = self.attention.sink
        if sink is not None:  # a null key with score sink_h in every row's softmax
            out = with_sink(out, lse, sink[:, None])
        self.seen += q.shape[2]
        return out.to(q.dtype)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`extend` on an empty cache: the prompt, positions 0 .. P - 1."""
        if self.seen:
            raise ValueError(f"prefill needs an empty cache, got one at position {self.seen}")
        return self.extend(q, k, v)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`extend` by the one position `seen` (q (B, Hq, 1, D), k, v (B, Hkv, 1, D))."""
        if q.shape[2] != 1:
            raise ValueError(f"a cache step takes one position, got q {tuple(q.shape)}")
        return self.extend(q, k, v)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order (beam search; may repeat rows)."""
        self.buffers = {name: x.index_select(0, index) for name, x in self.buffers.items()}

    def nbytes(self) -> int:
        """Bytes of the state tensors."""
        return sum(x.numel() * x.element_size() for x in self.buffers.values())


class GrowingCache(KVCache):
    """Every past position, in buffers (B, H, capacity, X) whose capacity doubles (appends
    amortised O(1)): "k" and "v", and whatever else a subclass appends with `_append`.
    """

    def __len__(self) -> int:
        return self.seen

    def _append(self, **new: Tensor) -> None:
        """Write positions seen .. seen + T - 1 of each named (B, H, T, X) tensor."""
        end = self.seen + next(iter(new.values())).shape[2]
        for name, x in new.items():
            old = self.buffers.get(name)
            if old is None or end > old.shape[2]:
                capacity = max(end, 2 * (0 if old is None else old.shape[2]))
                grown = x.new_empty(*x.shape[:2], capacity, *x.shape[3:])
                if old is not None:
                    grown[:, :, :self.seen] = old[:, :, :self.seen]
                self.buffers[name] = old = grown
            old[:, :, self.seen:end] = x

    def held(self, name: str, end: int | None = None) -> Tensor:
        """Buffer `name` over positions 0 .. end - 1 (default: every held position)."""
        return self.buffers[name][:, :, :self.seen if end is None else end]

    def nbytes(self) -> int:
        """Bytes of the held positions (the buffers' spare capacity is not counted)."""
        return sum(self.held(name).numel() * x.element_size()
                   for name, x in self.buffers.items())


class PatternCache(GrowingCache):
    """Every past key on a growing cache; the new rows attend to the keys 0 .. their position
    that the variant's causal `pattern()` allows (full, and the sparse patterns)."""

    @abstractmethod
    def pattern(self) -> Pattern:
        """The causal pattern allowed(i, j) of query position i and key position j."""

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._append(k=k, v=v)
        end = self.seen + q.shape[2]
        rows = torch.arange(self.seen, end, device=q.device)
        keys = torch.arange(end, device=q.device)
        allowed = self.pattern()
        return attend(q, self.held("k", end), self.held("v", end),
                      lambda t0, t1: allowed(rows[t0:t1, None], keys), self.scale(q.shape[3]))


class RingCache(KVCache):
    """The first `sinks` positions kept for good plus a rolling buffer of the last `ring`
    positions: memory independent of the length (and no larger than the sequence so far).

    Position p < sinks lives in slot p, any later one in slot sinks + (p - sinks) % ring;
    `position` (slots,) holds each slot's position (-1: empty). New rows attend to the held
    keys and to each other under the causal `pattern()`, which must never allow a key more than
    `ring - 1` positions older than its query, sinks apart.
    """

    def __init__(self, attention: Attention, sinks: int, ring: int) -> None:
        super().__init__(attention)
        self.sinks, self.ring = sinks, ring
        self.position: Tensor | None = None

    @abstractmethod
    def pattern(self) -> Pattern:
        """The causal pattern allowed(i, j) of query position i and key position j."""

    def nbytes(self) -> int:
        extra = 0 if self.position is None else self.position.numel() * 8
        return super().nbytes() + extra

    def __len__(self) -> int:
        return 0 if self.position is None else int((self.position >= 0).sum())

    def _slots(self, positions: Tensor) -> Tensor:
        return torch.where(positions < self.sinks, positions,
                           self.sinks + (positions - self.sinks) % self.ring)

    def held_positions(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, len(positions), D) of held positions."""
        slots = self._slots(positions)
        return self.buffers["k"][:, :, slots], self.buffers["v"][:, :, slots]

    def _reserve(self, end: int, k: Tensor, v: Tensor) -> None:
        """Slots for the positions before `end`. The buffers grow (doubling) up to their
        sinks + ring slots, so a ring longer than the sequence costs only the sequence; until
        they are full no position has wrapped, so every held position keeps its slot."""
        held, full = 0 if self.position is None else self.position.shape[0], self.sinks + self.ring
        if held >= min(end, full):
            return
        slots = min(full, max(end, 2 * held))
        batch, heads, _, dim = k.shape
        grown = {name: x.new_zeros(batch, heads, slots, dim) for name, x in (("k", k), ("v", v))}
        position = torch.full((slots,), -1, dtype=torch.long, device=k.device)
        if held:
            for name, x in grown.items():
                x[:, :, :held] = self.buffers[name]
            position[:held] = self.position
        self.buffers, self.position = grown, position

    def _attend(self, q: Tensor, k: Tensor, v: Tensor,
                pooled: tuple[Tensor, Tensor, float] | None = None) -> tuple[Tensor, Tensor]:
        """Rows seen .. seen + T - 1 over the held and new keys, and over `pooled` keys and
        values (B, Hkv, P, D) with their score bias, allowed for every row: (out, lse) as
        `attend`; then stores the new keys (the sinks, and the last `ring` of the others)."""
        batch, heads, rows, dim = k.shape
        self._reserve(self.seen + rows, k, v)
        new = torch.arange(self.seen, self.seen + rows, device=k.device)
        keys = torch.cat([self.buffers["k"], k], dim=2)
        values = torch.cat([self.buffers["v"], v], dim=2)
        positions = torch.cat([self.position, new])
        mask = self.pattern()(new[:, None], positions) & (positions >= 0)
        if pooled is None:
            def bias(t0: int, t1: int) -> Tensor:
                return mask[t0:t1]
        else:
            pooled_k, pooled_v, pooled_bias = pooled
            keys, values = torch.cat([keys, pooled_k], 2), torch.cat([values, pooled_v], 2)
            scores = torch.zeros(rows, mask.shape[1] + pooled_k.shape[2], dtype=q.dtype,
                                 device=q.device)
            scores[:, :mask.shape[1]].masked_fill_(~mask, float("-inf"))
            scores[:, mask.shape[1]:] = pooled_bias

            def bias(t0: int, t1: int) -> Tensor:
                return scores[t0:t1]

        result = attend(q, keys, values, bias, self.scale(dim))
        keep = (new < self.sinks) | (new > new[-1] - self.ring)
        slots = self._slots(new[keep])
        self.buffers["k"][:, :, slots] = k[:, :, keep]
        self.buffers["v"][:, :, slots] = v[:, :, keep]
        self.position[slots] = new[keep]
        return result

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self._attend(q, k, v)


def split_at_multiples(start: int, length: int, period: int) -> list[tuple[int, int]]:
    """Pieces [a, b) (offsets from `start`) of positions start .. start + length - 1 that
    never cross a multiple of `period`."""
    pieces, offset = [], 0
    while offset < length:
        position = start + offset
        end = min(length, offset + period - position % period)
        pieces.append((offset, end))
        offset = end
    return pieces


class CrossKV:
    """Keys/values (B, Hkv, M, D) of a cross-attention's context, projected once per generation."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class ConvTail:
    """A layer's short-convolution state while decoding: the inputs of the last kernel - 1
    positions consumed, (B, kernel - 1, dim), zeros before the first position."""

    def __init__(self, kernel: int) -> None:
        self.kernel = kernel
        self.x: Tensor | None = None

    def advance(self, x: Tensor) -> Tensor:
        """The (B, kernel - 1, dim) inputs before x (B, T, dim), the next T positions; then
        holds the last kernel - 1 inputs up to x's last."""
        before = self.x if self.x is not None else x.new_zeros(
            x.shape[0], self.kernel - 1, x.shape[2])
        held = torch.cat([before, x], dim=1)
        self.x = held[:, held.shape[1] - (self.kernel - 1):]
        return before

    def reorder(self, index: Tensor) -> None:
        if self.x is not None:
            self.x = self.x.index_select(0, index)

    def nbytes(self) -> int:
        return 0 if self.x is None else self.x.numel() * self.x.element_size()


class DecodeCache:
    """The caches of a whole model: one `KVCache` per layer, one `CrossKV` per layer with
    cross-attention (encoder-decoder), one `ConvTail` per layer with short convolutions, all
    at the same position `seen`."""

    def __init__(self, layers: list[KVCache], cross: list[CrossKV] | None = None,
                 convs: list[ConvTail] | None = None) -> None:
        self.layers = layers
        self.cross = cross
        self.convs = convs

    @classmethod
    def for_attentions(cls, attentions: list[Attention], cross: bool = False,
                       conv_kernel: int = 0) -> DecodeCache:
        """Caches for these self-attentions (one per layer); conv_kernel: the layers' short
        convolution (0: none)."""
        layers = [cache_for(attention) for attention in attentions]
        return cls(layers, [CrossKV() for _ in layers] if cross else None,
                   [ConvTail(conv_kernel) for _ in layers] if conv_kernel else None)

    @property
    def seen(self) -> int:
        """Positions consumed so far; the next token is at this position."""
        return self.layers[0].seen

    def nbytes(self) -> int:
        """Bytes of every layer's self-attention and short-convolution state (cross-attention
        keys not counted)."""
        return sum(part.nbytes() for part in [*self.layers, *(self.convs or [])])

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) long, in that order, in every layer."""
        for cache in [*self.layers, *(self.cross or []), *(self.convs or [])]:
            cache.reorder(index)
