"""Speed and memory of one attention variant at one sequence length: one point per Hydra job.

    python -m experiments.bench attention=lsh seq_len=8192 attention.n_hashes=8   # one point
    python -m experiments.bench -m               # the default sweep: every variant x 1k..16k
    python -m experiments.bench -m attention=full,local seq_len=1024,4096 mode=fwd
    python -m experiments.bench -m hydra/launcher=slurm device=cuda dtype=bfloat16 ...

Configs: `conf/bench.yaml` (typed by `experiments.config`). A point measures, for
(B, heads, N, D) queries and (B, kv_heads, N, D) keys and values:

* `fwd_ms`: median forward time (inference, under `no_grad`, module in eval mode);
  `fwd_bwd_ms`: median forward + backward to q, k and v (module in train mode). Medians of
  `repeats` runs after `warmup` runs; CUDA events on a GPU, `time.perf_counter` on a CPU.
* `fwd_peak_mib`, `fwd_bwd_peak_mib`: peak memory the call allocates above what was live
  before it (its result and gradients included). CUDA: `max_memory_allocated`; CPU: the
  allocation-accurate tracker of `experiments.measure.peak_memory`, so points measured
  earlier in the same process do not pollute later ones.
* `fwd_tflops`, `fwd_bwd_tflops`: useful TFLOP/s, `attn.flops(N, D, causal) * B * heads`
  per forward, a forward+backward counting `measure.FWD_BWD_FACTOR` (3.5) forwards, beside
  `matmul_peak_tflops`, the device's measured matmul peak (measured once per results folder,
  device and dtype, and cached in `matmul_peak.json`).
* Headline columns, of the training step when it is measured, else of the forward:
  `peak_mem_mib`, `useful_tflops`, `tokens_per_s` (B * N per second).

Each point becomes one row of `<out_dir>/bench.csv` (rewritten atomically under a lock, so
parallel and SLURM jobs can share it), with the variant's parameters as columns and a
`params` JSON column, environment facts and `status`: ok, oom, unsupported (a bad
combination: the variant or the input rejects it) or error, with the message in `error`. A
point whose key (variant, params, seq_len and the `config.BENCH_AXES`) already has a row is
skipped (failed ones too, unless `retry_failed=true`), so a re-run resumes a sweep.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import attn_zoo
from experiments import report
from experiments.config import BENCH_AXES, attention_params, register_configs
from experiments.measure import (
    FWD_BWD_FACTOR,
    MIB,
    locked,
    matmul_peak,
    median_time,
    peak_memory,
    read_rows,
    text_table,
    write_atomic,
)
from experiments.wandb_logger import start_run

log = logging.getLogger(__name__)
# The CPU memory tracker runs torch's profiler, whose kineto backend logs every start and stop
# at its default level; it reads the level when first used.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

CSV_NAME = "bench.csv"
PEAK_NAME = "matmul_peak.json"
KEY = ("attention", "params", "seq_len", *BENCH_AXES)
METRICS = ("fwd_ms", "fwd_bwd_ms", "peak_mem_mib", "fwd_peak_mib", "fwd_bwd_peak_mib",
           "useful_tflops", "fwd_tflops", "fwd_bwd_tflops", "tokens_per_s",
           "matmul_peak_tflops")
COLUMNS = (*KEY, "status", "error", *METRICS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# -- the point ------------------------------------------------------------------------------


def point_of(cfg: DictConfig) -> dict[str, Any]:
    """The identifying columns of the point `cfg` describes, plus its parameters as columns."""
    values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    params = attention_params(cfg.attention)
    clash = sorted(set(params) & set(COLUMNS))
    if clash:
        raise ValueError(f"attention parameters {clash} clash with bench columns")
    point = {"attention": cfg.attention.name, "params": json.dumps(params, sort_keys=True),
             "seq_len": values["seq_len"]}
    return point | {axis: values[axis] for axis in BENCH_AXES} | params


def key_of(row: Mapping[str, Any]) -> tuple[str, ...]:
    """A row's identity as strings, equal for a fresh row and the same row read back."""
    return tuple(str(row[column]) for column in KEY)


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def git_commit() -> str:
    """The checkout's commit (with "+dirty" when it has changes), or "" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Facts a reader needs to compare rows: versions, device, threads, commit, time."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    return {
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton,
        "cuda_version": torch.version.cuda or "",
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def classify(error: BaseException) -> str:
    """The `status` of a failed point."""
    message = str(error).lower()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or (
            "can't allocate memory" in message):
        return "oom"
    if isinstance(error, (ValueError, TypeError, NotImplementedError)):
        return "unsupported"
    return "error"


def measure_point(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Times, peak memory and useful TFLOP/s of the point (raises when it cannot run)."""
    name, n, dim = cfg.attention.name, cfg.seq_len, cfg.head_dim
    dtype = DTYPES[cfg.dtype.name]
    causal = bool(cfg.causal)
    attn = attn_zoo.build(name, backend=cfg.backend.name, **attention_params(cfg.attention))
    attn = attn.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    q = torch.randn(cfg.batch, cfg.heads, n, dim, generator=gen, dtype=dtype, device=device)
    k, v = (torch.randn(cfg.batch, cfg.kv_heads, n, dim, generator=gen, dtype=dtype,
                        device=device) for _ in range(2))
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats,
              "budget_s": cfg.budget_s}
    forward_flops = attn.flops(n, dim, causal) * cfg.batch * cfg.heads
    tokens = cfg.batch * n
    row: dict[str, Any] = {"resolved_backend": attn.resolve_backend(device, dtype, dim)}
    # Content-based variants draw randomness (LSH rotations): the same every run.
    torch.manual_seed(cfg.seed)
    if cfg.mode.name in ("fwd", "both"):
        attn.eval()

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return attn(q, k, v, causal=causal)

        seconds = median_time(infer, **timing)
        row |= {"fwd_ms": seconds * 1e3, "fwd_peak_mib": peak_memory(infer, device=device) / MIB,
                "fwd_tflops": forward_flops / seconds / 1e12, "tokens_per_s": tokens / seconds}
        row |= {"peak_mem_mib": row["fwd_peak_mib"], "useful_tflops": row["fwd_tflops"]}
    if cfg.mode.name in ("fwd_bwd", "both"):
        attn.train()
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        grad_out = torch.randn(q.shape, generator=gen, dtype=dtype, device=device)

        def train_step() -> tuple[torch.Tensor, ...]:
            # autograd.grad, not .backward(): gradients must not accumulate across runs.
            return torch.autograd.grad(attn(*inputs, causal=causal), inputs, grad_out)

        seconds = median_time(train_step, **timing)
        peak = peak_memory(train_step, device=device) / MIB
        tflops = FWD_BWD_FACTOR * forward_flops / seconds / 1e12
        row |= {"fwd_bwd_ms": seconds * 1e3, "fwd_bwd_peak_mib": peak, "fwd_bwd_tflops": tflops,
                "peak_mem_mib": max(peak, row.get("fwd_peak_mib", 0.0)),
                "useful_tflops": tflops, "tokens_per_s": tokens / seconds}
    return row


