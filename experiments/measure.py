"""Measuring primitives of the speed app (`experiments.bench`) and the tests: one timing loop,
one memory tracker, the useful-FLOP count, the matmul peak; and the number formatting of the
apps' tables.

* Time: median wall seconds after warm-up runs (`time.perf_counter` on CPU, CUDA events on a
  GPU). Warm-up absorbs compilation and autotuning, so they are never timed.
* Memory: peak bytes allocated by a call above what was live before it. CUDA reads the
  allocator's peak counter; CPU replays the allocation events that `torch.profiler` records,
  an allocation-accurate tracker that earlier measurements in the process cannot pollute.
* FLOPs: the library's `attn.flops(n, head_dim, causal)` counts one (batch, head) forward;
  a forward+backward counts `FWD_BWD_FACTOR` = 3.5 forwards (the forward does two matmuls of
  its size; the backward five, one of them recomputing the scores: 2.5 forwards of work).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

FWD_BWD_FACTOR = 3.5
"""Useful FLOPs of a forward+backward, in forwards (the flash-attention convention)."""

MIB = 1 << 20


# -- time -----------------------------------------------------------------------------------


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median_time(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
) -> float:
    """Median seconds of one `fn()` over `repeats` timed runs after `warmup` untimed ones.

    budget_s: when the last warm-up run shows `repeats` runs would take longer than this, time
    fewer of them (at least one), so that slow points (dense attention at large N) stay
    affordable; needs `warmup >= 1`.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if budget_s is not None and warmup < 1:
        raise ValueError(f"budget_s needs warmup >= 1 to estimate the cost of a run, got {warmup}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for _ in range(warmup):
        last = _time_once(fn, device)
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(last, 1e-9))))
    return statistics.median(_time_once(fn, device) for _ in range(repeats))


# -- memory ---------------------------------------------------------------------------------


def _cpu_peak_memory(fn: Callable[[], Any]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    # The raw event list, not `prof.events()`: FunctionEvents fold the allocations made
    # inside an op into that op's net usage, which hides the op's temporaries.
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes that `fn()` allocates above those live before it, its result included.

    Memory freed during the call that was allocated before it lowers the running total, so
    the growth is never negative.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak_memory(fn, device)
    if device.type == "cpu":
        return _cpu_peak_memory(fn)
    raise ValueError(f"device must be cpu or cuda, got {device}")


# -- FLOPs ----------------------------------------------------------------------------------


def useful_flops(
    attn: Any, n: int, head_dim: int, causal: bool, *, batch: int, heads: int,
    backward: bool = False,
) -> float:
    """Useful FLOPs of a (batch, heads) forward of `attn`, or of a forward+backward.

    attn: anything with the library's `flops(n, head_dim, causal)` (an `attn_zoo.Attention`).
    Divide by a time to get useful FLOP/s.
    """
    per_head = attn.flops(n, head_dim, causal)
    return per_head * batch * heads * (FWD_BWD_FACTOR if backward else 1.0)


def matmul_peak(
    device: torch.device | str = "cpu",
    *,
    size: int | None = None,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
) -> float:
    """Measured matmul throughput in FLOP/s: median of square (size x size) matmuls.

    size defaults to 2048 on CPU and 8192 on CUDA, large enough to reach the plateau.
    Runs under torch's current float32 matmul precision (TF32 only if enabled).
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty_like(a)
    seconds = median_time(lambda: torch.mm(a, b, out=out), device=device, warmup=2,
                          repeats=repeats)
    return 2 * size**3 / seconds


# -- tables ---------------------------------------------------------------------------------


def format_number(x: Any) -> str:
    """Three significant digits without exponents (1235, 12.3, 0.0123); NaN as n/a."""
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x == 0 or math.isinf(x):
            return str(x)
        return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"
    return str(x)


def text_table(frame: pd.DataFrame) -> str:
    """An aligned plain-text table of `frame` (no index)."""
    return frame.to_string(index=False, float_format=format_number, na_rep="n/a")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-markdown table of `frame` (no index), numbers as in `format_number`."""
    rows = [[format_number(value) for value in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    The temporary file has a fixed name, `.<name>.tmp` beside `path`: a killed write leaves
    no litter that the next write does not replace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
