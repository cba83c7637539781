"""The speed app: time and memory of one contender across its sequence lengths, per Hydra job.

    python -m experiments.bench attention=lsh seq_len=8192 attention.n_hashes=8   # one point
    python -m experiments.bench -m               # the default sweep: every variant x 1K..16K
    python -m experiments.bench -m bench=cpu_local                 # a preset (conf/bench/)
    python -m experiments.bench -m attention=full,local contender=attn_zoo,sdpa seq_len=[1024,4096]
    python -m experiments.bench -m bench=cpu_packed      # packed vs padded documents

Configs: `conf/bench.yaml` (typed by `experiments.config.BenchConfig`, checked by `validate`
before anything is measured) and the presets `conf/bench/<name>.yaml` (`bench=<name>`). A job
is one contender (`experiments.contenders`: the library on a backend, SDPA, FlexAttention, a
peer package) on one variant with one setting, measured at each length of `seq_len` in
increasing order, for (B, heads, N, D) queries and (B, kv_heads, N, D) keys and values:

* Before timing, the contender's output (and, when the forward+backward is measured and it has
  one, its q, k, v gradients) is checked at N = `check_n` (B=1) against a float64 reference
  (`check_error`: the largest error over the reference's largest magnitude, `check_against`:
  what the reference is). A contender that differs by more than `check_tolerance` (by dtype
  when null) is `wrong` at every length and not timed.
* `fwd_ms`: median forward time (under `no_grad`, eval mode); `fwd_bwd_ms`: median forward +
  backward to q, k and v (train mode). Medians of `repeats` runs after `warmup` runs, fewer
  (at least one) when they would take longer than `budget_s`; CUDA events on a GPU,
  `time.perf_counter` on a CPU; `first_call_s`: the first forward, untimed (compilation,
  autotuning). When `call_limit_s` is set and a first call takes longer, the length is
  `over_budget`.
* `fwd_peak_mib`, `fwd_bwd_peak_mib`: peak memory the call allocates above what was live
  before it (`experiments.measure.peak_memory`); `peak_mem_mib` the larger.
* `fwd_tflops`, `fwd_bwd_tflops`: useful TFLOP/s, `flops(N, D, causal) * B * heads` of the
  variant whose work the contender does per forward, a forward+backward counting
  `measure.FWD_BWD_FACTOR` (3.5) forwards, beside `matmul_peak_tflops` (the device's measured
  matmul rate in the dtype, once per process); `useful_tflops`, `tokens_per_s` of the
  forward+backward when measured, else of the forward.
* `batch`: `batch`, or max(1, `tokens` // N) when `tokens` is set.
* `layout`: `plain` (the above: rows of N tokens), or the same N tokens as `docs` documents of
  random lengths (>= 1, summing to N, drawn from `seed`; `doc_lens`): `packed` in one
  row with `document_ids` (batch 1), `padded` as a row per document, padded to the longest,
  with `key_padding_mask` (batch `docs`). Useful FLOPs and tokens count the documents' own
  (padding does no useful work); the check runs the layout at N = `check_n`, a packed call
  against per-document calls of the reference, padded rows compared at their real tokens.
* `sinks`: the library's variant built with a learnable sink per query head (`sinks=heads`),
  checked against the reference with the null key; `sinks=false,true` measures what they cost.

Each length is one row appended to `<out_dir>/bench.csv` (`experiments.results.Table`: typed
columns, locked appends, so parallel and SLURM jobs share it) with the variant's parameters as
columns and a `params` JSON column, the environment and `status`: ok, oom, unsupported (a
combination the variant or contender rejects), error, wrong (failed the check), missing (a
peer's package: `error` says what to install), over_budget, or skipped (a length after an
oom or over_budget of its series, not attempted). A length whose key (contender, variant,
params, length and the `config.BENCH_AXES`) has a row is not measured again (failed ones
neither, unless `retry_failed=true`), so a re-run resumes a sweep; `dry_run=true` lists the
lengths still to measure; `max_minutes` stops starting lengths after that long in this process.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args, get_type_hints

import hydra
import pandas as pd
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from attn_zoo.registry import get
from experiments import report
from experiments.config import BENCH_AXES, attention_params, register_configs
from experiments.contenders import (
    CONTENDERS,
    Contender,
    MissingPackage,
    NotApplicable,
    Setting,
    build_contender,
)
from experiments.measure import (
    FWD_BWD_FACTOR,
    MIB,
    matmul_peak,
    median_time,
    peak_memory,
    text_table,
    useful_flops,
)
from experiments.results import ENVIRONMENT_COLUMNS, STATUS_COLUMNS, Table, environment, error_row
from experiments.wandb_logger import start_run

log = logging.getLogger(__name__)
# The CPU memory tracker runs torch's profiler, whose kineto backend logs every start and stop
# at its default level; it reads the level when first used.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

CSV_NAME = "bench.csv"
KEY = ("contender", "attention", "params", "seq_len", *BENCH_AXES)
DEFAULTS = {"layout": "plain", "sinks": False}
"""What rows written before a column existed meant (so that they stay done)."""
METRICS = ("fwd_ms", "fwd_bwd_ms", "peak_mem_mib", "fwd_peak_mib", "fwd_bwd_peak_mib",
           "useful_tflops", "fwd_tflops", "fwd_bwd_tflops", "tokens_per_s",
           "matmul_peak_tflops", "first_call_s")
LAYOUT_COLUMNS = {"block_m": int, "block_n": int, "visited_tiles": int, "dense_tiles": int,
                  "pairs": int, "density": float, "pair_fill": float}
COLUMNS: dict[str, type] = {
    "contender": str, "attention": str, "params": str, "seq_len": int, "batch": int,
    "heads": int, "kv_heads": int, "head_dim": int, "dtype": str, "device": str, "causal": bool,
    "backend": str, "mode": str, "layout": str, "docs": int, "doc_lens": str, "sinks": bool,
    **STATUS_COLUMNS, **dict.fromkeys(METRICS, float),
    "check_error": float, "check_n": int, "check_against": str, "resolved_backend": str,
    **LAYOUT_COLUMNS, **ENVIRONMENT_COLUMNS,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 1e-2}
"""Largest relative error a contender may show against the float64 reference, by dtype:
float32 allows for TF32 matmuls inside GPU kernels."""
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STARTED = time.monotonic()


class WrongResult(AssertionError):
    """A contender's output or gradients disagree with the reference."""


