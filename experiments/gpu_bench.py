"""attn_zoo's Triton kernels beside FlexAttention and SDPA on a GPU: one call, one results folder.

    python -m experiments.gpu_bench --quick            # N = 8K, 16K, D = 64: a few minutes
    python -m experiments.gpu_bench                    # the full sweep; run again to resume
    python -m experiments.gpu_bench --variants local full --lengths 8192 16384 --dims 128 \\
        --modes fwd --directions causal bidir --max-minutes 5

Points: every selected variant x contender x head_dim x seq_len x direction x mode, where

* contenders: `triton` (`attn_zoo.build(name, backend="triton")`, every variant); `flex`
  (FlexAttention over the variant's own `pattern` as a block mask, built by
  `attn_zoo.flex.flex_block_mask` once per length outside the timing: the static variants,
  `full` included); `sdpa` (`F.scaled_dot_product_attention`, `full` only); `torch` (the torch
  backend, `lsh` only, for the kernel's speedup over it). FlexAttention and SDPA are called
  directly on the inputs in `--dtype` (default bfloat16): through a module, the base class
  would compute them in float32, which is not the reference a fast kernel must beat.
* shape: B = max(1, tokens // N) sequences of N tokens, H = hidden // D heads (defaults 16384
  and 2048: the flash-attention benchmark's convention); k and v have H heads too.
* direction: causal, or bidir (skipped for causal-only variants); mode: fwd (under
  `no_grad`, module in eval mode) or fwd_bwd (gradients of q, k, v for a random output
  gradient, module in train mode).

Per point: `ms`, the median time with CUDA events (`time.perf_counter` on a CPU) of up to
`--repeats` calls after one untimed first call (compilation and autotuning: its wall time is
`first_call_s`) and `--warmup` more; fewer calls when they would exceed `--point-budget`
seconds. `tflops`: useful TFLOP/s, `attn.flops(N, D, causal) * B * H` per forward (only the
allowed pairs), a fwd_bwd counting `measure.FWD_BWD_FACTOR` (3.5) forwards, every contender
counted with its variant's formula; `matmul_peak_tflops` is the device's measured dense
matmul rate in the same dtype. `peak_mib`: `torch.cuda.max_memory_allocated` above what was
live before the call (its output and gradients included).

Before a `triton` series is timed, its output and gradients are compared with the torch
backend's (float32, same inputs) at N = `--check-n` (B=1, H=2): a kernel that disagrees by
more than the dtype's tolerance (relative to the reference's largest magnitude; for the
content-based `lsh` and `routing`, the 99th percentile of per-row errors, as a near-tie may
route a few rows differently) is recorded as `wrong` and not timed.

Tile efficiency (NATTEN's measure: how much of the speedup its tile count promises a sparse
kernel delivers). A `triton` point of a block-sparse variant (local, longformer, bigbird,
sparse_strided, sparse_fixed, full) also records the statistics of the kernel's layout at that
N (`BlockLayout.stats()`: `block_m`, `block_n`, `visited_tiles`, `dense_tiles` =
ceil(N / block_m) * ceil(N / block_n), allowed `pairs`, `density` = visited / dense tiles and
`pair_fill` = pairs / (visited tiles * block_m * block_n)). It is the layout of the variant's
one exact call over `attn.pattern(N, causal)`, the tiles asked of the kernel by
`kernel_tiles` (the kernel's `tile_config` for the dtype, head dim and device); it is built,
or taken from the layout cache the kernel then reads, before the point's first call, so a
point that fails still has it and `first_call_s` no longer includes the build. In
`ratios.csv`, at the same (head_dim, direction, mode, N):

* `tile_sparsity` = 1 - visited_tiles / dense_tiles (of the whole N x N grid, causal or not);
* `dense_kernel_tiles`: the tiles a dense kernel at the same tiles visits: all of them
  (bidir), or those on and below the diagonal, i.e. holding a pair j <= i (causal);
* `predicted_speedup` = dense_kernel_tiles / visited_tiles;
* `achieved_speedup` = `full`'s SDPA time / ours (SDPA, the dense flash kernel, is timed on
  `full` only: it is every variant's dense reference);
* `tile_efficiency` = achieved_speedup / predicted_speedup: 1 when our kernel runs each
  visited tile as fast as SDPA runs a dense tile; for `full` itself it is SDPA time / ours.

A failing point becomes a row with its status (`oom`, `unsupported`, `wrong`, `error`, or
`skipped` for the longer lengths of a series after an `oom`) and the message in `error`; the run
goes on. Rows are appended to `<out>/gpu_bench.csv` (rewritten atomically after each point);
a re-run skips the points that have a row (failed ones too, unless `--retry-failed`), and
stops starting points after `--max-minutes`, so that a long sweep fits several calls of a
10-minute limit. Every call rewrites, from all rows of the CSV: `ratios.csv` (ours / Flex,
ours / SDPA, torch / ours per point), `goals.csv`, `gpu_bench.md` (goals, ratios, time,
TFLOP/s and memory tables, failures) and `plots/<variant>.png` (time and TFLOP/s vs N).
`<out>` defaults to `results/<gpu name>/gpu_bench` (e.g.
`results/nvidia-h100-80gb-hbm3/gpu_bench`).

Goals (the issue's, on an H100), each met / not met / not measured with its worst value and
where: ours / Flex time <= 1.0 at every N >= 8K for local, longformer, bigbird,
sparse_strided and sparse_fixed, fwd and fwd_bwd; full causal fwd at >= 0.8x SDPA's speed at
every N; lsh causal at >= 5x the torch backend's speed at N = 16K (fwd and fwd_bwd); tile
efficiency >= 0.8 for local, longformer and bigbird at every point of tile sparsity >= 0.9
(fwd and fwd_bwd). A point where our kernel failed but the comparator ran fails its goal.

FlexAttention compiles once per shape and mask (`dynamic=False`, as the library's flex
backend): dynamo's limit of 8 recompiles, past which it would silently run an unfused eager
FlexAttention, is lifted. On a CPU device (`--device cpu`, for trying the script) Triton
kernels run in Triton's interpreter and FlexAttention has no backward.

The kernels are the top-level `kernels/` folder, installed as `attn_zoo.kernels` by
`pip install --no-deps --no-build-isolation -e .`; run from a checkout without that install,
the script maps the checkout's `kernels/` to `attn_zoo.kernels` itself.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import math
import os
import pkgutil
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


class CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `attn_zoo.kernels` in the checkout's `kernels/` folder: the mapping that
    pyproject.toml's `package-dir` gives an install, for runs from an uninstalled checkout.

    It sits last on `sys.meta_path`, so an installed `attn_zoo.kernels` always wins.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        init = KERNELS_DIR / "__init__.py"
        if name != "attn_zoo.kernels" or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(KERNELS_DIR)])


if not any(isinstance(finder, CheckoutKernelsFinder) for finder in sys.meta_path):
    sys.meta_path.append(CheckoutKernelsFinder())

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from attn_zoo.kernels.layout import cached_layout  # noqa: E402
from torch import Tensor  # noqa: E402

import attn_zoo  # noqa: E402
from attn_zoo.flex import flex_block_mask, flex_forward  # noqa: E402
from attn_zoo.registry import get  # noqa: E402
from experiments.bench import check_device, classify, environment, progress_line  # noqa: E402
from experiments.measure import (  # noqa: E402
    MIB,
    format_number,
    markdown_table,
    matmul_peak,
    median_time,
    peak_memory,
    print_tables,
    useful_flops,
    write_atomic,
)

VARIANTS = ("local", "longformer", "bigbird", "sparse_strided", "sparse_fixed", "hierarchical",
            "compressive", "full", "lsh", "routing")
IMPLS = ("triton", "flex", "sdpa", "torch")
LENGTHS = tuple(1024 * 2**i for i in range(7))  # 1K .. 64K
QUICK_LENGTHS = (8192, 16384)
DIMS = (64, 128)
QUICK_DIMS = (64,)
MODES = ("fwd", "fwd_bwd")
DIRECTIONS = ("causal", "bidir")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Largest error of a kernel against the float32 torch backend, over the reference's largest
# magnitude. float32 allows for TF32 matmuls inside Triton kernels.
CHECK_TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-2}
CONTENT_QUANTILE = 0.99

CSV_NAME = "gpu_bench.csv"
KEY = ("variant", "impl", "dtype", "head_dim", "seq_len", "batch", "heads", "direction", "mode")
METRICS = ("ms", "tflops", "peak_mib", "first_call_s", "check_error", "matmul_peak_tflops")
LAYOUT_COLUMNS = ("block_m", "block_n", "visited_tiles", "dense_tiles", "pairs", "density",
                  "pair_fill")
INT_COLUMNS = ("head_dim", "seq_len", "batch", "heads")
POINT_INDEX = ["variant", "head_dim", "direction", "mode", "seq_len"]  # ratios, statuses
SETTING_INDEX = ["head_dim", "direction", "mode", "seq_len"]  # a point but its variant
TILE_COLUMNS = ("block_m", "block_n", "visited_tiles", "dense_tiles", "pairs", "pair_fill",
                "tile_sparsity", "dense_kernel_tiles", "predicted_speedup")

FLEX_GOAL_VARIANTS = ("local", "longformer", "bigbird", "sparse_strided", "sparse_fixed")
FLEX_GOAL_MIN_N = 8192
FLEX_GOAL_RATIO = 1.0
SDPA_GOAL_SPEED = 0.8
LSH_GOAL_N = 16384
LSH_GOAL_SPEEDUP = 5.0
# Variants whose triton backend is one block-sparse call over `attn.pattern(N, causal)`.
TILED_VARIANTS = ("local", "longformer", "bigbird", "sparse_strided", "sparse_fixed", "full")
TILE_GOAL_VARIANTS = ("local", "longformer", "bigbird")
TILE_GOAL_SPARSITY = 0.9
TILE_GOAL_EFFICIENCY = 0.8
TILE_EFFICIENCY_TITLE = ("Tile efficiency: speedup over SDPA / speedup the visited tiles predict "
                         "(1: each tile as fast as SDPA's)")

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


class WrongResult(AssertionError):
    """A kernel's output or gradients disagree with the torch backend's."""


# -- points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One measurement: a contender running a variant at one shape, direction and mode."""

    variant: str
    impl: str
    dtype: str
    head_dim: int
    seq_len: int
    batch: int
    heads: int
    direction: str
    mode: str

    @property
    def causal(self) -> bool:
        return self.direction == "causal"

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, column)) for column in KEY)

    @property
    def series(self) -> tuple[str, ...]:
        """The point's key without its length: the points a failure at one length affects."""
        return tuple(value for column, value in zip(KEY, self.key, strict=True)
                     if column not in ("seq_len", "batch"))

    def label(self) -> str:
        return (f"{self.variant}/{self.impl} D={self.head_dim} N={self.seq_len} "
                f"{self.direction} {self.mode}")


