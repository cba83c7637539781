"""The `Attention` base class: the contract of the README's contract section, shared by every
variant.

    out = attn(q, k, v, causal=False, key_padding_mask=None, document_ids=None)

q: (B, Hq, N, D); k, v: (B, Hkv, M, D) with Hq % Hkv == 0 (query head h reads kv head
h // (Hq // Hkv)); M == N unless the variant `supports_cross`, and then a causal mask is aligned
bottom-right (query i sees keys j <= i + M - N). key_padding_mask: (B, M) bool, True = a real
key; padded keys never reach an output, whatever they hold. document_ids: (B, N) integers,
equal ids forming one contiguous document (or `cu_seqlens`, FlashAttention's (n_docs + 1,)
offsets of one packed row): the call equals running each document alone. Returns
(B, Hq, N, D) in q's dtype; softmax and accumulation run in float32 (float64 stays float64). A
query with no allowed key returns zeros; B = 0 returns an empty result. Built with `sinks=Hq`,
the module holds a learnable logit `sink` (Hq,) per query head, a null key in every softmax.

A variant subclasses `Attention`, sets `Params` (its typed parameters) and its capability flags
(class attributes below), and implements `_forward_<backend>(q, k, v, causal,
key_padding_mask, scale) -> (out, lse)` for each backend in `backends` (q arrives grouped as
(B, Hkv, G, N, D) in the backend's working dtype, see `working_dtype`; out has that shape, lse
(B, Hkv, G, N) is each row's log-sum-exp, -inf for a row with no key, or None where the
backend applies the sink itself: routing's mean over clusters, FlexAttention's null key),
plus `scored_pairs(n, causal)` for `flops`. The sink is applied here, once, from the lse.

The triton backend runs on CUDA tensors, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, set before the first triton call: kernels are imported on first use).
"""

from __future__ import annotations

import os
from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parameter import UninitializedParameter, is_lazy