class OverBudget(RuntimeError):
    """A first call took longer than `call_limit_s`."""


# -- the configuration ----------------------------------------------------------------------


def seq_lens(cfg: DictConfig) -> list[int]:
    """`seq_len` (one length or a list) as a sorted list without repeats."""
    value = cfg.seq_len
    values = list(value) if isinstance(value, (list, ListConfig)) else [value]
    return sorted(set(values))


def validate(cfg: DictConfig) -> None:
    """`ValueError` naming the first setting that makes no sense, and its value."""

    def require(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {OmegaConf.select(cfg, name)!r}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    value = cfg.seq_len
    values = list(value) if isinstance(value, (list, ListConfig)) else [value]
    require(bool(values) and all(integer(n) and n >= 1 for n in values), "seq_len",
            "a length >= 1 or a non-empty list of them")
    require(str(cfg.out_dir).strip() != "", "out_dir", "a folder path (not empty)")
    require(cfg.contender in CONTENDERS, "contender", f"one of {', '.join(sorted(CONTENDERS))}")
    for name in ("batch", "heads", "kv_heads", "head_dim", "repeats", "check_n", "docs"):
        require(cfg[name] >= 1, name, ">= 1")
    if cfg.layout.name != "plain":
        shortest = min([*values, cfg.check_n])
        require(cfg.docs <= shortest, "docs",
                f"<= every seq_len and check_n ({shortest}) with layout={cfg.layout.name}")
        require(cfg.batch == 1 and cfg.tokens is None, "batch",
                f"1, with tokens null, for layout={cfg.layout.name} (its rows are its documents)")
    require(cfg.heads % cfg.kv_heads == 0, "kv_heads", f"a divisor of heads ({cfg.heads})")
    require(cfg.warmup >= 0, "warmup", ">= 0")
    for name in ("tokens", "threads"):
        require(cfg[name] is None or cfg[name] >= 1, name, ">= 1 or null")
    for name in ("budget_s", "call_limit_s", "check_tolerance", "max_minutes"):
        require(cfg[name] is None or (math.isfinite(cfg[name]) and cfg[name] > 0), name,
                "> 0 and finite, or null")
    require(cfg.budget_s is None or cfg.warmup >= 1, "warmup",
            ">= 1 when budget_s is set (a warm-up run estimates the cost of a run)")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    require(device is not None and device.type in ("cpu", "cuda"), "device",
            "cpu, cuda or cuda:<index>")


def check_device(device: str) -> torch.device:
    """`device` as a torch device; a `RuntimeError` saying why when it cannot be used."""
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device} but no CUDA GPU is visible (torch {torch.__version__}"
                f"{', a CPU-only build' if torch.version.cuda is None else ''}); "
                "use device=cpu or run on a GPU machine")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={device} but only {torch.cuda.device_count()} "
                               "CUDA GPU(s) are visible")
    elif target.type != "cpu":
        raise RuntimeError(f"device must be cpu, cuda or cuda:<index>, got {device}")
    return target