def contenders(variant: str) -> tuple[str, ...]:
    """The implementations measured for `variant` (see the module docstring)."""
    cls = get(variant)
    impls = ["triton"]
    if cls.static_pattern:
        impls.append("flex")
    if variant == "full":
        impls.append("sdpa")
    if variant == "lsh":
        impls.append("torch")
    return tuple(impls)


def shape(seq_len: int, head_dim: int, tokens: int, hidden: int) -> tuple[int, int]:
    """(batch, heads): B = max(1, tokens // N) sequences, H = hidden // D heads."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if head_dim < 1 or hidden % head_dim:
        raise ValueError(f"hidden must be a positive multiple of head_dim ({head_dim}), "
                         f"got {hidden}")
    return max(1, tokens // seq_len), hidden // head_dim


def enumerate_points(variants: Iterable[str], impls: Iterable[str], lengths: Iterable[int],
                     dims: Iterable[int], directions: Iterable[str], modes: Iterable[str], *,
                     dtype: str = "bfloat16", tokens: int = 16384,
                     hidden: int = 2048) -> list[Point]:
    """Every point of the selection, ordered by head_dim, length, variant, direction, contender,
    mode; contenders a variant has not, and bidir for causal-only variants, are left out."""
    impls = tuple(impls)
    points = []
    for head_dim in sorted(set(dims)):
        for seq_len in sorted(set(lengths)):
            batch, heads = shape(seq_len, head_dim, tokens, hidden)
            for variant in variants:
                for direction in directions:
                    if direction == "bidir" and get(variant).causal_only:
                        continue
                    for impl in contenders(variant):
                        if impl not in impls:
                            continue
                        points += [Point(variant, impl, dtype, head_dim, seq_len, batch, heads,
                                         direction, mode) for mode in modes]
    return points


# -- the results file -----------------------------------------------------------------------


def read_rows(path: Path) -> pd.DataFrame:
    """The rows of a results CSV (key columns as strings); empty when there is none."""
    if not path.exists():
        return pd.DataFrame(columns=[*KEY, "status", "error", *METRICS, *LAYOUT_COLUMNS])
    rows = pd.read_csv(path, dtype={column: str for column in KEY} | {"error": str},
                       keep_default_na=False, na_values=[""])
    for column in (*METRICS, *LAYOUT_COLUMNS):  # absent while no row had them
        if column not in rows:
            rows[column] = math.nan
    return rows


def row_key(row: Any) -> tuple[str, ...]:
    return tuple(str(row[column]) for column in KEY)


def pending_points(points: Sequence[Point], rows: pd.DataFrame,
                   retry_failed: bool = False) -> list[Point]:
    """The points without a row (or, with `retry_failed`, without an ok row)."""
    done = {row_key(row): row["status"] for _, row in rows.iterrows()}
    return [point for point in points
            if point.key not in done or (retry_failed and done[point.key] != "ok")]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add `row` to the CSV at `path`, replacing a row with the same key, atomically."""
    rows = read_rows(path)
    rows = rows[[row_key(old) != row_key(row) for _, old in rows.iterrows()]]
    fresh = pd.DataFrame([row])
    merged = fresh if rows.empty else pd.concat([rows, fresh], ignore_index=True)
    first = [*KEY, "status", "error", *METRICS, *LAYOUT_COLUMNS]
    order = [c for c in first if c in merged] + [c for c in merged if c not in first]
    write_atomic(path, merged[order].to_csv(index=False))