from attn_zoo.blocksparse import merge_partial_attentions, part_attention
from attn_zoo.documents import DocumentGroups, DocumentSpans, check_documents
from attn_zoo.flex import flex_block_mask, flex_forward
from attn_zoo.params import Params
from attn_zoo.patterns import Part, Pattern, Reach, every_key, union, union_reach

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class Attention(nn.Module, metaclass=ABCMeta):
    """Base of every attention variant; see the module docstring for the call contract.

    What a variant can do is declared here, as class attributes that tests, benchmarks and
    the registry read (never probed with `hasattr`).
    """

    name: ClassVar[str] = ""
    """The registered name (set by `register`)."""
    Params: ClassVar[type[Params]] = Params
    """The variant's typed parameters; `Params.tiny()` gives small ones for tests."""
    backends: ClassVar[tuple[str, ...]] = ("torch",)
    """The backends it implements, each as `_forward_<backend>`."""
    auto_backends: ClassVar[tuple[str, ...]] = ("triton", "flex")
    """What "auto" runs on a CUDA device: the first of these the variant lists, else torch."""
    half_precision_backends: ClassVar[frozenset[str]] = frozenset({"triton", "flex"})
    """Backends that take bfloat16/float16 inputs as they are (they accumulate in float32
    themselves); the others compute 16-bit inputs in float32. See `working_dtype`."""
    causal_only: ClassVar[bool] = False
    """True when only `causal=True` is defined (calling with False is a ValueError)."""
    supports_cross: ClassVar[bool] = False
    """True when keys may be longer or shorter than queries (M != N)."""
    content_based: ClassVar[bool] = False
    """True when the keys a query sees depend on the content (LSH buckets, k-means clusters)."""
    static_pattern: ClassVar[bool] = False
    """True when `pattern(n, causal)`, a function `allowed(i, j)` of positions, holds every
    (query, key) pair the variant attends to: the flex backend and the dense reference use it."""
    pooled_keys: ClassVar[bool] = False
    """True when queries attend to `exact_pattern(n, causal)` plus pooled keys (block means,
    compressed groups), each counted as one key by `flops`."""
    shared_selection: ClassVar[bool] = False
    """True when the G query heads of one kv head share one content-based selection of keys
    (`nsa`, `topk`): GQA is then not the same as repeating the kv heads."""
    parallel: ClassVar[str] = "heads"
    """How `attn_zoo.context_parallel` splits a call across ranks: "heads" (an all-to-all over
    heads, each rank running the whole sequence for its share of them: for patterns that
    depend on content anywhere), "gather" (each rank gathers the keys its rows' pattern
    reaches) or "ring" (keys travel around the ranks); see `attn_zoo.parallel`."""
    weight_names: ClassVar[tuple[str, ...]] = ()
    """The variant's learned weights besides `sink` (gates, projections): parameters whose
    shapes depend on the heads and head_dim, created by `initialize` (see there)."""
    head_axes: ClassVar[dict[str, str]] = {"sink": "q"}
    """The module's tensors (learned weights, buffers) whose first axis runs over the query
    heads ("q") or the kv heads ("kv"): a call on some heads reads only their entries (see
    `forward_on_heads`). The others (nsa's "mlp" pooling) serve every head alike."""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        known = self.Params.names()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"unknown parameter {', '.join(map(repr, unknown))} for attention {self.name!r}; "
                f"expected: {', '.join(known)}"
            )
        self.params = self.Params(**params)
        sinks = self.params.sinks
        self.register_parameter("sink", nn.Parameter(torch.zeros(sinks)) if sinks else None)
        for name in self.weight_names:  # shapes are known at `initialize`
            self.register_parameter(name, UninitializedParameter())
        self._flex_masks: dict[tuple, object] = {}  # block masks of the flex backend, by shape
        self._sink_score = None  # the flex backend's score_mod of a sink
        backend = self.params.backend
        if backend != "auto" and backend not in self.backends:
            raise ValueError(
                f"backend {backend!r} is not supported by attention {self.name!r}; "
                f"supported: auto, {', '.join(self.backends)}"
            )

    # -- learned weights ------------------------------------------------------------------

    def initialize(self, q_heads: int, kv_heads: int, head_dim: int) -> None:
        """Create the learned weights (`weight_names`) for q_heads query heads, kv_heads kv
        heads and head_dim, once; the backbone calls it at construction, and a standalone
        module's first call does it from its inputs' shapes (build the optimizer after that).
        Weights that exist already (created, or loaded from a checkpoint) must have these
        shapes."""
        shapes = self.weight_shapes(q_heads, kv_heads, head_dim)
        created = False
        for name in self.weight_names:
            weight = getattr(self, name)
            if is_lazy(weight):
                weight.materialize(shapes[name])
                created = True
            elif weight.shape != shapes[name]:
                raise ValueError(
                    f"attention {self.name!r} holds {name} of shape {tuple(weight.shape)}, made "
                    f"for other heads or head_dim; q_heads={q_heads}, kv_heads={kv_heads}, "
                    f"head_dim={head_dim} need {shapes[name]}")
        if created:
            with torch.no_grad():
                self.reset_weights()

    def weight_shapes(self, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of `weight_names` for these heads and head_dim."""
        return {}

    def reset_weights(self) -> None:
        """Give the learned weights their initial values (called once they exist)."""

    def buffer_shapes(self, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, ...]]:
        """The shape of each buffer of `head_axes` for these heads and head_dim."""
        return {}

    def initialize_heads(self, q_heads: int, kv_heads: int, head_dim: int,
                         device: torch.device) -> None:
        """Create what a call with q_heads, kv_heads and head_dim creates on its first run,
        before the module runs on some of those heads: the learned weights (`initialize`), and
        state a variant draws on its first call (routing's centroids), drawn as that call
        would draw it."""
        if self.weight_names:
            self.initialize(q_heads, kv_heads, head_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # Weights not created yet are saved as they are (torch cannot detach them).
        pending = {name: self._parameters[name] for name in self.weight_names
                   if is_lazy(self._parameters[name])}
        self._parameters.update(dict.fromkeys(pending))
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters.update(pending)
        destination.update({prefix + name: weight for name, weight in pending.items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Weights not created yet take their shapes from the checkpoint.
        for name in self.weight_names:
            weight, saved = getattr(self, name), state_dict.get(prefix + name)
            if is_lazy(weight) and saved is not None and not is_lazy(saved):
                weight.materialize(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.params.to_dict().items())

    # -- the call -------------------------------------------------------------------------

    def forward_on_heads(self, kv_start: int, all_kv_heads: int, q: Tensor, k: Tensor,
                         v: Tensor, *, causal: bool = False,
                         key_padding_mask: Tensor | None = None) -> Tensor:
        """The call on some heads of a module made for `all_kv_heads` kv heads: equal to those
        heads of the call on all of them (same random draws, same buffer updates).

        k, v: (B, h, N, D), kv heads kv_start .. kv_start + h - 1; q: (B, h * G, N, D), their
        query heads (G = Hq / Hkv); returns (B, h * G, N, D). The tensors of `head_axes` are
        narrowed to these heads (views: gradients and in-place updates reach the module's
        own), the module run on them by `torch.func.functional_call`.
        """
        heads, groups = k.shape[1], q.shape[1] // k.shape[1]
        if q.shape[1] != heads * groups:
            raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads, got "
                             f"{heads}")
        if not 0 <= kv_start <= all_kv_heads - heads:
            raise ValueError(f"kv heads {kv_start} .. {kv_start + heads - 1} must be among the "
                             f"module's all_kv_heads={all_kv_heads}")
        self.initialize_heads(all_kv_heads * groups, all_kv_heads, q.shape[3], q.device)
        state = {}
        for name, axis in self.head_axes.items():
            tensor = getattr(self, name)
            if tensor is not None:
                per = groups if axis == "q" else 1
                state[name] = tensor.narrow(0, kv_start * per, heads * per)
        return functional_call(self, state, (q, k, v),
                               {"causal": causal, "key_padding_mask": key_padding_mask})

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        self._check(q, k, v, causal, key_padding_mask)
        batch, q_heads, n, dim = q.shape
        documents = check_documents(document_ids, cu_seqlens, batch, n, q.device)
        if documents is not None and k.shape[2] != n:
            raise ValueError(f"document_ids need keys as long as queries (N={n}), got key "
                             f"length {k.shape[2]}")
        if self.weight_names:
            self.initialize(q_heads, k.shape[1], dim)
        backend = self.checked_backend(q.device, q.dtype, dim)
        if batch == 0:  # nothing to attend: an empty result that still carries gradients
            empty = q + (k.sum() + v.sum()).to(q.dtype) * 0
            return empty if self.sink is None else empty + self.sink.sum().to(q.dtype) * 0
        if documents is None:
            return self._attend(backend, q, k, v, causal, key_padding_mask)
        if self.runs_documents_in_place(backend, n, causal):
            spans = DocumentSpans(documents)
            mask = None if key_padding_mask is None else spans.flatten(key_padding_mask)
            out = self._attend(backend, spans.flatten(q), spans.flatten(k), spans.flatten(v),
                               causal, mask, spans)
            return spans.unflatten(out)
        # Documents of one length run together, each as a sequence of its own.
        groups = DocumentGroups(documents)
        masks = (groups.gather(key_padding_mask[:, None])
                 if key_padding_mask is not None else [None] * len(groups.index))
        outs = [self._attend(backend, *inputs, causal, None if mask is None else mask[:, 0])
                for *inputs, mask in zip(groups.gather(q), groups.gather(k), groups.gather(v),
                                         masks, strict=True)]
        return groups.scatter(outs)

    def runs_documents_in_place(self, backend: str, n: int, causal: bool) -> bool:
        """Whether `backend` runs packed rows of length n in one call over document-relative
        positions (`DocumentSpans`); otherwise documents are regrouped by length."""
        return False

    def _attend(self, backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                key_padding_mask: Tensor | None,
                documents: DocumentSpans | None = None) -> Tensor:
        """The call on one batch of whole sequences (checked), or on rows laid end to end
        with their `documents` (for a backend that `runs_documents_in_place`)."""
        batch, q_heads, n, dim = q.shape
        kv_heads = k.shape[1]
        if key_padding_mask is not None:
            k, v = zero_padded(k, v, key_padding_mask)
        work = self.working_dtype(backend, q.dtype)
        grouped = q.to(work).reshape(batch, kv_heads, q_heads // kv_heads, n, dim)
        scale = self.params.scale if self.params.scale is not None else dim**-0.5
        run = getattr(self, f"_forward_{backend}")
        in_place = {} if documents is None else {"documents": documents}
        out, lse = run(grouped, k.to(work), v.to(work), causal, key_padding_mask, scale,
                       **in_place)
        if self.sink is not None and lse is not None:
            out = with_sink(out, lse, self.sink.view(kv_heads, -1, 1))
        return out.reshape(batch, q_heads, n, dim).to(q.dtype)

    def working_dtype(self, backend: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype `backend` receives q, k, v in for inputs of `dtype`: their own, except
        bfloat16/float16 on a backend outside `half_precision_backends`, which gets float32."""
        half = dtype in (torch.bfloat16, torch.float16)
        return torch.float32 if half and backend not in self.half_precision_backends else dtype

    def checked_backend(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
        """`resolve_backend`, and for a configured "triton" the error when it cannot run the
        call ("auto" picks triton only where it runs)."""
        if self.params.backend == "triton":
            refusal = _triton_refusal(device, dtype, head_dim)
            if refusal is not None:
                raise refusal
        return self.resolve_backend(device, dtype, head_dim)

    def resolve_backend(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
        """The backend a call with inputs of `dtype` and `head_dim` on `device` runs: the
        configured one, or for "auto" the first of `auto_backends` the variant has and that
        runs the call (the kernels: a natively compile-checked configuration), else torch."""
        if self.params.backend != "auto":
            return self.params.backend
        if device.type != "cuda":
            return "torch"
        return next((backend for backend in self.auto_backends if backend in self.backends
                     and (backend != "triton"
                          or _triton_refusal(device, dtype, head_dim) is None)), "torch")

    # -- what a variant provides ----------------------------------------------------------

    def _forward_flex(self, q, k, v, causal, key_padding_mask, scale, documents=None):
        """FlexAttention over `self.pattern(n, causal)`, for variants listing "flex"; with
        `documents` (a variant that runs them in place), the pattern kept inside each document
        with document-relative positions, FlexAttention's document mask. A sink is a null key
        prepended to k and v (key 0: value 0, score `sink_h`, seen by every row), so the
        backend applies it itself and returns no lse."""
        n = q.shape[3]
        pattern = self.pattern(n, causal)
        if documents is not None:
            pattern = Part("pattern", pattern, every_key, n).within(documents.starts,
                                                                    documents.ends).pattern
        score_mod = None
        if self.sink is not None:
            k, v = (torch.nn.functional.pad(x, (0, 0, 1, 0)) for x in (k, v))
            if key_padding_mask is not None:
                key_padding_mask = torch.nn.functional.pad(key_padding_mask, (1, 0), value=True)
            pattern = _behind_null_key(pattern)
            score_mod = self._null_key_score()
        m = k.shape[2]
        if key_padding_mask is not None:
            mask = flex_block_mask(pattern, q.shape[0], n, m, q.device, key_padding_mask)
        else:
            key = (n, m, causal, q.device, () if documents is None else documents.key)
            if key not in self._flex_masks:
                self._flex_masks[key] = flex_block_mask(pattern, None, n, m, q.device)
            mask = self._flex_masks[key]
        return flex_forward(q, k, v, mask, scale, score_mod), None

    def _null_key_score(self):
        """The score_mod giving key 0 the score sink_h: one function per module, so compiled
        FlexAttention is not recompiled from call to call."""
        if self._sink_score is None:
            sink = self.sink

            def score_mod(score, b, h, i, j):
                return torch.where(j == 0, sink[h].to(score.dtype), score)

            self._sink_score = score_mod
        return self._sink_score

    def triton_attention(self, q: Tensor, k: Tensor, v: Tensor, part: str, pattern,
                         causal: bool, key_padding_mask: Tensor | None, scale: float,
                         key_bias: Tensor | None = None, reach: Reach | None = None,
                         documents: DocumentSpans | None = None) -> tuple[Tensor, Tensor]:
        """(out, lse) of the block-sparse kernel over the pairs `pattern(i, j)` of q against k.

        q: (B, Hkv, G, N, D); k, v: (B, Hkv, M, D); key_bias: float broadcastable to (B, M).
        The tile layout is built once per (variant, parameters, `part`, causal, N, M, tiles,
        device, document boundaries): `part` names which of the variant's patterns this is;
        `reach` bounds the keys each query may reach, so only those tiles are evaluated.
        """
        from attn_zoo.kernels.block_sparse import layout_attention, tile_config
        from attn_zoo.kernels.layout import cached_layout

        tiles = tile_config(q.dtype, q.shape[-1], q.device)
        layout = cached_layout(self._part_key(part, causal, documents), pattern, q.shape[3],
                               k.shape[2], tiles.block_m, tiles.block_n, q.device, reach)
        return layout_attention(q, k, v, layout, scale=scale, key_padding_mask=key_padding_mask,
                                key_bias=key_bias)

    def _part_key(self, part: str, causal: bool,
                  documents: DocumentSpans | None = None) -> tuple:
        """Identifies one of the variant's patterns (inside `documents` when given) for the
        layout and table caches."""
        where = () if documents is None else documents.key
        return (self.name, tuple(self.params.to_dict().items()), part, causal, where)

    def auxiliary_loss(self) -> Tensor | None:
        """The variant's own training loss from its last training forward (`topk`: the
        indexer loss), which a training loop adds to the model's; None for most variants."""
        return None

    @abstractmethod
    def scored_pairs(self, n: int, causal: bool) -> int:
        """The (query, key) pairs one (batch, head) forward of length n scores, a pooled key
        counting as one."""

    def flops(self, n: int, head_dim: int, causal: bool) -> int:
        """Useful FLOPs of one (batch, head) forward: 4 * head_dim * scored pairs."""
        return 4 * head_dim * self.scored_pairs(n, causal)

    # -- validation -----------------------------------------------------------------------

    def _check(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask) -> None:
        for label, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{label} must have shape (B, H, N, D), got {tuple(x.shape)}")
            if x.dtype not in _FLOATS:
                raise TypeError(f"{label} must be float32, bfloat16, float16 or float64, "
                                f"got {x.dtype}")
            if x.dtype != q.dtype or x.device != q.device:
                raise ValueError(f"{label} must match q's dtype and device ({q.dtype}, "
                                 f"{q.device}), got ({x.dtype}, {x.device})")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and "
                             f"v {tuple(v.shape)}")
        (batch, q_heads, n, dim), (k_batch, kv_heads, m, k_dim) = q.shape, k.shape
        if k_batch != batch:
            raise ValueError(f"k batch size must equal q's ({batch}), got {k_batch}")
        if k_dim != dim:
            raise ValueError(f"k head_dim must equal q's ({dim}), got {k_dim}")
        if n < 1 or m < 1 or dim < 1:
            raise ValueError(f"sequence lengths and head_dim must be >= 1, got q {tuple(q.shape)}"
                             f" and k {tuple(k.shape)}")
        if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
            raise ValueError(f"q heads ({q_heads}) must be a multiple of k heads, both >= 1, "
                             f"got {kv_heads}")
        if m != n and not self.supports_cross:
            raise ValueError(f"attention {self.name!r} needs keys as long as queries "
                             f"(N={n}), got key length {m}")
        if self.sink is not None and self.sink.shape[0] != q_heads:
            raise ValueError(f"attention {self.name!r} was built with sinks={self.sink.shape[0]}"
                             f" (one per query head), got q with {q_heads} heads")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if self.causal_only and not causal:
            raise ValueError(f"attention {self.name!r} is causal only, got causal=False")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor, got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
            if key_padding_mask.shape != (batch, m):
                raise ValueError(f"key_padding_mask must have shape (B, M) = {(batch, m)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask must be on {q.device}, got "
                                 f"{key_padding_mask.device}")


class PatternAttention(Attention, metaclass=ABCMeta):
    """A variant described once, as `parts(n, m, causal)`: disjoint sets of (query, key)
    pairs, each an exact pattern with its reach, or pooled keys with their bias (see
    `attn_zoo.patterns`). The torch engine runs each part and merges them by log-sum-exp;
    the Triton kernel runs the parts over the call's own keys as one layout, and each pooled
    part as one more; causality is intersected here, once, for every part.
    """

    parallel = "gather"
    relative_parts: ClassVar[bool] = False
    """True when no part depends on n: each speaks of positions relative to the sequence
    start (a band, the first tokens). Packed rows whose parts are plain (no pooled keys,
    folding or block layout) then run in one call, every part kept inside each document
    (`Part.within`): tiles only inside documents, layouts cached by document boundaries."""

    @abstractmethod
    def parts(self, n: int, m: int, causal: bool) -> list[Part]:
        """The variant's parts for n queries and m keys, written without causality (`causal`
        only where it changes more than the pairs, e.g. BigBird's random draws)."""

    def engine_parts(self, n: int, m: int, causal: bool,
                     documents: DocumentSpans | None = None) -> list[Part]:
        """`parts` with causality intersected (key j at most i + m - n), inside `documents`
        when given."""
        parts = self.parts(n, m, causal)
        if causal:
            parts = [part.causal(m - n) for part in parts]
        if documents is not None:
            parts = [part.within(documents.starts, documents.ends) for part in parts]
        return parts

    def runs_documents_in_place(self, backend: str, n: int, causal: bool) -> bool:
        return (self.relative_parts and backend in ("torch", "triton", "flex")
                and all(part.pool is None and part.fold == 1 and part.blocks is None
                        for part in self.parts(n, n, causal)))

    def exact_pattern(self, n: int, causal: bool) -> Pattern:
        """The pairs scored exactly, over the call's own keys (pooled keys come on top)."""
        return union(self.engine_parts(n, n, causal))

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale, documents=None):
        n, m = q.shape[3], k.shape[2]
        results = [part_attention(part, q, k, v, key_padding_mask, scale,
                                  self._part_key(part.name, causal, documents))
                   for part in self.engine_parts(n, m, causal, documents)]
        return results[0] if len(results) == 1 else merge_partial_attentions(results)

    def _forward_triton(self, q, k, v, causal, key_padding_mask, scale, documents=None):
        n, m = q.shape[3], k.shape[2]
        parts = self.engine_parts(n, m, causal, documents)
        results = [self.triton_attention(q, k, v, "pattern", union(parts), causal,
                                         key_padding_mask, scale, reach=union_reach(parts),
                                         documents=documents)]
        for part in parts:
            if part.pool is None:
                continue
            # Pooled keys are built in float32 and read by the kernel in q's dtype.
            pooled = part.pool.build(k.float(), v.float(), key_padding_mask)
            results.append(self.triton_attention(
                q, pooled.k.to(q.dtype), pooled.v.to(q.dtype), part.name, part.pattern, causal,
                pooled.real, scale, key_bias=pooled.bias, reach=part.reach))
        if len(results) == 1:
            return results[0]
        return merge_partial_attentions([(out.float(), lse) for out, lse in results])


def _behind_null_key(pattern: Pattern) -> Pattern:
    """`pattern` over keys shifted by one behind a null key 0 that every query sees."""
    return lambda i, j: (j == 0) | pattern(i, j - 1)


def zero_padded(k: Tensor, v: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """k, v (B, Hkv, M, D) with the padded keys (key_padding_mask (B, M) False) set to 0.

    Padded keys may hold anything (inf, NaN, -3e38): zeroed once, O(B * M * D), no score of
    theirs overflows and a zero probability times them stays zero.
    """
    real = key_padding_mask[:, None, :, None]
    return torch.where(real, k, 0.0), torch.where(real, v, 0.0)


def with_sink(out: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """Attention with one more, null key: score `sink`, value 0.

    out (..., N, D) and lse (..., N) of a softmax over some keys; sink broadcastable to lse.
    Returns sum_j exp(s_ij) v_j / (exp(sink) + sum_j exp(s_ij)) = out * sigmoid(lse - sink);
    a row with no key (lse = -inf) stays zero.
    """
    weight = torch.sigmoid(lse - sink.to(lse.dtype))
    return out * weight[..., None].to(out.dtype)


def _triton_refusal(device: torch.device, dtype: torch.dtype, dim: int) -> Exception | None:
    """Why the triton backend cannot run inputs of `dtype` and head dim `dim` on `device`
    (a CUDA device without a checked kernel configuration, or the interpreter's absence
    elsewhere), or None when it can."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return ValueError(f"backend 'triton' needs a CUDA device or TRITON_INTERPRET=1, got "
                          f"tensors on {device}")
    if dtype not in _TRITON_FLOATS:
        return TypeError(f"backend 'triton' takes float32, bfloat16 or float16, got {dtype}")
    if dim % 8 or not 8 <= dim <= 128:
        return ValueError(f"backend 'triton' needs head_dim a multiple of 8 in 8..128, got {dim}")
    from attn_zoo.kernels.launch import arch_family, target_arch

    arch = target_arch(device)
    if arch is not None:
        try:
            arch_family(arch)
        except ValueError as error:
            return error
    return None
