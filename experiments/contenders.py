"""Who computes the attention a bench job times: the contenders registry of `experiments.bench`.

A contender turns a `Setting` (the variant and its parameters, heads, head dim, dtype, device,
direction, layout) into a `Contender`: a forward `(q, k, v, **masks) -> out` per length, built
outside the timing, the variant whose `flops` count its useful work, and the reference its
output is checked against before timing. Each registers itself with `register_contender`.
The layouts (`experiments.bench`): `plain` rows of N tokens, every contender; `packed` (one row
of documents, `masks` = `document_ids`) and `padded` (a row per document, padded to the
longest, `masks` = `key_padding_mask`), the `attn_zoo` contender only (as `sinks`, a
learnable sink per query head): a packed call is checked
against per-document calls of its reference (dense float64 pattern for static variants, the
float64 torch backend for the others), except for content-based variants (lsh, routing), whose
random draws per call only the same packed call in float64 repeats.

* `attn_zoo`: the library's variant on the configured `backend` (auto, torch, triton or the
  library's own `flex`).
* `flex_attention`: torch's compiled `flex_attention`, called directly on the inputs, over the
  variant's `pattern` as a block mask built once per length (static variants only).
* `sdpa`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math`, `sdpa_cudnn`: torch's
  `scaled_dot_product_attention`, with torch's choice of kernel or the one named (a kernel
  the device lacks fails as `unsupported`). SDPA computes dense attention: its rows are the
  `full` variant's, whatever `attention` the job names, as the dense baseline beside it.
* Peers, the `bench` extra (`pip install 'attn-zoo[bench]'`), each doing one variant's work
  with that variant's parameters, projections excluded:
  - `local-attention` (local): `LocalAttention(window_size=window, causal, look_backward=1,
    look_forward=0 or 1, exact_windowsize=True)`, the same pattern.
  - `reformer` (lsh): reformer-pytorch `LSHAttention(bucket_size, n_hashes, causal)` on the
    shared QK `q` and `v` reshaped to (B*H, N, D). Random rotations on every call, like `lsh`:
    checked for shape and finiteness, not equal outputs.
  - `hf_longformer` (longformer, bidirectional, dilation 1, no global tokens): what
    transformers' `LongformerSelfAttention` does between its projections when nothing is
    padded or global: `q / sqrt(D)`, `_sliding_chunks_query_key_matmul` of q and k and of the
    all-zero additive mask, float32 softmax, `masked_fill` of masked rows,
    `_sliding_chunks_matmul_attn_probs_value`; its (B, N, H, D) layout is a transposed view
    of the inputs. N must be a multiple of 2 * window.
  - `hf_bigbird` (bigbird, bidirectional, block b, 3 window blocks, 1 global block, 2 random):
    transformers' `BigBirdBlockSparseAttention.bigbird_block_sparse_attention` with
    `num_random_blocks=1` (HF always has two global blocks, first and last, so a middle query
    visits 6 blocks as ours does), as shipped: eval mode under `no_grad`, train mode (random
    blocks) with gradients. Version 5 builds a dense (B, H, N, N) probability tensor on every
    call; a length where it would not fit in available memory is `oom`, not attempted.
  - `hf_bigbird_no_dense`: the same call with that one `torch.zeros` allocation redirected to
    the meta device (HF's code not copied or edited); forward only.
  A peer whose package is missing gives rows of status `missing` saying what to install.

A contender that does not run the job's variant, backend or direction (a peer of another
variant, the attn_zoo contender on a backend the variant lacks, `flex_attention` of a variant
without a static pattern, an HF peer with `causal=true`) raises `NotApplicable`: such a job of
a product sweep writes no rows.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

import attn_zoo
from attn_zoo.reference import dense_mask, reference_attention
from attn_zoo.registry import get

Forward = Callable[..., Tensor]
"""(q, k, v, **masks) -> out: masks are the layout's `document_ids` or `key_padding_mask`."""
Builder = Callable[["Setting"], "Contender"]
BENCH_EXTRA = "pip install 'attn-zoo[bench]'"
CONTENT_QUANTILE = 0.99
"""Quantile of per-row errors a content-based variant is checked at: near-ties may route a few
rows to other buckets in float64 than in the working precision."""