# -- contenders -----------------------------------------------------------------------------


def allow_recompiles() -> None:
    """Let FlexAttention compile for every (shape, mask) of the sweep.

    Dynamo recompiles a function at most 8 times by default and then runs it eagerly: an
    unfused FlexAttention, far slower than the compiled one. The limits are lifted, and
    should they be hit anyway the point fails instead of timing the eager fallback.
    """
    import torch._dynamo  # slow to import: only runs that use FlexAttention pay for it

    config = torch._dynamo.config
    for name, value in (("recompile_limit", 100_000), ("accumulated_recompile_limit", 100_000),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(config, name):
            setattr(config, name, value)


def kernel_tiles(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(block_m, block_n): the tiles the block-sparse kernel builds its layouts at for inputs
    of `dtype` and `head_dim` on `device` (the one place the benchmark asks the kernel)."""
    # Imported on use: Triton reads TRITON_INTERPRET when the kernel module is first imported.
    from attn_zoo.kernels.block_sparse import tile_config

    tiles = tile_config(dtype, head_dim, device)
    return tiles.block_m, tiles.block_n


class Contenders:
    """Builds each point's forward; modules and block masks are built once and reused."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.modules: dict[tuple[str, str], attn_zoo.Attention] = {}
        self.masks: dict[tuple[str, int, bool], Any] = {}

    def module(self, variant: str, backend: str) -> attn_zoo.Attention:
        """`attn_zoo.build(variant, backend=backend)` on the device (variant defaults)."""
        if (variant, backend) not in self.modules:
            self.modules[variant, backend] = attn_zoo.build(variant, backend=backend).to(
                self.device)
        return self.modules[variant, backend]

    def layout_stats(self, point: Point) -> dict[str, int | float]:
        """`LAYOUT_COLUMNS` of the layout the triton backend runs a `TILED_VARIANTS` point on.

        The cache key is the one `Attention.triton_attention` gives its call over
        `attn.pattern(N, causal)`, so the kernel then finds this layout built; were the keys to
        differ, it would build an equal one.
        """
        if point.variant not in TILED_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(TILED_VARIANTS)}, "
                             f"got {point.variant!r}")
        attn = self.module(point.variant, "triton")
        n, causal = point.seq_len, point.causal
        block_m, block_n = kernel_tiles(DTYPES[point.dtype], point.head_dim, self.device)
        key = (attn.name, tuple(attn.params.to_dict().items()), "pattern", causal)
        stats = cached_layout(key, attn.pattern(n, causal), n, n, block_m, block_n,
                              self.device).stats()
        return {column: stats[column] for column in LAYOUT_COLUMNS}

    def forward(self, point: Point) -> Forward:
        """`(q, k, v) -> out` of the point's contender, q, k, v and out (B, H, N, D)."""
        causal, training = point.causal, point.mode == "fwd_bwd"
        if point.impl in ("triton", "torch"):
            attn = self.module(point.variant, point.impl).train(training)
            return lambda q, k, v: attn(q, k, v, causal=causal)
        if point.impl == "sdpa":
            if point.variant != "full":
                raise ValueError(f"impl 'sdpa' runs the full variant only, got {point.variant}")
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if point.impl == "flex":
            return self.flex(point)
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {point.impl!r}")

    def flex(self, point: Point) -> Forward:
        attn = self.module(point.variant, "torch")
        if not type(attn).static_pattern:
            raise ValueError(f"impl 'flex' needs a static pattern; {point.variant} has none")
        n, causal = point.seq_len, point.causal
        allow_recompiles()
        if (point.variant, n, causal) not in self.masks:
            self.masks[point.variant, n, causal] = flex_block_mask(
                attn.pattern(n, causal), None, n, n, self.device)
        mask = self.masks[point.variant, n, causal]
        scale = attn.params.scale or point.head_dim**-0.5

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return flex_forward(q.unsqueeze(2), k, v, mask, scale).squeeze(2)

        return forward