# -- the results folder ---------------------------------------------------------------------


def done_row(out_dir: Path, point: Mapping[str, Any]) -> dict[str, Any] | None:
    """The row already written for `point`, if any."""
    with locked(out_dir / CSV_NAME):
        rows = read_rows(out_dir / CSV_NAME, COLUMNS, KEY)
    if rows.empty:
        return None
    match = rows[[key_of(row) == key_of(point) for _, row in rows.iterrows()]]
    return None if match.empty else match.iloc[-1].to_dict()


def write_row(out_dir: Path, row: Mapping[str, Any]) -> None:
    """Add `row` to `<out_dir>/bench.csv`, replacing a row with the same key, atomically."""
    with locked(out_dir / CSV_NAME):
        rows = read_rows(out_dir / CSV_NAME, COLUMNS, KEY)
        if not rows.empty:
            rows = rows[[key_of(old) != key_of(row) for _, old in rows.iterrows()]]
        fresh = pd.DataFrame([dict(row)])
        merged = fresh if rows.empty else pd.concat([rows, fresh], ignore_index=True)
        order = [c for c in COLUMNS if c in merged] + [c for c in merged if c not in COLUMNS]
        write_atomic(out_dir / CSV_NAME, merged[order].to_csv(index=False))


def cached_matmul_peak(out_dir: Path, device: torch.device, dtype: str) -> float:
    """The device's measured matmul peak in TFLOP/s, measured once per folder and setting."""
    key = f"{device_name(device)} | {dtype} | {torch.get_num_threads()} threads"
    path = out_dir / PEAK_NAME
    with locked(out_dir / CSV_NAME):
        peaks = json.loads(path.read_text()) if path.exists() else {}
        if key not in peaks:
            peaks[key] = matmul_peak(device, dtype=DTYPES[dtype]) / 1e12
            write_atomic(path, json.dumps(peaks, indent=2, sort_keys=True) + "\n")
    return peaks[key]