class NotApplicable(Exception):
    """The contender does not run this variant, parameters or direction."""


class MissingPackage(RuntimeError):
    """A peer's package is not installed; the message says what to install."""


@dataclass(frozen=True)
class Setting:
    """What a bench job asks of a contender (batch varies by length: it is the inputs')."""

    attention: str
    params: Mapping[str, Any]  # the variant's parameters, `backend` excluded
    backend: str
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    layout: str = "plain"
    sinks: bool = False


@dataclass
class Contender:
    """A built contender.

    name: its registry name; resolved_backend: what runs (the library's resolved backend, or
    the contender's name).
    attention, params, backend: its rows' `attention`, `params` and `backend` columns.
    build(n, batch): the forward at length n, its setup (masks, modules) done outside timing.
    counted: the library variant whose `flops(n, head_dim, causal)` counts its useful work.
    reference: float64 `(q, k, v) -> out` it must equal at the check length; None when it
    draws random choices of its own (a shape and finiteness check then).
    reference_name: what `reference` is, for the `check_against` column.
    quantile: the per-row error quantile the check compares (None: the largest error).
    no_backward: why it has no backward (None when it has one).
    layout: n -> the statistics of the kernel's tile layout at n (triton backend only).
    module: the library module it runs, put in train mode for the forward+backward.
    layouts: the layouts it runs (`plain` rows, `packed` documents, `padded` documents).
    sinks: whether it runs with a learnable sink per query head (`Setting.sinks`).
    """

    name: str
    attention: str
    params: dict[str, Any]
    backend: str
    resolved_backend: str
    build: Callable[[int, int], Forward]
    counted: attn_zoo.Attention
    reference: Forward | None
    reference_name: str
    quantile: float | None = None
    no_backward: str | None = None
    layout: Callable[[int], dict[str, Any]] | None = None
    module: torch.nn.Module | None = None
    layouts: tuple[str, ...] = ("plain",)
    sinks: bool = False


CONTENDERS: dict[str, Builder] = {}


def register_contender(name: str) -> Callable[[Builder], Builder]:
    """Register `builder(setting) -> Contender` under `name` (a decorator)."""

    def add(builder: Builder) -> Builder:
        if name in CONTENDERS:
            raise ValueError(f"contender {name!r} is already registered")
        CONTENDERS[name] = builder
        return builder

    return add


def build_contender(name: str, setting: Setting) -> Contender:
    """The contender `name` for `setting`; `NotApplicable` (also for a layout it does not run),
    `MissingPackage` or the error of a combination it rejects otherwise."""
    if name not in CONTENDERS:
        raise ValueError(f"contender must be one of {', '.join(sorted(CONTENDERS))}, "
                         f"got {name!r}")
    contender = CONTENDERS[name](setting)
    if setting.layout not in contender.layouts:
        raise NotApplicable(f"{name} runs the layouts {', '.join(contender.layouts)}, not "
                            f"{setting.layout}")
    if setting.sinks and not contender.sinks:
        raise NotApplicable(f"{name} has no sinks")
    return contender