def relative_error(got: Tensor | None, expected: Tensor | None, quantile: float | None) -> float:
    """Largest absolute error of `got` over `expected`'s largest magnitude (both (..., D));
    with `quantile`, that quantile of the per-row largest errors instead of their maximum."""
    if (got is None) != (expected is None):
        raise WrongResult(f"one side has no gradient: got {got is None}, expected "
                          f"{expected is None}")
    if got is None:
        return 0.0
    got, expected = got.detach().float(), expected.detach().float()
    rows = (got - expected).abs().reshape(-1, got.shape[-1]).amax(-1)
    error = rows.max() if quantile is None else torch.quantile(rows, quantile)
    return float(error / expected.abs().max().clamp_min(1e-12))


def check_against_torch(variant: str, causal: bool, head_dim: int, device: torch.device,
                        dtype: str, n: int, tolerance: float, backend: str = "triton") -> float:
    """The worst relative error of `backend`'s output and q, k, v gradients against the
    float32 torch backend on the same (1, 2, n, head_dim) inputs; `WrongResult` above
    `tolerance`. Content-based variants use a fixed seed and the same buffers on both sides."""
    params = {"seed": 0} if variant == "lsh" else {}
    reference = attn_zoo.build(variant, backend="torch", **params).to(device).eval()
    ours = attn_zoo.build(variant, backend=backend, **params).to(device).eval()
    ours.load_state_dict(reference.state_dict())
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [torch.randn(1, 2, n, head_dim, generator=gen, device=device).to(DTYPES[dtype])
              for _ in range(4)]
    grad_out = inputs.pop()
    results = []
    for attn, work_dtype in ((ours, DTYPES[dtype]), (reference, torch.float32)):
        leaves = [x.detach().to(work_dtype).requires_grad_() for x in inputs]
        torch.manual_seed(0)
        out = attn(*leaves, causal=causal)
        grads = torch.autograd.grad(out, leaves, grad_out.to(work_dtype), allow_unused=True)
        results.append((out, *grads))
    quantile = CONTENT_QUANTILE if get(variant).content_based else None
    errors = {name: relative_error(got, expected, quantile)
              for name, got, expected in zip(("out", "dq", "dk", "dv"), *results, strict=True)}
    worst = max(errors.values())
    if not worst <= tolerance:
        raise WrongResult(f"{backend} differs from the torch backend at N={n}: "
                          + ", ".join(f"{name} {error:.3g}" for name, error in errors.items())
                          + f" (tolerance {tolerance:g})")
    return worst


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Settings:
    """How points are measured (the command line's timing and checking options)."""

    warmup: int = 2
    repeats: int = 20
    point_budget: float = 1.0
    check_n: int = 1000
    check_tolerance: float | None = None
    seed: int = 0


