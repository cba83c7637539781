"""`compressive`: segment recurrence with a raw and a compressed memory (Rae et al., 2020).

Causal only. Query i in segment s = i // segment, start = s * segment, attends exactly to
the keys start - mem_len <= j <= i (its segment so far and the raw memory of the mem_len keys
before it), and to a compressed memory: the older keys [0, start - mem_len) in groups
[g * rate, (g + 1) * rate), each pooled into one key/value by `compress`, of which the newest
cmem_len groups count. Pooled keys are scored plainly, `scale * q·k_c`.

`compress`: "mean" (the group's mean), "max" (elementwise max) or "conv": a learned depthwise
strided convolution with kernel = stride = rate whose `rate` taps are shared by every head_dim
channel (one set for keys, `key_conv`, one for values, `value_conv`). Sharing keeps the
parameters independent of head_dim, so they exist at build time and the module round-trips
through state_dict before its first call; the taps start at 1 / rate, i.e. as the mean.

Padding: a group pools its real keys only (mean over them, max over them, conv with padded
keys zeroed) and a group without any is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attn_zoo.attention import Attention, PatternAttention
from attn_zoo.cache import RingCache, register_cache, split_at_multiples
from attn_zoo.params import Params, require
from attn_zoo.patterns import Part, Pattern, Pool, Pooled, and_, causal_pattern
from attn_zoo.registry import register


@dataclass
class CompressiveParams(Params):
    segment: int = 128
    mem_len: int = 256
    cmem_len: int = 64
    rate: int = 4
    compress: Literal["mean", "max", "conv"] = "mean"

    def validate(self) -> None:
        require(self.segment >= 1, "segment", self.segment, ">= 1")
        require(self.mem_len >= 0, "mem_len", self.mem_len, ">= 0")
        require(self.cmem_len >= 0, "cmem_len", self.cmem_len, ">= 0")
        require(self.rate >= 1, "rate", self.rate, ">= 1")
        require(self.segment % self.rate == 0, "segment", self.segment,
                f"a multiple of rate ({self.rate})")
        require(self.mem_len % self.segment == 0, "mem_len", self.mem_len,
                f"a multiple of segment ({self.segment})")

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"segment": 4, "mem_len": 8, "cmem_len": 3, "rate": 2, "compress": "conv"}


def compressive_exact_pattern(segment: int, mem_len: int) -> Pattern:
    """Pairs (i, j) scored exactly: i's segment up to i and the mem_len keys before it."""
    return and_(segment_and_memory(segment, mem_len), causal_pattern())


def segment_and_memory(segment: int, mem_len: int) -> Pattern:
    """j >= start(i) - mem_len, start(i) = i // segment * segment (causality comes on top)."""
    return lambda i, j: j >= i // segment * segment - mem_len