# -- the app --------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure the point `cfg` describes unless done; write and log its row; return it.

    The returned row has `skipped=True` when an earlier row of the same point was reused.
    """
    out_dir = Path(cfg.out_dir)
    point = point_of(cfg)
    earlier = done_row(out_dir, point)
    if earlier is not None and (earlier["status"] == "ok" or not cfg.retry_failed):
        log.info("skip %s-n%s: done in %s (%s)", point["attention"], point["seq_len"],
                 out_dir / CSV_NAME, earlier["status"])
        return earlier | {"skipped": True}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    row = dict(point)
    try:
        device = check_device(cfg.device)
        row |= environment(device)
        row["matmul_peak_tflops"] = cached_matmul_peak(out_dir, device, cfg.dtype.name)
        row |= measure_point(cfg, device) | {"status": "ok", "error": ""}
    except Exception as error:  # a failing point is a row; the sweep goes on
        row |= {"status": classify(error),
                "error": f"{type(error).__name__}: {error}".replace("\n", " ")}
        row.setdefault("torch_version", torch.__version__)
        log.error("%s-n%s failed: %s", point["attention"], point["seq_len"], row["error"])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_row(out_dir, row)
    log_row(cfg, row)
    return row | {"skipped": False}


def log_row(cfg: DictConfig, row: Mapping[str, Any]) -> None:
    """One W&B run for the point: the resolved config once, metrics under `bench/`."""
    wandb_run = start_run(
        cfg.logger, name=f"{row['attention']}-n{row['seq_len']}", group=cfg.sweep_name,
        job_type="bench", dir=cfg.out_dir,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )
    numbers = {f"bench/{metric}": row[metric] for metric in METRICS
               if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])}
    wandb_run.log(numbers | {"bench/seq_len": row["seq_len"]})
    wandb_run.summary["bench/status"] = row["status"]
    wandb_run.summary["bench/error"] = row["error"]
    wandb_run.finish()


class SweepProgress(Callback):
    """Hydra callback: a progress line after each point of a multirun, the report at the end.

    The number of points is known for the basic sweeper; with other sweepers the line
    counts points only. Points run by joblib or SLURM workers report in their own logs.
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
            row = job_return.return_value
            what = "skipped (done)" if row["skipped"] else row["status"]
        except Exception as error:  # the job itself crashed; Hydra reports it too
            what = f"crashed: {type(error).__name__}: {error}"
        print(progress_line(self.finished, self.total, time.monotonic() - self.started,
                            f"{config.attention.name}-n{config.seq_len} {what}"), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(report.run([Path(config.out_dir)]).text, flush=True)


def count_points(config: DictConfig) -> int | None:
    """Points of the multirun `config` describes (basic sweeper only; None otherwise)."""
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
    row = run(cfg)
    shown = {key: row.get(key) for key in ("attention", "seq_len", "status", "fwd_ms",
                                            "fwd_bwd_ms", "peak_mem_mib", "useful_tflops")}
    print(text_table(pd.DataFrame([shown])), flush=True)
    if row["status"] != "ok":
        print(f"error: {row['error']}", flush=True)
    return row


if __name__ == "__main__":
    main()