class Inputs:
    """Random q, k, v and an output gradient for the current shape; one shape held at a time."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device, self.seed = device, seed
        self.shape: tuple | None = None
        self.tensors: tuple[Tensor, ...] = ()

    def get(self, point: Point) -> tuple[Tensor, ...]:
        wanted = (point.batch, point.heads, point.seq_len, point.head_dim, point.dtype)
        if wanted != self.shape:
            self.tensors, self.shape = (), None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            self.tensors = tuple(
                torch.randn(wanted[:4], generator=gen, device=self.device, dtype=DTYPES[wanted[4]])
                for _ in range(4))
            self.shape = wanted
        return self.tensors


def timed_call(forward: Forward, point: Point, tensors: Sequence[Tensor]) -> Callable[[], Any]:
    """The call a point times: a forward under `no_grad`, or a forward and backward."""
    q, k, v, grad_out = tensors
    if point.mode == "fwd":
        def infer() -> Tensor:
            with torch.no_grad():
                return forward(q, k, v)

        return infer
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def train_step() -> tuple[Tensor | None, ...]:
        # autograd.grad, not .backward(): nothing accumulates across runs; shared-QK variants
        # leave k unused.
        return torch.autograd.grad(forward(*leaves), leaves, grad_out, allow_unused=True)

    return train_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_point(point: Point, contenders: Contenders, inputs: Inputs, settings: Settings,
                  checks: dict[tuple, float | BaseException]) -> dict[str, Any]:
    """Time, useful TFLOP/s, peak memory of one point (raises when it cannot run)."""
    device = contenders.device
    row: dict[str, Any] = {}
    if point.impl == "triton":
        check = (point.variant, point.causal, point.head_dim)
        if check not in checks:
            tolerance = settings.check_tolerance or CHECK_TOLERANCE[point.dtype]
            try:
                checks[check] = check_against_torch(point.variant, point.causal,
                                                    point.head_dim, device, point.dtype,
                                                    settings.check_n, tolerance)
            except Exception as error:  # every point of the series reports it
                checks[check] = error
        if isinstance(checks[check], BaseException):
            raise checks[check]
        row["check_error"] = checks[check]
    call = timed_call(contenders.forward(point), point, inputs.get(point))
    torch.manual_seed(settings.seed)  # content-based variants draw rotations: the same each run
    synchronize(device)
    begin = time.perf_counter()
    call()
    synchronize(device)
    row["first_call_s"] = time.perf_counter() - begin
    seconds = median_time(call, device=device, warmup=settings.warmup, repeats=settings.repeats,
                          budget_s=settings.point_budget)
    counted = contenders.module(point.variant, "torch")
    flops = useful_flops(counted, point.seq_len, point.head_dim, point.causal,
                         batch=point.batch, heads=point.heads, backward=point.mode == "fwd_bwd")
    return row | {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                  "peak_mib": peak_memory(call, device=device) / MIB}


def device_alive(device: torch.device) -> bool:
    """Whether the device still runs work (a kernel's illegal access poisons a CUDA context)."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
    except Exception:  # any failure here means nothing more can run in this process
        return False
    return True


def one_line(error: BaseException, limit: int = 500) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


# -- goals and tables -----------------------------------------------------------------------


def typed(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with integer shape columns (they are read back as strings)."""
    rows = rows.copy()
    for column in INT_COLUMNS:
        rows[column] = rows[column].astype(int)
    return rows


def dense_kernel_tiles(n: int, block_m: int, block_n: int, causal: bool) -> int:
    """Tiles a dense kernel visits over n queries and n keys at (block_m, block_n): all of them,
    or (causal) those on and below the diagonal, holding a pair j <= i."""
    query_tiles, key_tiles = -(-n // block_m), -(-n // block_n)
    if not causal:
        return query_tiles * key_tiles
    return sum((min(n, (tile + 1) * block_m) - 1) // block_n + 1 for tile in range(query_tiles))


def tile_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per point of a triton row with layout statistics (whatever its status): `TILE_COLUMNS`,
    the tile sparsity and the speedup over a dense kernel its visited tiles predict."""
    if "visited_tiles" not in rows:  # rows of a run that had no tiled triton point
        rows = rows.assign(**dict.fromkeys(LAYOUT_COLUMNS, math.nan))
    tiled = rows[(rows["impl"] == "triton") & rows["visited_tiles"].notna()]
    frame = typed(tiled)[[*POINT_INDEX, *LAYOUT_COLUMNS]].drop_duplicates(POINT_INDEX,
                                                                          keep="last")
    for column in ("block_m", "block_n", "visited_tiles", "dense_tiles", "pairs"):
        frame[column] = frame[column].astype(float).astype("int64")
    frame["pair_fill"] = frame["pair_fill"].astype(float)
    frame["tile_sparsity"] = 1.0 - frame["visited_tiles"] / frame["dense_tiles"]
    frame["dense_kernel_tiles"] = [
        dense_kernel_tiles(n, bm, bn, direction == "causal") for n, bm, bn, direction in zip(
            frame["seq_len"], frame["block_m"], frame["block_n"], frame["direction"],
            strict=True)]
    frame["predicted_speedup"] = frame["dense_kernel_tiles"] / frame["visited_tiles"]
    return frame[[*POINT_INDEX, *TILE_COLUMNS]].reset_index(drop=True)


def full_sdpa(rows: pd.DataFrame, value: str) -> pd.Series:
    """`value` ("ms" or "status") of full's SDPA rows by (head_dim, direction, mode, seq_len):
    the dense reference of every variant at that setting."""
    chosen = typed(rows[(rows["variant"] == "full") & (rows["impl"] == "sdpa")])
    return chosen.drop_duplicates(SETTING_INDEX, keep="last").set_index(SETTING_INDEX)[value]


def ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, head_dim, direction, mode, seq_len): each contender's median ms and
    `triton_over_flex`, `triton_over_sdpa` (ours / theirs: < 1 means ours is faster) and
    `torch_over_triton` (the kernel's speedup over the torch backend), from the ok rows; for
    triton points with layout statistics, `TILE_COLUMNS`, `full_sdpa_ms`, `achieved_speedup`
    and `tile_efficiency` (see the module docstring)."""
    index = POINT_INDEX
    ok = typed(rows[rows["status"] == "ok"])
    if ok.empty:
        times = pd.DataFrame(columns=index)
    else:
        ok = ok.assign(ms=ok["ms"].astype(float))
        times = ok.pivot_table(index=index, columns="impl", values="ms",
                               aggfunc="last").reset_index()
        times.columns.name = None
    for impl in IMPLS:
        if impl not in times:
            times[impl] = math.nan
    frame = times[index].astype({"head_dim": int, "seq_len": int})  # int even when empty
    for impl in IMPLS:
        frame[f"{impl}_ms"] = times[impl].astype(float)
    frame["triton_over_flex"] = frame["triton_ms"] / frame["flex_ms"]
    frame["triton_over_sdpa"] = frame["triton_ms"] / frame["sdpa_ms"]
    frame["torch_over_triton"] = frame["torch_ms"] / frame["triton_ms"]
    frame = frame.merge(tile_frame(rows), on=index, how="left")
    dense = full_sdpa(rows[rows["status"] == "ok"], "ms").astype(float).rename("full_sdpa_ms")
    frame = frame.merge(dense, left_on=SETTING_INDEX, right_index=True, how="left")
    frame["achieved_speedup"] = frame["full_sdpa_ms"] / frame["triton_ms"]
    frame["tile_efficiency"] = frame["achieved_speedup"] / frame["predicted_speedup"]
    return frame.sort_values(index, ignore_index=True)


@dataclass
class GoalCheck:
    """A goal over the points `where` selects: ours vs a comparator, ok at both."""

    goal: str
    comparator: str
    where: Callable[[pd.DataFrame], pd.Series]  # rows of the ratios / statuses frames
    value: Callable[[pd.DataFrame], pd.Series]  # the compared quantity per point
    target: float
    higher_is_better: bool

    def evaluate(self, ratio_frame: pd.DataFrame, status_frame: pd.DataFrame) -> dict[str, Any]:
        """The goal's row: worst value and where, points compared, points where ours failed
        but the comparator ran (they fail the goal), met / not met / not measured."""
        compared = ratio_frame[self.where(ratio_frame)]
        values = self.value(compared).dropna()
        chosen = status_frame[self.where(status_frame)]
        missing = pd.Series(math.nan, index=chosen.index, dtype=object)
        ours, theirs = chosen.get("triton", missing), chosen.get(self.comparator, missing)
        ours_failed = int((ours.notna() & (ours != "ok") & (theirs == "ok")).sum())
        theirs_failed = int((theirs.notna() & (theirs != "ok") & (ours == "ok")).sum())
        passed = values >= self.target if self.higher_is_better else values <= self.target
        op = ">=" if self.higher_is_better else "<="
        row: dict[str, Any] = {"goal": self.goal, "target": f"{op} {self.target:g}",
                               "worst": math.nan, "at": "", "points": len(values),
                               "ours_failed": ours_failed}
        if len(values):
            worst = values.idxmin() if self.higher_is_better else values.idxmax()
            at = compared.loc[worst]
            row |= {"worst": float(values[worst]),
                    "at": f"D={at['head_dim']} N={at['seq_len']} {at['direction']}"}
        if not len(values) and not ours_failed:
            met = "not measured"
        else:
            met = "met" if ours_failed == 0 and bool(passed.all()) else "not met"
        notes = []
        if ours_failed:
            notes.append(f"ours failed at {ours_failed} point(s) where {self.comparator} ran")
        if theirs_failed:
            notes.append(f"{self.comparator} failed at {theirs_failed} point(s) where ours ran")
        return row | {"met": met, "note": "; ".join(notes)}


def goal_checks() -> list[GoalCheck]:
    """The issue's performance goals (on an H100)."""
    checks = []
    for variant in FLEX_GOAL_VARIANTS:
        for mode in MODES:
            checks.append(GoalCheck(
                f"{variant} {mode}: ours / Flex time at N >= {FLEX_GOAL_MIN_N // 1024}K",
                "flex",
                lambda f, variant=variant, mode=mode: (f["variant"] == variant)
                & (f["mode"] == mode) & (f["seq_len"] >= FLEX_GOAL_MIN_N),
                lambda f: f["triton_over_flex"], FLEX_GOAL_RATIO, higher_is_better=False))
    checks.append(GoalCheck(
        "full causal fwd: speed as a fraction of SDPA's (SDPA time / ours)", "sdpa",
        lambda f: (f["variant"] == "full") & (f["mode"] == "fwd") & (f["direction"] == "causal"),
        lambda f: 1.0 / f["triton_over_sdpa"], SDPA_GOAL_SPEED, higher_is_better=True))
    for mode in MODES:
        checks.append(GoalCheck(
            f"lsh causal {mode}: speedup over the torch backend at N={LSH_GOAL_N // 1024}K",
            "torch",
            lambda f, mode=mode: (f["variant"] == "lsh") & (f["mode"] == mode)
            & (f["direction"] == "causal") & (f["seq_len"] == LSH_GOAL_N),
            lambda f: f["torch_over_triton"], LSH_GOAL_SPEEDUP, higher_is_better=True))
    for variant in TILE_GOAL_VARIANTS:
        for mode in MODES:
            checks.append(GoalCheck(
                f"{variant} {mode}: tile efficiency over SDPA at tile sparsity >= "
                f"{TILE_GOAL_SPARSITY:.0%}",
                "full_sdpa",
                lambda f, variant=variant, mode=mode: (f["variant"] == variant)
                & (f["mode"] == mode) & (f["tile_sparsity"] >= TILE_GOAL_SPARSITY),
                lambda f: f["tile_efficiency"], TILE_GOAL_EFFICIENCY, higher_is_better=True))
    return checks


def statuses(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, head_dim, direction, mode, seq_len): each contender's status, `full_sdpa`
    (the status of full's SDPA at the setting) and the triton layout's `tile_sparsity`."""
    index = POINT_INDEX
    if rows.empty:
        return pd.DataFrame(columns=[*index, "full_sdpa", "tile_sparsity"])
    frame = typed(rows).pivot_table(index=index, columns="impl", values="status",
                                    aggfunc="last").reset_index()
    frame.columns.name = None
    frame = frame.merge(full_sdpa(rows, "status").rename("full_sdpa"), left_on=SETTING_INDEX,
                        right_index=True, how="left")
    return frame.merge(tile_frame(rows)[[*index, "tile_sparsity"]], on=index, how="left")


def goals(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per goal: its worst measured value and where, the points compared, met or not."""
    ratio_frame, status_frame = ratios(rows), statuses(rows)
    return pd.DataFrame([check.evaluate(ratio_frame, status_frame) for check in goal_checks()])


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def wide(frame: pd.DataFrame, index: list[str], value: str,
         status: str | None = None) -> pd.DataFrame:
    """`value` as cells of index x seq_len (`length_label` headers); failed points show their
    status when a `status` column is named."""
    if frame.empty:
        return pd.DataFrame(columns=index)
    cells = frame[value].map(format_number)
    if status is not None:
        cells = cells.where(frame[status] == "ok", frame[status])
    table = frame.assign(cell=cells).pivot_table(index=index, columns="seq_len", values="cell",
                                                 aggfunc="last", dropna=False)
    table = table.dropna(how="all").fillna("")
    table.columns = [length_label(n) for n in table.columns]
    return table.reset_index()


def layout_table(rows: pd.DataFrame) -> pd.DataFrame:
    """"sparsity / pair fill" of each tiled variant's layout per direction, tiles and N."""
    frame = tile_frame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["variant", "direction", "tiles"])
    frame = frame.assign(
        tiles=[f"{bm}x{bn}" for bm, bn in zip(frame["block_m"], frame["block_n"], strict=True)],
        cell=[f"{format_number(float(sparsity))} / {format_number(float(fill))}"
              for sparsity, fill in zip(frame["tile_sparsity"], frame["pair_fill"],
                                        strict=True)])
    index = ["variant", "direction", "tiles"]
    return wide(frame.drop_duplicates([*index, "seq_len"]), index, "cell")


def result_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The markdown report's tables, by title, from every row of the results CSV."""
    rows = typed(rows)
    ratio_frame = ratios(rows)
    setting = ["head_dim", "direction", "mode"]
    tables = {"Goals": goals(rows)}
    flex = ratio_frame.dropna(subset=["triton_over_flex"])
    tables["Ours / FlexAttention time (< 1: ours faster)"] = wide(
        flex, ["variant", *setting], "triton_over_flex")
    sdpa = ratio_frame.dropna(subset=["triton_over_sdpa"])
    tables["full: ours / SDPA time (< 1: ours faster)"] = wide(sdpa, setting,
                                                                "triton_over_sdpa")
    torch_backend = ratio_frame.dropna(subset=["torch_over_triton"])
    tables["lsh: torch backend / ours time (speedup of the kernel)"] = wide(
        torch_backend, setting, "torch_over_triton")
    tiled = ratio_frame.dropna(subset=["tile_efficiency"])
    tables[TILE_EFFICIENCY_TITLE] = wide(tiled, ["variant", *setting], "tile_efficiency")
    tables["Tile layouts of the triton kernel: tile sparsity / pair fill"] = layout_table(rows)
    per_point = ["variant", "impl", *setting]
    for title, column in (("Time (ms)", "ms"), ("Useful TFLOP/s", "tflops"),
                          ("Peak memory (MiB)", "peak_mib")):
        tables[title] = wide(rows.assign(**{column: rows[column].astype(float)}), per_point,
                             column, status="status")
    failed = rows[rows["status"] != "ok"]
    failures = failed[[*per_point, "seq_len", "status", "error"]].sort_values(
        [*per_point, "seq_len"], ignore_index=True)
    # A "|" in a message would end its markdown cell.
    tables["Failures"] = failures.assign(error=failures["error"].fillna("").str.replace(
        "|", "/", regex=False))
    return tables


def header(rows: pd.DataFrame, selected: int, missing: int) -> str:
    """The report's title and setting, from the rows' shape and environment columns."""
    rows = typed(rows)
    last = rows.iloc[-1]

    def fact(column: str) -> str:
        value = last.get(column, "")
        return "" if pd.isna(value) else str(value)

    peak = fact("matmul_peak_tflops")
    batches = rows.groupby("seq_len")["batch"].agg(lambda b: "/".join(map(str, sorted(set(b)))))
    hidden = sorted(set(rows["heads"] * rows["head_dim"]))
    done = (f"All {selected} points of the last call's selection are measured." if not missing
            else f"{missing} of the last call's {selected} points are not measured yet: run "
                 "the same command again to continue.")
    return (f"# attn_zoo Triton kernels vs FlexAttention and SDPA ({fact('device_name')})\n\n"
            f"torch {fact('torch_version')}, triton {fact('triton_version')}, CUDA "
            f"{fact('cuda_version') or 'n/a'}, commit {fact('commit')}; measured "
            f"{fact('dtype')} matmul peak "
            f"{format_number(float(peak)) if peak else 'n/a'} TFLOP/s. {done}\n\n"
            f"dtype {', '.join(sorted(set(rows['dtype'])))}; batch B per N: "
            + ", ".join(f"{length_label(n)}: {b}" for n, b in batches.items())
            + f"; H = {'/'.join(map(str, hidden))} // D heads for q, k and v; variants at "
            "their defaults. Time: median of CUDA-event timings (`time.perf_counter` on a CPU) "
            "after warm-up (compilation "
            "and autotuning excluded: `first_call_s` in the CSV). Useful TFLOP/s: "
            "`attn.flops(N, D, causal) * B * H` (allowed pairs only), fwd+bwd = 3.5 "
            "forwards. Peak: `max_memory_allocated` above the inputs, output and gradients "
            "included. Triton rows passed a check of output and gradients against the "
            "float32 torch backend (`check_error`). Tile efficiency: (SDPA time of `full` / "
            "ours) / (dense kernel's tiles / our visited tiles), the dense kernel visiting every "
            "tile (bidir) or those on and below the diagonal (causal), at our tile sizes; tile "
            "sparsity = 1 - visited / all tiles. How everything is measured: "
            "`experiments/gpu_bench.py`.\n")


def plot_variant(rows: pd.DataFrame, variant: str, path: Path) -> None:
    """Time and useful TFLOP/s vs N of every contender of `variant`: one row of two panels
    per (head_dim, mode), a line per (contender, direction); ok points only."""
    ok = typed(rows[(rows["variant"] == variant) & (rows["status"] == "ok")])
    settings = sorted({(int(d), m) for d, m in zip(ok["head_dim"], ok["mode"], strict=True)})
    if not settings:
        return
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)),
                             squeeze=False)
    lengths = sorted(set(ok["seq_len"]))
    for (head_dim, mode), (time_axis, rate_axis) in zip(settings, axes, strict=True):
        chosen = ok[(ok["head_dim"] == head_dim) & (ok["mode"] == mode)]
        for (impl, direction), line in chosen.groupby(["impl", "direction"]):
            line = line.sort_values("seq_len")
            style = {"color": f"C{IMPLS.index(impl)}", "marker": "o",
                     "linestyle": "-" if direction == "causal" else "--",
                     "label": f"{impl} {direction}"}
            time_axis.plot(line["seq_len"], line["ms"].astype(float), **style)
            rate_axis.plot(line["seq_len"], line["tflops"].astype(float), **style)
        time_axis.set(yscale="log", ylabel="ms", title=f"{variant} D={head_dim} {mode}: time")
        rate_axis.set(ylabel="useful TFLOP/s", title=f"{variant} D={head_dim} {mode}: throughput")
        for axis in (time_axis, rate_axis):
            axis.set_xscale("log", base=2)
            axis.set_xticks(lengths, [length_label(n) for n in lengths])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.set_xlabel("N")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save `fig` as a PNG atomically (a temporary file renamed over `path`), then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png",
                                     delete=False) as tmp:
        name = tmp.name
    try:
        fig.savefig(name, dpi=100)
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        os.unlink(name)
        raise
    finally:
        plt.close(fig)