def compressive_pooled_end(segment: int, mem_len: int, rate: int) -> Callable[[Tensor], Tensor]:
    """end(i): the groups g < end(i) lie before query i's raw memory (end <= 0: none).

    start - mem_len is a multiple of rate (segment and mem_len are), so they are complete.
    """

    def end(i: Tensor) -> Tensor:
        return (i // segment * segment - mem_len).div(rate, rounding_mode="floor")

    return end


@register("compressive")
class CompressiveAttention(PatternAttention):
    """Segment and raw memory, plus the N / rate compressed keys as a second part, merged by
    log-sum-exp.

    Work O(N * (mem_len + segment + cmem_len)), the pattern's own count; memory O(N * D)
    plus one chunk of tiles.
    """

    Params = CompressiveParams
    causal_only = True
    backends = ("torch", "triton")
    pooled_keys = True

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.params.compress == "conv":
            rate = self.params.rate
            self.key_conv = nn.Parameter(torch.full((rate,), 1.0 / rate))
            self.value_conv = nn.Parameter(torch.full((rate,), 1.0 / rate))

    def pool_groups(self, x: Tensor, real: Tensor | None, weight: Tensor | None) -> Tensor:
        """The complete groups of `rate` rows of x pooled: (B, H, N, D) -> (B, H, N // rate, D).

        real: (B, N) bool or None; padded rows are left out of a group and a group without
        real rows becomes zeros (it is skipped). weight: the (rate,) taps of "conv".
        """
        rate, mode = self.params.rate, self.params.compress
        length = x.shape[2] // rate * rate
        x = x[:, :, :length]
        if real is not None:
            real = real[:, None, :length, None]
            # where, not a product: padded rows may hold anything, inf included
            x = torch.where(real, x, float("-inf") if mode == "max" else 0.0)
        groups = x.unflatten(2, (-1, rate))  # (B, H, P, rate, D)
        if mode == "conv":
            return torch.einsum("bhprd,r->bhpd", groups, weight.to(x.dtype))
        if real is None:
            return groups.amax(3) if mode == "max" else groups.mean(3)
        counts = real.unflatten(2, (-1, rate)).sum(3)
        if mode == "max":
            return torch.where(counts > 0, groups.amax(3), 0.0)
        return groups.sum(3) / counts.clamp_min(1)

    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        segment, mem_len = self.params.segment, self.params.mem_len
        cmem_len, rate = self.params.cmem_len, self.params.rate

        def memory(i: Tensor) -> tuple[Tensor, Tensor]:
            start = i // segment * segment
            return start - mem_len, start + segment - 1

        parts = [Part("memory", segment_and_memory(segment, mem_len), memory, segment)]
        if cmem_len and (n - 1) // segment * segment - mem_len >= rate:  # a compressed key
            end = compressive_pooled_end(segment, mem_len, rate)

            def newest(i: Tensor, groups: Tensor) -> Tensor:
                last = end(i)
                return (groups < last) & (groups >= last - cmem_len)

            def compressed(i: Tensor) -> tuple[Tensor, Tensor]:
                last = end(i)
                return last - cmem_len, last - 1

            pool = Pool(self._pool, lambda groups: groups * rate + rate - 1, group=rate)
            # The groups a query sees move by segment // rate from one segment to the next:
            # tiles of that size (or of cmem_len, if smaller) cover them without waste.
            parts.append(Part("compressed", newest, compressed, min(cmem_len, segment // rate),
                              pool=pool))
        return parts

    def _pool(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Pooled:
        """The compressed memory: every complete group of k and v pooled, and whether each
        holds a real key."""
        rate, conv = self.params.rate, self.params.compress == "conv"
        pooled_k = self.pool_groups(k, key_padding_mask, self.key_conv if conv else None)
        pooled_v = self.pool_groups(v, key_padding_mask, self.value_conv if conv else None)
        real = None
        if key_padding_mask is not None:
            real = key_padding_mask[:, :pooled_k.shape[2] * rate].unflatten(1, (-1, rate)).any(2)
        return Pooled(pooled_k, pooled_v, None, real)

    def scored_pairs(self, n: int, causal: bool) -> int:
        segment, mem_len = self.params.segment, self.params.mem_len
        cmem_len, rate = self.params.cmem_len, self.params.rate
        pairs = 0
        for start in range(0, n, segment):
            rows = min(segment, n - start)
            first = max(0, start - mem_len)
            compressed = min(cmem_len, max(0, (start - mem_len) // rate))
            # row r sees keys first ... start + r and `compressed` pooled keys
            pairs += rows * (start - first + compressed) + rows * (rows + 1) // 2
        return pairs


# -- decoding cache -------------------------------------------------------------------------


@register_cache("compressive")
class CompressiveCache(RingCache):
    """Raw memory, a rolling buffer of the last mem_len + segment positions, plus the
    compressed memory, the newest cmem_len pooled groups: constant size.

    New positions are taken segment by segment: when segment s starts, the segment of keys
    leaving the raw memory, [start - mem_len - segment, start - mem_len), is pooled in groups of
    `rate` by the variant's own `pool_groups` ("conv" with its learned taps) and appended to the
    compressed memory, of which the newest cmem_len groups stay: the ones the forward lets
    segment s see.
    """

    bounded = True

    def __init__(self, attention: Attention) -> None:
        p = attention.params
        super().__init__(attention, sinks=0, ring=p.mem_len + p.segment)

    def pattern(self) -> Pattern:
        return compressive_exact_pattern(self.attention.params.segment,
                                         self.attention.params.mem_len)

    def __len__(self) -> int:
        pooled = self.buffers.get("pooled_k")
        return super().__len__() + (0 if pooled is None else pooled.shape[2])

    def _compress_leaving_segment(self, start: int) -> None:
        """At the start of the segment at position `start`, compress what leaves raw memory."""
        attention, p = self.attention, self.attention.params
        first = start - p.mem_len - p.segment
        if first < 0 or p.cmem_len == 0:
            return
        positions = torch.arange(first, first + p.segment, device=self.position.device)
        conv = p.compress == "conv"
        weights = (attention.key_conv, attention.value_conv) if conv else (None, None)
        for name, x, weight in zip(("pooled_k", "pooled_v"), self.held_positions(positions),
                                   weights, strict=True):
            pooled = attention.pool_groups(x, None, weight)
            old = self.buffers.get(name)
            merged = pooled if old is None else torch.cat([old, pooled], dim=2)
            self.buffers[name] = merged[:, :, -p.cmem_len:]

    def _extend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        segment, outs = self.attention.params.segment, []
        start = self.seen
        for a, b in split_at_multiples(start, q.shape[2], segment):
            self.seen = start + a
            if self.seen % segment == 0:
                self._compress_leaving_segment(self.seen)
            pooled = None
            if "pooled_k" in self.buffers:
                pooled = (self.buffers["pooled_k"], self.buffers["pooled_v"], 0.0)
            outs.append(self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pooled))
        self.seen = start
        return torch.cat([out for out, _ in outs], dim=2), torch.cat([lse for _, lse in outs], 2)