def param_columns(attention: str, params: Mapping[str, Any]) -> dict[str, type]:
    """The variant's parameters as typed columns (the type its `Params` hints, None dropped)."""
    hints = get_type_hints(get(attention).Params)
    columns = {}
    for name in params:
        hint = hints.get(name, str)
        kinds = [kind for kind in (get_args(hint) or (hint,)) if kind is not type(None)]
        columns[name] = kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool) else str
    clash = sorted(set(columns) & set(COLUMNS))
    if clash:
        raise ValueError(f"attention parameters {clash} clash with bench columns")
    return columns


def batch_at(cfg: DictConfig, n: int) -> int:
    if cfg.layout.name != "plain":
        return {"packed": 1, "padded": cfg.docs}[cfg.layout.name]
    return cfg.batch if cfg.tokens is None else max(1, cfg.tokens // n)


def document_lengths(n: int, docs: int, seed: int) -> list[int]:
    """`docs` random lengths >= 1 summing to n: cuts at docs - 1 distinct positions of
    1 .. n - 1 drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(n - 1, generator=generator)[:docs - 1] + 1).sort().values
    return torch.cat([cuts, torch.tensor([n])]).diff(prepend=torch.tensor([0])).tolist()


@dataclasses.dataclass
class Rows:
    """A point's inputs: `batch` rows of `length` positions, the call's `masks`, `real` (B, L)
    bool where the tokens are real (None: every one) and the document lengths (plain: none)."""

    batch: int
    length: int
    masks: dict[str, torch.Tensor]
    real: torch.Tensor | None
    lengths: list[int]


def layout_rows(cfg: DictConfig, n: int, batch: int, device: torch.device) -> Rows:
    """The rows of N tokens in `cfg.layout` (`batch` rows when plain)."""
    if cfg.layout.name == "plain":
        return Rows(batch, n, {}, None, [])
    lengths = document_lengths(n, cfg.docs, cfg.seed)
    if cfg.layout.name == "packed":
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return Rows(1, n, {"document_ids": ids[None].to(device)}, None, lengths)
    real = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).to(device)
    return Rows(len(lengths), max(lengths), {"key_padding_mask": real}, real, lengths)


def counted_flops(contender: Contender, cfg: DictConfig, rows: Rows) -> float:
    """Useful FLOPs of a forward over the rows: the documents' own, or B rows of length L."""
    count = functools.partial(useful_flops, contender.counted, head_dim=cfg.head_dim,
                              causal=bool(cfg.causal), heads=cfg.heads)
    if rows.lengths:
        return sum(count(length, batch=1) for length in rows.lengths)
    return count(rows.length, batch=rows.batch)


# -- checking and measuring -----------------------------------------------------------------


def relative_error(got: torch.Tensor | None, expected: torch.Tensor | None,
                   quantile: float | None) -> float:
    """Largest absolute error of `got` over `expected`'s largest magnitude (both (..., D));
    with `quantile`, that quantile of the per-row largest errors instead of their maximum."""
    if (got is None) != (expected is None):
        raise WrongResult(f"one side has no gradient: got {got is None}, expected "
                          f"{expected is None}")
    if got is None:
        return 0.0
    if got.shape != expected.shape:
        raise WrongResult(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    got, expected = got.detach().double(), expected.detach().double()
    rows = (got - expected).abs().reshape(-1, got.shape[-1]).amax(-1)
    error = rows.max() if quantile is None else torch.quantile(rows, quantile)
    return float(error / expected.abs().max().clamp_min(1e-12))


def check(contender: Contender, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Compare the contender with its reference at N = check_n (B=1 when plain, else the
    layout's rows; padded rows at their real tokens); the check columns, or `WrongResult`
    above the tolerance."""
    n, dtype = cfg.check_n, DTYPES[cfg.dtype.name]
    with_grad = cfg.mode.name != "fwd" and contender.no_backward is None
    rows = layout_rows(cfg, n, 1, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    shapes = [(rows.batch, cfg.heads, rows.length, cfg.head_dim),
              *[(rows.batch, cfg.kv_heads, rows.length, cfg.head_dim)] * 2]
    inputs = [torch.randn(shape, generator=gen, device=device).to(dtype) for shape in shapes]
    grad_out = torch.randn(shapes[0], generator=gen, device=device).to(dtype)
    real = None if rows.real is None else rows.real[:, None, :, None]
    if real is not None:  # padded queries' outputs are no one's: no gradient flows from them
        grad_out = grad_out * real
    forward = contender.build(rows.length, rows.batch)
    results = []
    sides = [(forward, dtype)] + ([] if contender.reference is None
                                  else [(contender.reference, torch.float64)])
    for call, work in sides:
        leaves = [x.detach().to(work).requires_grad_(with_grad) for x in inputs]
        torch.manual_seed(cfg.seed)  # content-based contenders draw the same choices
        with torch.set_grad_enabled(with_grad):
            out = call(*leaves, **rows.masks)
        grads = (torch.autograd.grad(out, leaves, grad_out.to(work), allow_unused=True)
                 if with_grad else ())
        results.append((out if real is None else torch.where(real, out, 0), *grads))
    names = ("out", "dq", "dk", "dv")[:len(results[0])]
    if contender.reference is None:
        got = results[0]
        if got[0].shape != shapes[0]:
            raise WrongResult(f"output shape {tuple(got[0].shape)}, expected {shapes[0]}")
        bad = [name for name, x in zip(names, got, strict=True)
               if x is not None and not torch.isfinite(x).all()]
        if bad:
            raise WrongResult(f"non-finite {', '.join(bad)} at N={n}")
        error = math.nan
    else:
        errors = {name: relative_error(a, b, contender.quantile)
                  for name, a, b in zip(names, *results, strict=True)}
        error = max(errors.values())
        tolerance = cfg.check_tolerance or CHECK_TOLERANCE[cfg.dtype.name]
        if not error <= tolerance:
            raise WrongResult(f"{contender.name} differs from the {contender.reference_name} "
                              f"reference at N={n}: "
                              + ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
                              + f" (tolerance {tolerance:g})")
    return {"check_error": error, "check_n": n, "check_against": contender.reference_name}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable[[], Any], device: torch.device, limit: float | None) -> float:
    """Seconds of one untimed `fn()` (compilation included); `OverBudget` above `limit`."""
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - begin
    if limit is not None and seconds > limit:
        raise OverBudget(f"one call took {seconds:.1f} s > call_limit_s={limit:g}")
    return seconds


def measure_length(contender: Contender, cfg: DictConfig, device: torch.device,
                   n: int, batch: int) -> dict[str, Any]:
    """Times, peak memory and useful TFLOP/s at length n (raises when it cannot run)."""
    dtype, dim = DTYPES[cfg.dtype.name], cfg.head_dim
    rows = layout_rows(cfg, n, batch, device)
    batch, length, masks = rows.batch, rows.length, rows.masks
    forward = contender.build(length, batch)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    q, grad_out = (torch.randn(batch, cfg.heads, length, dim, generator=gen, dtype=dtype,
                               device=device) for _ in range(2))
    k, v = (torch.randn(batch, cfg.kv_heads, length, dim, generator=gen, dtype=dtype,
                        device=device) for _ in range(2))
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats,
              "budget_s": cfg.budget_s}
    forward_flops = counted_flops(contender, cfg, rows)
    tokens = sum(rows.lengths) or batch * n
    row: dict[str, Any] = {} if contender.layout is None else {
        name: value for name, value in contender.layout(n).items() if name in LAYOUT_COLUMNS}
    torch.manual_seed(cfg.seed)  # content-based contenders draw the same choices every run
    notes = []
    if cfg.mode.name in ("fwd", "both"):
        train(contender, False)

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return forward(q, k, v, **masks)

        row["first_call_s"] = first_call(infer, device, cfg.call_limit_s)
        seconds = median_time(infer, **timing)
        peak = peak_memory(infer, device=device) / MIB
        tflops = forward_flops / seconds / 1e12
        row |= {"fwd_ms": seconds * 1e3, "fwd_peak_mib": peak, "fwd_tflops": tflops,
                "peak_mem_mib": peak, "useful_tflops": tflops,
                "tokens_per_s": tokens / seconds}
    if cfg.mode.name in ("fwd_bwd", "both"):
        if contender.no_backward is not None:
            notes.append(f"fwd_bwd unavailable: {contender.no_backward}")
        else:
            train(contender, True)
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def train_step() -> tuple[torch.Tensor | None, ...]:
                # autograd.grad, not .backward(): nothing accumulates across runs; shared-QK
                # contenders leave k unused.
                return torch.autograd.grad(forward(*leaves, **masks), leaves, grad_out,
                                           allow_unused=True)

            first = first_call(train_step, device, cfg.call_limit_s)
            row.setdefault("first_call_s", first)
            seconds = median_time(train_step, **timing)
            peak = peak_memory(train_step, device=device) / MIB
            tflops = forward_flops * FWD_BWD_FACTOR / seconds / 1e12
            row |= {"fwd_bwd_ms": seconds * 1e3, "fwd_bwd_peak_mib": peak,
                    "fwd_bwd_tflops": tflops, "useful_tflops": tflops,
                    "peak_mem_mib": max(peak, row.get("fwd_peak_mib", 0.0)),
                    "tokens_per_s": tokens / seconds}
            train(contender, False)
    return row | {"status": "ok", "error": "; ".join(notes)}


def train(contender: Contender, mode: bool) -> None:
    """Train mode for the forward+backward (a training step), eval mode otherwise."""
    if contender.module is not None:
        contender.module.train(mode)


@functools.cache
def cached_matmul_peak(device: torch.device, dtype: str) -> float:
    """The device's measured matmul rate in TFLOP/s, once per process, device and dtype."""
    return matmul_peak(device, dtype=DTYPES[dtype]) / 1e12


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


# -- the job --------------------------------------------------------------------------------


def prepare(cfg: DictConfig) -> tuple[dict[str, Any], Contender | None, torch.device | None,
                                      dict[str, str] | None]:
    """(identity, contender, device, failure) of the job: the columns that name its rows
    (`attention`, `params`, `backend` are the contender's), and the status and error of every
    row when the device or the contender cannot be had. `NotApplicable` passes through."""
    params = attention_params(cfg.attention)
    identity = {"contender": cfg.contender, "attention": cfg.attention.name, "params": params,
                "backend": cfg.backend.name}
    try:
        device = check_device(cfg.device)
        setting = Setting(cfg.attention.name, params, cfg.backend.name, cfg.heads, cfg.kv_heads,
                          cfg.head_dim, DTYPES[cfg.dtype.name], device, bool(cfg.causal),
                          cfg.layout.name, bool(cfg.sinks))
        contender = build_contender(cfg.contender, setting)
    except NotApplicable:
        raise
    except MissingPackage as error:
        return identity, None, None, {"status": "missing", "error": str(error)}
    except Exception as error:  # a job that cannot start is a row per length
        return identity, None, None, error_row(error)
    identity |= {"attention": contender.attention, "params": contender.params,
                 "backend": contender.backend}
    return identity, contender, device, None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure the job's lengths not yet done, in increasing order; write and log their rows.

    Returns {"rows": every length's row (earlier ones included), "status": "ok" when all are,
    "skipped": True when nothing was measured now}.
    """
    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        identity, contender, device, failure = prepare(cfg)
    except NotApplicable as error:
        log.info("%s on %s: not applicable (%s)", cfg.contender, cfg.attention.name, error)
        return {"rows": [], "status": f"not applicable: {error}", "skipped": True}
    columns = COLUMNS | param_columns(identity["attention"], identity["params"])
    table = Table(Path(cfg.out_dir) / CSV_NAME, columns, KEY, defaults=DEFAULTS)
    base = {**{k: v for k, v in identity.items() if k != "params"},
            "params": json.dumps(identity["params"], sort_keys=True), **identity["params"],
            "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "dtype": cfg.dtype.name, "device": cfg.device, "causal": bool(cfg.causal),
            "mode": cfg.mode.name, "layout": cfg.layout.name,
            "docs": None if cfg.layout.name == "plain" else cfg.docs, "sinks": bool(cfg.sinks)}
    done, todo = [], []
    for n in seq_lens(cfg):
        point = base | {"seq_len": n, "batch": batch_at(cfg, n)}
        if cfg.layout.name != "plain":
            point["doc_lens"] = json.dumps(document_lengths(n, cfg.docs, cfg.seed))
        earlier = table.done(point)
        if earlier is not None and (earlier["status"] == "ok" or not cfg.retry_failed):
            done.append(earlier)
        else:
            todo.append(point)
    label = f"{identity['attention']}/{identity['contender']}"
    if done:
        log.info("%s: %d length(s) done in %s", label, len(done), table.path)
    if cfg.dry_run or not todo:
        for point in todo:
            print(f"to measure: {label} N={point['seq_len']}", flush=True)
        return {"rows": done, "status": overall(done), "skipped": True}
    facts: dict[str, Any] = {}
    if failure is None:
        facts = environment(device) | {"resolved_backend": contender.resolved_backend}
        try:
            if cfg.matmul_peak:
                facts["matmul_peak_tflops"] = cached_matmul_peak(device, cfg.dtype.name)
            facts |= check(contender, cfg, device)
        except WrongResult as error:
            failure = {"status": "wrong", "error": f"WrongResult: {error}"}
        except Exception as error:  # the contender cannot run: every length says why
            failure = error_row(error)
    written = list(done)
    stop: str | None = None
    wandb_run = start_wandb(cfg, label)
    try:
        for point in todo:
            if cfg.max_minutes is not None and time.monotonic() - STARTED > cfg.max_minutes * 60:
                print(f"stopping after max_minutes={cfg.max_minutes:g}: {label} from "
                      f"N={point['seq_len']} not measured; run again to go on", flush=True)
                break
            row = point | facts
            if failure is not None:
                row |= failure
            elif stop is not None:
                row |= {"status": "skipped", "error": stop}
            else:
                row |= measure_or_fail(contender, cfg, device, point)
                if row["status"] in ("oom", "over_budget"):
                    stop = f"{row['status']} at N={point['seq_len']}"
            table.append([row])
            written.append(row)
            log_length(wandb_run, row)
            print(f"{label} N={point['seq_len']}: {summary(row)}", flush=True)
            if row["status"] != "ok" and device is not None and not device_alive(device):
                raise RuntimeError(f"the device is unusable after {label} N={point['seq_len']} "
                                   f"({row['error']}); its row is written: run again to go on")
    finally:
        wandb_run.summary["bench/status"] = overall(written)
        wandb_run.finish()
    return {"rows": written, "status": overall(written), "skipped": False}


def measure_or_fail(contender: Contender, cfg: DictConfig, device: torch.device,
                    point: Mapping[str, Any]) -> dict[str, Any]:
    """The measured columns of a length, or its failure's status and error."""
    try:
        return measure_length(contender, cfg, device, point["seq_len"], point["batch"])
    except OverBudget as error:
        return {"status": "over_budget", "error": f"OverBudget: {error}"}
    except Exception as error:  # a failing length is a row; the job goes on
        return error_row(error)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def overall(rows: list[Mapping[str, Any]]) -> str:
    """"ok" when every row is, else the first other status."""
    return next((row["status"] for row in rows if row["status"] != "ok"), "ok")


def summary(row: Mapping[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['error']}"
    parts = [f"{name} {row[name]:.4g}" for name in ("fwd_ms", "fwd_bwd_ms", "peak_mem_mib")
             if name in row]
    return ", ".join(parts) + (f" ({row['error']})" if row["error"] else "")


def start_wandb(cfg: DictConfig, label: str) -> Any:
    """One W&B run per job: the resolved config once, each length a step under `bench/`."""
    return start_run(cfg.logger, name=label.replace("/", "-"), group=cfg.sweep_name,
                     job_type="bench", dir=cfg.out_dir,
                     config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def log_length(wandb_run: Any, row: Mapping[str, Any]) -> None:
    numbers = {f"bench/{metric}": row[metric] for metric in METRICS
               if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])}
    wandb_run.log(numbers | {"bench/seq_len": row["seq_len"]})


# -- sweeps ---------------------------------------------------------------------------------


class SweepProgress(Callback):
    """Hydra callback: a progress line after each job of a multirun, the report at the end.

    The number of jobs is known for the basic sweeper; with other sweepers the line counts
    jobs only. Jobs run by joblib or SLURM workers report in their own logs.
    """

    def __init__(self) -> None:
        self.total: int | None = None
        self.started: float | None = None
        self.finished = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started, self.finished = time.monotonic(), 0
        self.total = count_points(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.started is None:
            return
        self.finished += 1
        try:
            result = job_return.return_value
            what = ("skipped (done)" if result["skipped"] and result["rows"]
                    else result["status"])
        except Exception as error:  # the job itself crashed; Hydra reports it too
            what = f"crashed: {type(error).__name__}: {error}"
        name = config.attention.name + (f"/{config.contender}" if "contender" in config else "")
        print(progress_line(self.finished, self.total, time.monotonic() - self.started,
                            f"{name} N={config.seq_len} {what}"), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(report.run([Path(config.out_dir)]).text, flush=True)


class BenchCallback(SweepProgress):
    """`SweepProgress`, and `validate` of the composed config before anything runs."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate(config)
        super().on_multirun_start(config, **kwargs)


def count_points(config: DictConfig) -> int | None:
    """Jobs of the multirun `config` describes (basic sweeper only; None otherwise)."""
    if not config.hydra.sweeper._target_.endswith(".BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    values: dict[str, int] = {}
    for override in parser.parse_overrides(overrides):
        values[override.get_key_element()] = (
            len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1)
    return math.prod(values.values())


def progress_line(done: int, total: int | None, elapsed: float, what: str) -> str:
    """`[#####-----] 5/10  0:42 elapsed, ~0:42 left  <what>` (a count only without total)."""
    clock = str(datetime.timedelta(seconds=round(elapsed)))
    if not total:
        return f"[point {done}] {clock} elapsed  {what}"
    width = 24
    filled = round(width * done / total)
    left = str(datetime.timedelta(seconds=round(elapsed / done * (total - done))))
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}  {clock} elapsed, "
            f"~{left} left  {what}")


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    result = run(cfg)
    shown = ("attention", "contender", "seq_len", "status", "fwd_ms", "fwd_bwd_ms",
             "peak_mem_mib", "useful_tflops")
    if result["rows"]:
        frame = pd.DataFrame(result["rows"])
        print(text_table(frame[[c for c in shown if c in frame]]), flush=True)
    for row in result["rows"]:
        if row["status"] != "ok":
            print(f"N={row['seq_len']} {row['status']}: {row['error']}", flush=True)
    return result


if __name__ == "__main__":
    # Run the importable module's `main`, not this `__main__` copy: Hydra's joblib and
    # submitit launchers pickle the task function, and their workers can import
    # `experiments.bench` but not this process's `__main__`.
    from experiments import bench

    bench.main()