def write_report(out: Path, selected: int, missing: int) -> dict[str, pd.DataFrame]:
    """ratios.csv, goals.csv, gpu_bench.md and plots/ from every row of the results CSV."""
    rows = read_rows(out / CSV_NAME)
    if rows.empty:
        return {}
    tables = result_tables(rows)
    write_atomic(out / "ratios.csv", ratios(rows).to_csv(index=False))
    write_atomic(out / "goals.csv", tables["Goals"].to_csv(index=False))
    sections = [header(rows, selected, missing)]
    sections += [f"## {title}\n\n{markdown_table(table) if not table.empty else 'none'}\n"
                 for title, table in tables.items()]
    write_atomic(out / "gpu_bench.md", "\n".join(sections))
    for variant in sorted(rows["variant"].unique()):
        plot_variant(rows, variant, out / "plots" / f"{variant}.png")
    return tables


# -- the run --------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    """A folder name from a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Path("results") / gpu_slug(name) / "gpu_bench"


def require_kernels(device: torch.device, impls: Sequence[str]) -> None:
    """Fail early, saying what to do, when the Triton kernels cannot be imported."""
    if device.type != "cuda" or "triton" not in impls:
        return
    try:
        package = importlib.import_module("attn_zoo.kernels")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"attn_zoo.kernels.{module.name}")
    except ImportError as error:
        raise RuntimeError(
            f"cannot import the Triton kernels ({error}); from the checkout, run "
            "`pip install --no-deps --no-build-isolation -e .` and try again") from error


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {list(QUICK_LENGTHS)} and dims {list(QUICK_DIMS)} unless "
                             "given")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        metavar="VARIANT", help="default: all of %(choices)s")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        metavar="IMPL", help="contenders, each variant running those it has; "
                                             "default: all of %(choices)s")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help=f"sequence lengths (default {list(LENGTHS)})")
    parser.add_argument("--dims", nargs="+", type=int, default=None,
                        help=f"head dims (default {list(DIMS)})")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="default: %(default)s")
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=["causal"],
                        help="default: %(default)s")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="default: %(default)s")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="B = max(1, tokens // N) (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=2048,
                        help="H = hidden // D (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls after the first, compiling one (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls at most (default %(default)s)")
    parser.add_argument("--point-budget", type=float, default=1.0,
                        help="seconds of timed calls per point: slow points are timed fewer "
                             "times, at least once (default %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="start no new point after this many minutes; run again to resume "
                             "(default %(default)s)")
    parser.add_argument("--check-n", type=int, default=1000,
                        help="length of the triton-vs-torch check (default %(default)s)")
    parser.add_argument("--check-tolerance", type=float, default=None,
                        help=f"relative error the check allows (default by dtype: "
                             f"{CHECK_TOLERANCE})")
    parser.add_argument("--retry-failed", action="store_true",
                        help="measure again the points whose row failed")
    parser.add_argument("--device", default="cuda", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/<gpu name>/gpu_bench)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points still to measure and stop")
    args = parser.parse_args(argv)
    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    args.dims = args.dims or list(QUICK_DIMS if args.quick else DIMS)
    for name, values in (("lengths", args.lengths), ("dims", args.dims)):
        if min(values) < 1:
            parser.error(f"--{name} must be >= 1, got {values}")
    for name, minimum in (("warmup", 1), ("repeats", 1), ("check_n", 1), ("tokens", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, "
                         f"got {getattr(args, name)}")
    for name in ("point_budget", "max_minutes"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    bad_dims = [d for d in args.dims if args.hidden % d]
    if bad_dims:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of every head dim, got "
                     f"{bad_dims}")
    return args


@dataclass
class Outcome:
    """What a call did: points selected, measured now, still missing; the report's tables."""

    selected: int
    measured: int
    missing: int
    out: Path
    tables: dict[str, pd.DataFrame]


def run(args: argparse.Namespace) -> Outcome:
    """Measure the selected points not yet in the results CSV, then rewrite the report."""
    device = check_device(args.device)
    if device.type == "cpu":
        # Triton kernels run on CPU tensors in its interpreter only: a check of the script,
        # not a measurement. The switch is read when the kernels are first used.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = args.out or default_out(device)
    csv = out / CSV_NAME
    points = enumerate_points(args.variants, args.impls, args.lengths, args.dims,
                              args.directions, args.modes, dtype=args.dtype,
                              tokens=args.tokens, hidden=args.hidden)
    pending = pending_points(points, read_rows(csv), args.retry_failed)
    print(f"{len(points)} points selected, {len(points) - len(pending)} already in {csv}, "
          f"{len(pending)} to measure", flush=True)
    if args.dry_run:
        for point in pending:
            print(f"  {point.label()}")
        return Outcome(len(points), 0, len(pending), out, {})
    require_kernels(device, args.impls)
    measured = 0
    if pending:
        measured = sweep(pending, args, device, csv)
    missing = len(pending_points(points, read_rows(csv), args.retry_failed))
    tables = write_report(out, len(points), missing)
    return Outcome(len(points), measured, missing, out, tables)


def sweep(pending: Sequence[Point], args: argparse.Namespace, device: torch.device,
          csv: Path) -> int:
    """Measure points in order until done, out of time, or the device is lost; return how
    many rows were written."""
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    facts = environment(device)
    facts["matmul_peak_tflops"] = matmul_peak(
        device, size=8192 if device.type == "cuda" else 256, dtype=DTYPES[args.dtype]) / 1e12
    contenders, inputs = Contenders(device), Inputs(device, args.seed)
    checks: dict[tuple, float | BaseException] = {}
    skipped_series: dict[tuple[str, ...], str] = {}
    started = time.monotonic()
    written = 0
    for index, point in enumerate(pending):
        if time.monotonic() - started > args.max_minutes * 60:
            print(f"stopping after {args.max_minutes:g} minutes: {len(pending) - index} points "
                  "left; run the same command again to continue", flush=True)
            break
        row = asdict(point) | facts
        if point.series in skipped_series:
            row |= {"status": "skipped", "error": skipped_series[point.series]}
        else:
            try:
                if point.impl == "triton" and point.variant in TILED_VARIANTS:
                    row |= contenders.layout_stats(point)  # kept when the point then fails
                row |= measure_point(point, contenders, inputs, settings, checks)
                row |= {"status": "ok", "error": ""}
            except Exception as error:  # a failing point is a row; the sweep goes on
                status = "wrong" if isinstance(error, WrongResult) else classify(error)
                row |= {"status": status, "error": one_line(error)}
                if status == "oom":
                    skipped_series[point.series] = f"oom at N={point.seq_len}"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        append_row(csv, row)
        written += 1
        what = row["status"] if row["status"] != "ok" else (
            f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s, {row['peak_mib']:.0f} MiB")
        print(progress_line(index + 1, len(pending), time.monotonic() - started,
                            f"{point.label()}: {what}"), flush=True)
        if row["status"] != "ok" and not device_alive(device):
            print(f"the device is unusable after {point.label()} ({row['error']}); its row is "
                  "written: run the same command again to go on with the next point", flush=True)
            break
    return written


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    outcome = run(args)
    if outcome.tables:
        shown = ("Goals", "Ours / FlexAttention time (< 1: ours faster)", TILE_EFFICIENCY_TITLE)
        print_tables({title: outcome.tables[title] for title in shown
                      if not outcome.tables[title].empty}, outcome.out)
    print(f"{outcome.measured} points measured now; {outcome.missing} of {outcome.selected} "
          "selected points still missing" + (": run again to continue" if outcome.missing
                                             else ""), flush=True)


if __name__ == "__main__":
    main()