def require_package(module: str, package: str) -> Any:
    """Import a peer's module; `MissingPackage` naming the package when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackage(f"{package} is not installed ({error}): {BENCH_EXTRA}") from error


# -- the library ----------------------------------------------------------------------------


def library_module(setting: Setting, backend: str = "torch") -> attn_zoo.Attention:
    """`attn_zoo.build(variant, backend=backend, **params)` on the device, in eval mode, with
    a sink per query head when `setting.sinks`, its learned weights created for the setting's
    heads and head dim."""
    sinks = setting.heads if setting.sinks else 0
    attn = attn_zoo.build(setting.attention, backend=backend, sinks=sinks, **setting.params)
    attn.initialize(setting.heads, setting.kv_heads, setting.head_dim)
    return attn.to(setting.device).eval()


def pattern_reference(attn: attn_zoo.Attention, causal: bool) -> Forward:
    """The float64 dense reference over `attn.pattern(n, causal)` with the variant's scale
    (and sink)."""

    def reference(q: Tensor, k: Tensor, v: Tensor,
                  key_padding_mask: Tensor | None = None) -> Tensor:
        n = q.shape[2]
        allowed = dense_mask(attn.pattern(n, causal), n).to(q.device)
        return reference_attention(q, k, v, allowed, scale=attn.params.scale,
                                   key_padding_mask=key_padding_mask, sink=attn.sink)

    return reference


def per_document(call: Forward) -> Forward:
    """`call`, with `document_ids` (1, N): run on each document of the packed row alone, the
    outputs concatenated (without: `call` itself)."""

    def reference(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None,
                  **masks: Tensor) -> Tensor:
        if document_ids is None:
            return call(q, k, v, **masks)
        if document_ids.shape[0] != 1:
            raise ValueError(f"document_ids must be one packed row (1, N), got "
                             f"{tuple(document_ids.shape)}")
        lengths = torch.unique_consecutive(document_ids[0], return_counts=True)[1].tolist()
        parts = zip(*(x.split(lengths, dim=2) for x in (q, k, v)), strict=True)
        return torch.cat([call(*part) for part in parts], dim=2)

    return reference


def library_reference(attn: attn_zoo.Attention, setting: Setting) -> tuple[Forward, str]:
    """(reference, its name): the dense float64 pattern for static variants, else the variant's
    torch backend in float64 with the same state (random draws: the caller seeds both); run
    per document on a packed row, but for content-based variants (their random draws)."""
    suffix = " per document" if setting.layout == "packed" else ""
    if attn.static_pattern:
        return per_document(pattern_reference(attn, setting.causal)), (
            "float64 dense pattern" + suffix)
    twin = attn_zoo.build(attn.name, **attn.params.to_dict() | {"backend": "torch"})
    twin.load_state_dict(attn.state_dict())
    twin = twin.to(device=setting.device, dtype=torch.float64).eval()

    def call(q: Tensor, k: Tensor, v: Tensor, **masks: Tensor) -> Tensor:
        return twin(q, k, v, causal=setting.causal, **masks)

    if attn.content_based:
        return call, "float64 torch backend"
    return per_document(call), "float64 torch backend" + suffix


def layout_stats(attn: attn_zoo.Attention, setting: Setting) -> Callable[[int], dict[str, Any]]:
    """n -> `BlockLayout.stats()` of the tile layout the triton backend runs the pattern on.

    Its cache key is the one `Attention.triton_attention` gives the call over
    `attn.pattern(n, causal)`, so the kernel then finds this layout built.
    """
    from attn_zoo.kernels.block_sparse import tile_config
    from attn_zoo.kernels.layout import cached_layout

    tiles = tile_config(setting.dtype, setting.head_dim, setting.device)
    key = attn._part_key("pattern", setting.causal)

    def stats(n: int) -> dict[str, Any]:
        layout = cached_layout(key, attn.pattern(n, setting.causal), n, n, tiles.block_m,
                               tiles.block_n, setting.device)
        return dict(layout.stats())

    return stats


@register_contender("attn_zoo")
def library(setting: Setting) -> Contender:
    backends = get(setting.attention).backends
    if setting.backend != "auto" and setting.backend not in backends:
        raise NotApplicable(f"{setting.attention} has no {setting.backend} backend (it has "
                            f"{', '.join(backends)})")
    attn = library_module(setting, setting.backend)
    resolved = attn.resolve_backend(setting.device, setting.dtype, setting.head_dim)
    reference, reference_name = library_reference(attn, setting)
    no_backward = None
    if resolved == "flex" and setting.device.type == "cpu":
        no_backward = "FlexAttention has no CPU backward"

    def build(n: int, batch: int) -> Forward:
        return lambda q, k, v, **masks: attn(q, k, v, causal=setting.causal, **masks)

    return Contender(
        "attn_zoo", setting.attention, dict(setting.params), setting.backend, resolved, build,
        attn, reference, reference_name,
        quantile=CONTENT_QUANTILE if attn.content_based else None, no_backward=no_backward,
        layout=layout_stats(attn, setting) if resolved == "triton" and attn.static_pattern
        and setting.layout == "plain" else None, module=attn,
        layouts=("plain", "packed", "padded"), sinks=True)


def allow_recompiles() -> None:
    """Let FlexAttention compile for every (shape, mask) of a job.

    Dynamo recompiles a function at most 8 times by default and then runs it eagerly: an
    unfused FlexAttention, far slower than the compiled one. The limits are lifted, and
    should they be hit anyway the length fails instead of timing the eager fallback.
    """
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (("recompile_limit", 100_000), ("accumulated_recompile_limit", 100_000),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(config, name):
            setattr(config, name, value)


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """`torch.compile(flex_attention)`, once per process (one shape per compile)."""
    from torch.nn.attention.flex_attention import flex_attention

    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


@register_contender("flex_attention")
def raw_flex(setting: Setting) -> Contender:
    from attn_zoo.flex import flex_block_mask

    attn = library_module(setting)
    if not attn.static_pattern:
        raise NotApplicable(f"flex_attention needs a static pattern; {setting.attention} has "
                            "none")
    compiled = compiled_flex_attention()
    scale = attn.params.scale if attn.params.scale is not None else setting.head_dim**-0.5
    gqa = setting.heads != setting.kv_heads

    def build(n: int, batch: int) -> Forward:
        mask = flex_block_mask(attn.pattern(n, setting.causal), None, n, n, setting.device)
        return lambda q, k, v: compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)

    return Contender(
        "flex_attention", setting.attention, dict(setting.params), "", "flex_attention", build,
        attn, pattern_reference(attn, setting.causal), "float64 dense pattern",
        no_backward="FlexAttention has no CPU backward" if setting.device.type == "cpu"
        else None)


# -- SDPA -----------------------------------------------------------------------------------

SDPA_KERNELS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH",
                "sdpa_cudnn": "CUDNN_ATTENTION"}


def sdpa(name: str, setting: Setting) -> Contender:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = attn_zoo.build("full", **(setting.params if setting.attention == "full" else {}))
    full_params = {k: v for k, v in attn.params.to_dict().items()
                   if k not in ("backend", "sinks")}
    kernel = SDPA_KERNELS[name]
    scale, gqa = attn.params.scale, setting.heads != setting.kv_heads

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=setting.causal, scale=scale,
                                              enable_gqa=gqa)

    def build(n: int, batch: int) -> Forward:
        if kernel is None:
            return call

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            try:
                with sdpa_kernel(getattr(SDPBackend, kernel)):
                    return call(q, k, v)
            except RuntimeError as error:
                if "No viable backend" not in str(error):
                    raise
                raise ValueError(f"torch offers no {kernel} SDPA kernel for this call "
                                  f"on {q.device.type}") from error

        return forward

    return Contender(name, "full", full_params, "", name, build, attn,
                     pattern_reference(attn, setting.causal), "float64 dense pattern")


for _name in SDPA_KERNELS:
    register_contender(_name)(lambda setting, name=_name: sdpa(name, setting))


# -- peers ----------------------------------------------------------------------------------


def peer_of(name: str, variant: str, setting: Setting, *, bidirectional_only: bool = False,
            **required: Any) -> attn_zoo.Attention:
    """The library module the peer `name` is compared with: `NotApplicable` unless the job is
    of `variant` (bidirectional when the peer is); `ValueError` for parameters it cannot match
    (`required`: parameter -> the value the peer implements) or grouped-query heads."""
    if setting.attention != variant:
        raise NotApplicable(f"{name} computes {variant} attention, not {setting.attention}")
    if bidirectional_only and setting.causal:
        raise NotApplicable(f"{name} is bidirectional only (causal=false)")
    attn = library_module(setting)
    for param, value in required.items():
        if getattr(attn.params, param) != value:
            raise ValueError(f"{name} implements {variant} with {param}={value} only, got "
                             f"{param}={getattr(attn.params, param)}")
    if setting.heads != setting.kv_heads:
        raise ValueError(f"{name} needs kv_heads == heads, got {setting.kv_heads} and "
                         f"{setting.heads}")
    return attn


@register_contender("local-attention")
def local_attention_peer(setting: Setting) -> Contender:
    attn = peer_of("local-attention", "local", setting, scale=None)
    package = require_package("local_attention", "local-attention")
    window = attn.params.window

    def build(n: int, batch: int) -> Forward:
        return package.LocalAttention(window_size=window, causal=setting.causal, look_backward=1,
                                      look_forward=0 if setting.causal else 1,
                                      exact_windowsize=True, autopad=True).to(setting.device)

    return Contender("local-attention", "local", dict(setting.params), "", "local-attention",
                     build, attn, pattern_reference(attn, setting.causal),
                     "float64 dense pattern")


@register_contender("reformer")
def reformer_peer(setting: Setting) -> Contender:
    attn = peer_of("reformer", "lsh", setting, scale=None)
    package = require_package("reformer_pytorch", "reformer-pytorch")
    params = attn.params

    def build(n: int, batch: int) -> Forward:
        module = package.LSHAttention(bucket_size=params.bucket_size, n_hashes=params.n_hashes,
                                      causal=setting.causal).to(setting.device).eval()

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            b, h, length, dim = q.shape
            out = module(q.reshape(b * h, length, dim), v.reshape(b * h, length, dim))
            return out[0].view(b, h, length, dim)

        return forward

    return Contender("reformer", "lsh", dict(setting.params), "", "reformer", build, attn,
                     None, "shape and finiteness (random rotations differ)")


@register_contender("hf_longformer")
def hf_longformer_peer(setting: Setting) -> Contender:
    attn = peer_of("hf_longformer", "longformer", setting, bidirectional_only=True,
                   dilation=1, n_global=0, scale=None)
    require_package("transformers", "transformers")
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    window, heads, dim = attn.params.window, setting.heads, setting.head_dim
    layer = LongformerSelfAttention(
        LongformerConfig(hidden_size=heads * dim, num_attention_heads=heads,
                         attention_window=[2 * window], attention_probs_dropout_prob=0.0),
        layer_id=0).to(setting.device).eval()

    def build(n: int, batch: int) -> Forward:
        # The model's additive mask (0: local, nothing padded), built once as for all layers.
        attention_mask = torch.zeros(batch, n, device=setting.device)
        is_index_masked = attention_mask < 0

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            query = q.transpose(1, 2) / math.sqrt(dim)  # (B, N, H, D), HF's head layout
            scores = layer._sliding_chunks_query_key_matmul(query, k.transpose(1, 2), window)
            remove = (attention_mask != 0)[:, :, None, None]
            float_mask = remove.type_as(query).masked_fill(remove, torch.finfo(query.dtype).min)
            scores += layer._sliding_chunks_query_key_matmul(
                float_mask.new_ones(size=float_mask.size()), float_mask, window)
            probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
            probs = torch.masked_fill(probs, is_index_masked[:, :, None, None], 0.0)
            probs = torch.nn.functional.dropout(probs.type_as(scores), p=layer.dropout,
                                                training=layer.training)
            out = layer._sliding_chunks_matmul_attn_probs_value(probs, v.transpose(1, 2), window)
            return out.transpose(1, 2)

        return forward

    return Contender("hf_longformer", "longformer", dict(setting.params), "", "hf_longformer",
                     build, attn, pattern_reference(attn, setting.causal),
                     "float64 dense pattern")


HF_BIGBIRD = {"window_blocks": 3, "n_global_blocks": 1, "n_random": 2, "scale": None}
HF_RANDOM_BLOCKS = 1


def available_bytes(device: torch.device) -> int:
    """Bytes free for new allocations: the CUDA allocator's, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def hf_bigbird_build(attn: attn_zoo.Attention, setting: Setting,
                     dense: bool) -> Callable[[int, int], Forward]:
    """n, batch -> HF BigBird's block-sparse call; without `dense`, its dense (B, H, N, N)
    probability tensor is allocated on the meta device, so it carries no data."""
    require_package("transformers", "transformers")
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
        BigBirdModel,
    )

    block, heads, dim = attn.params.block, setting.heads, setting.head_dim
    sparse = BigBirdBlockSparseAttention(BigBirdConfig(
        hidden_size=heads * dim, num_attention_heads=heads, block_size=block,
        num_random_blocks=HF_RANDOM_BLOCKS, attention_probs_dropout_prob=0.0))
    zeros = torch.zeros

    def build(n: int, batch: int) -> Forward:
        dense_bytes = batch * heads * n * n * 4
        free = available_bytes(setting.device)
        if dense and dense_bytes > 0.8 * free:
            # Attempting it could bring the kernel's OOM killer down on the whole run.
            raise torch.OutOfMemoryError(
                f"out of memory: HF BigBird's dense (B, H, N, N) tensor needs "
                f"{dense_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available; not "
                "attempted")
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
            torch.ones(batch, n, device=setting.device), block)

        def zeros_dense_on_meta(*size: Any, **kwargs: Any) -> Tensor:
            if size == (batch, heads, n, n):
                kwargs["device"] = "meta"
            return zeros(*size, **kwargs)

        def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            sparse.train(torch.is_grad_enabled())  # as shipped: random blocks in training
            context, _ = sparse.bigbird_block_sparse_attention(
                q, k, v, band, from_mask, to_mask, blocked, blocked, heads, HF_RANDOM_BLOCKS,
                dim, block, block, batch, n, n, seed=sparse.seed, plan_from_length=None,
                plan_num_rand_blocks=None)
            return context.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D), a view

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if dense:
                return call(q, k, v)
            with mock.patch.object(torch, "zeros", zeros_dense_on_meta):
                return call(q, k, v)

        return forward

    return build


@register_contender("hf_bigbird")
def hf_bigbird_peer(setting: Setting) -> Contender:
    attn = peer_of("hf_bigbird", "bigbird", setting, bidirectional_only=True, **HF_BIGBIRD)
    return Contender("hf_bigbird", "bigbird", dict(setting.params), "", "hf_bigbird",
                     hf_bigbird_build(attn, setting, dense=True), attn, None,
                     "shape and finiteness (random blocks differ)")


@register_contender("hf_bigbird_no_dense")
def hf_bigbird_no_dense_peer(setting: Setting) -> Contender:
    attn = peer_of("hf_bigbird_no_dense", "bigbird", setting, bidirectional_only=True,
                   **HF_BIGBIRD)
    shipped = hf_bigbird_build(attn, setting, dense=True)

    def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """hf_bigbird as shipped under no_grad (eval mode: no random blocks)."""
        with torch.no_grad():
            forward = shipped(q.shape[2], q.shape[0])
            return forward(*(x.to(setting.dtype) for x in (q, k, v))).double()

    return Contender("hf_bigbird_no_dense", "bigbird", dict(setting.params), "",
                     "hf_bigbird_no_dense", hf_bigbird_build(attn, setting, dense=False), attn,
                     reference, "hf_bigbird", no_backward="meta tensors cannot enter autograd")
