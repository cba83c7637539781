"""One report for the speed, quality and decode results folders, with goals as yaml data.

    python -m experiments.report results/cpu/sweep                    # speed: bench.csv
    python -m experiments.report results/cpu/quality --speed results/cpu/sweep   # + frontier
    python -m experiments.report results/cpu/decode                   # decode: decode.csv
    python -m experiments.report results/a results/b --out results/ab --goals cpu_local
    python -m experiments.report results/cpu/sweep --wandb            # + a W&B run (offline)

A results folder holds what the apps wrote: `bench.csv` (`experiments.bench`), `train.csv`
(`experiments.train`), `decode.csv` (`experiments.decode`), read through
`experiments.results.Table` (typed columns; a malformed line is moved to `<csv>.bad` with a
warning and the report goes on). Each table found gets its section; everything goes to
`<out>/report.md` (out: the first folder) and the terminal, plots to `<out>/plots/`.

* **speed** (bench.csv), per setting (device, dtype, batch, heads, kv_heads, head_dim,
  causal, mode, layout and documents): for the forward and, when measured, the
  forward+backward, time and peak memory as variants x sequence lengths, each with its fitted
  scaling exponent (slope of log value over log N through the ok points), speedup over
  `full` (its time over the variant's), memory ratio to `full`, useful TFLOP/s beside the
  measured matmul peak; log-log plots `plots/{time,memory}_<setting>.png`. A variant is
  `attention` plus `key=value` for each parameter (or backend) that varies among its rows,
  and `(contender)` when the rows are not the library's (SDPA, FlexAttention, a peer):
  `local window=128`, `local (sdpa)`.
* **quality** (train.csv), per task, model, budget (with its curriculum) and seed: the metric
  (accuracy, or bits per byte for text) as variants x training lengths, the metric per
  position bucket (`position_accuracy` or `position_loss`) as variants x buckets for each
  length with a plot `plots/position_<task>-n<N>.png`, the length-extrapolation table when
  points were evaluated at other lengths (points trained on packed rows are the variant
  `<variant> packed`, and where both layouts were trained, a table of the metric unpacked vs
  packed at equal tokens), and with `--speed` (a bench folder) the frontier: each (variant,
  N) beside the attention's forward+backward time and peak memory at that N (the
  speed sweep's last ok row of the same variant and parameters) and whether it is on the
  Pareto frontier of its N. Plots `plots/quality_<task>.png`, `plots/frontier_<task>.png`.
  Where a (variant, N) trained with several seeds, a seed-spread section gives the seeds and
  the mean, min, max and max - min of the metric.
* **decode** (decode.csv): per variant the spread (max / min - 1) and growth exponent (slope of
  log value over log context) of per-token latency and cache bytes over the contexts, the
  latency and bytes as variants x contexts, every point; plot `plots/decode.png`.

Failed points (oom, unsupported, error; skipped ones too) show their status in their cells and
are listed with their messages under each section, also when no point of a section succeeded.

**Goals** are yaml files under `conf/goals/` (`--goals NAME|PATH ...`; by default every file
whose `table` the folders hold), evaluated by `Goal.evaluate` and shown as met / not met / not
measured with the worst value and where it was. A file is `table: bench|train|decode` and
`goals:`, a list of

    goal: a sentence saying what is wanted
    rows: {column: value | [values] | {op: value}}   # which rows (op: <, <=, >, >=)
    where: 1 - visited_tiles / dense_tiles >= 0.9    # optional: a condition on the columns
    baseline: {rows: {...}, match: [columns]}        # optional: rows joined to each point on
                                                     # `match`; their columns are base_<column>
    metric: base_fwd_ms / fwd_ms                     # an arithmetic expression of the columns
    over: context                                    # optional: one value per variant, the
    statistic: spread                                # spread or exponent of the metric over it
    compare: ">="                                    # <, <=, >, >=, or between
    threshold: 1.0                                   # a number; [low, high] for between

A goal is met when at least one value was measured and every value passes; a selected point
that failed (whose baseline ran, when there is one) fails it; not measured when no value was.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from experiments.measure import format_number, markdown_table, text_table, write_atomic  # noqa: E402
from experiments.results import Table  # noqa: E402
from experiments.wandb_logger import start_run  # noqa: E402

GOALS_DIR = Path(__file__).resolve().parent.parent / "conf" / "goals"
OK_STATUSES = ("ok", "skipped")
"""Statuses that are not failures: skipped points were not attempted by design."""


@dataclass(frozen=True)
class Source:
    """What the report reads of one app's CSV: the columns it computes with, typed (any other
    column comes as text), and the columns that tell one variant's setting from another's."""

    csv: str
    columns: dict[str, type]
    setting: tuple[str, ...]
    length: str
    defaults: dict[str, Any] = field(default_factory=dict)


_COMMON = {"attention": str, "params": str, "status": str, "error": str, "device_name": str,
           "torch_version": str, "threads": float}
BENCH_SETTING = ("device", "device_name", "dtype", "heads", "kv_heads", "head_dim", "causal",
                 "mode", "layout", "docs")
"""A speed section's setting, with `batch` (see `speed_settings`)."""
QUALITY_SETTING = ("task", "task_params", "model", "steps", "tokens_per_step", "lr",
                   "curriculum_len", "curriculum_steps", "seed")
DECODE_SETTING = ("vocab_size", "dim", "depth", "heads", "kv_heads", "batch", "dtype", "device",
                  "prefill_chunk", "steps")
SOURCES = {
    "bench": Source("bench.csv", _COMMON | {
        "contender": str, "seq_len": int, "batch": int, "heads": int, "kv_heads": int,
        "head_dim": int, "dtype": str, "device": str, "causal": bool, "backend": str,
        "mode": str, "layout": str, "docs": int, **dict.fromkeys(
            ("fwd_ms", "fwd_bwd_ms", "fwd_peak_mib", "fwd_bwd_peak_mib", "peak_mem_mib",
             "useful_tflops", "fwd_tflops", "fwd_bwd_tflops", "matmul_peak_tflops"), float),
        **dict.fromkeys(("block_m", "block_n", "visited_tiles", "dense_tiles"), int)},
        BENCH_SETTING, "seq_len", {"layout": "plain"}),
    "train": Source("train.csv", _COMMON | {
        "model": str, "task": str, "task_params": str, "packing": bool, "seq_len": int,
        "eval_len": int, "train_tokens": int,
        "steps": int, "tokens_per_step": int, "lr": float, "seed": int, "curriculum_len": int,
        "curriculum_steps": int, "position_loss": str, "position_accuracy": str,
        **dict.fromkeys(("eval_loss", "accuracy", "bits_per_byte", "train_loss",
                         "train_seconds"), float)},
        (*QUALITY_SETTING, "seq_len"), "eval_len",
        {"packing": False, "curriculum_len": 0, "curriculum_steps": 0}),
    "decode": Source("decode.csv", _COMMON | {
        "context": int, "vocab_size": int, "dim": int, "depth": int, "heads": int,
        "kv_heads": int, "batch": int, "dtype": str, "device": str, "prefill_chunk": int,
        "steps": int, "bounded": bool, **dict.fromkeys(
            ("ms_per_token", "cache_mib", "keys_per_layer", "prefill_tokens_per_s"), float)},
        DECODE_SETTING, "context"),
}
SPEED_COLUMNS = {"fwd_bwd_ms": "attention fwd+bwd ms", "peak_mem_mib": "attention peak MiB"}
PHASES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
BASELINE = "full"
LIBRARY = "attn_zoo"
"""The `contender` of the library's own rows (others are SDPA, FlexAttention, peers)."""


@dataclass
class Report:
    """What `run` produced: the markdown file's text, the terminal text, the plot files,
    the speed section's fitted exponents and the goals' rows."""

    markdown: str
    text: str
    plots: list[Path] = field(default_factory=list)
    exponents: pd.DataFrame = field(default_factory=pd.DataFrame)
    goals: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class Section:
    """A titled part of the report: facts, (caption, table) pairs, plots, failed points."""

    title: str
    facts: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# -- rows -----------------------------------------------------------------------------------


def load(folders: Sequence[str | Path], kind: str) -> pd.DataFrame:
    """The typed rows of the `kind` table ("bench", "train" or "decode") of every folder that
    has one, with `folder` and a `variant` label; empty when none has it."""
    source = SOURCES[kind]
    frames = [Table(Path(folder) / source.csv, source.columns, key=(),
                    defaults=source.defaults).read().assign(folder=str(folder))
              for folder in folders if (Path(folder) / source.csv).exists()]
    if not frames:
        return pd.DataFrame(columns=[*source.columns, "folder", "variant"])
    rows = pd.concat(frames, ignore_index=True)
    rows["variant"] = variant_labels(rows)
    if kind == "train":
        rows.loc[rows["packing"].fillna(False).astype(bool), "variant"] += " packed"
    # A point that failed before reaching the device (a peer's package missing) has no device
    # name: it takes the one of its folder and device, so that it joins their tables.
    for _, group in rows.groupby(["folder", "device"] if "device" in rows else ["folder"]):
        names = set(group["device_name"]) - {""}
        if len(names) == 1:
            rows.loc[group.index[group["device_name"] == ""], "device_name"] = names.pop()
    if kind == "bench":
        causal = rows["causal"].fillna(False).astype(bool)
        rows["dense_kernel_tiles"] = [
            math.nan if pd.isna(bm) or pd.isna(bn) else dense_kernel_tiles(n, bm, bn, c)
            for n, bm, bn, c in zip(rows["seq_len"], rows["block_m"], rows["block_n"], causal,
                                    strict=True)]
    return rows


def dense_kernel_tiles(n: int, block_m: int, block_n: int, causal: bool) -> int:
    """Tiles a dense kernel visits over n queries and n keys at (block_m, block_n): all of them,
    or (causal) those on and below the diagonal, holding a pair j <= i."""
    query_tiles, key_tiles = -(-n // block_m), -(-n // block_n)
    if not causal:
        return query_tiles * key_tiles
    return sum((min(n, (tile + 1) * block_m) - 1) // block_n + 1 for tile in range(query_tiles))


def variant_labels(rows: pd.DataFrame) -> pd.Series:
    """`attention`, plus `key=value` for each parameter (and `backend`) that varies among its
    rows, plus `(contender)` for rows not of the library: `local window=128`,
    `lsh backend=triton`, `local (flex_attention)`."""
    empty = pd.Series("", index=rows.index, dtype=object)
    contenders = rows.get("contender", empty).tolist()
    params = [(json.loads(text) if text else {})
              | ({"backend": backend} if backend and contender in ("", LIBRARY) else {})
              for text, backend, contender in zip(rows["params"], rows.get("backend", empty),
                                                  contenders, strict=True)]
    values: dict[tuple[str, str], set[str]] = {}
    for name, setting in zip(rows["attention"], params, strict=True):
        for key, value in setting.items():
            values.setdefault((name, key), set()).add(json.dumps(value))
    labels = [" ".join([name, *(f"{key}={value}" for key, value in sorted(setting.items())
                                if len(values[(name, key)]) > 1)])
              + (f" ({contender})" if contender not in ("", LIBRARY) else "")
              for name, setting, contender in zip(rows["attention"], params, contenders,
                                                  strict=True)]
    return pd.Series(labels, index=rows.index, dtype=object)


def numeric(values: pd.Series) -> pd.Series:
    """`values` as float64 (text that is not a number, and empty cells, as NaN)."""
    return pd.to_numeric(values.astype(object).where(values.notna(), None),
                         errors="coerce").astype(float)


def scaling_exponent(n: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) over log(n) through the finite positive points."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    good = np.isfinite(values) & (values > 0) & np.isfinite(n) & (n > 0)
    if good.sum() < 2 or np.unique(n[good]).size < 2:
        return math.nan
    return float(np.polyfit(np.log(n[good]), np.log(values[good]), 1)[0])


def spread(values: Sequence[float]) -> float:
    """max / min - 1 of the finite values (NaN with fewer than two)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.max() / values.min() - 1) if len(values) > 1 else math.nan


def grid(rows: pd.DataFrame, column: str, length: str = "seq_len") -> pd.DataFrame:
    """variant x length values of `column` from ok rows (NaN elsewhere; last row wins)."""
    ok = rows[rows["status"] == "ok"]
    table = pd.DataFrame(index=sorted(rows["variant"].unique()),
                         columns=sorted(rows[length].unique()), dtype=float)
    for (variant, n), value in zip(zip(ok["variant"], ok[length], strict=True),
                                   numeric(ok[column]), strict=True):
        table.loc[variant, n] = value
    return table


def status_grid(rows: pd.DataFrame, length: str = "seq_len") -> pd.DataFrame:
    """variant x length statuses (the last row's; NaN where there is none)."""
    table = pd.DataFrame(index=sorted(rows["variant"].unique()),
                         columns=sorted(rows[length].unique()), dtype=object)
    for variant, n, status in zip(rows["variant"], rows[length], rows["status"], strict=True):
        table.loc[variant, n] = status
    return table


def shown(values: pd.DataFrame, statuses: pd.DataFrame, exponent: bool,
          prefix: str = "N=") -> pd.DataFrame:
    """Cells as text: the number, or the failed point's status; plus the fitted exponent."""
    cells = values.astype(object).copy()
    for variant in values.index:
        for n in values.columns:
            status = statuses.loc[variant, n]
            cells.loc[variant, n] = (format_number(float(values.loc[variant, n]))
                                     if status == "ok" else ("" if pd.isna(status) else status))
    cells.columns = [f"{prefix}{n}" for n in values.columns]
    if exponent:
        cells["exponent"] = [f"{scaling_exponent(values.columns, values.loc[v]):.2f}"
                             for v in values.index]
    return cells.rename_axis("variant").reset_index()


def failure_lines(rows: pd.DataFrame, describe: Callable[[Any], str]) -> list[str]:
    """`<point>: <status>: <error>` for every row that is not ok."""
    return [f"{describe(row)}: {row.status}: {row.error}"
            for row in rows[rows["status"] != "ok"].itertuples()]


def groups(rows: pd.DataFrame, columns: Sequence[str]) -> Iterator[tuple[dict[str, Any],
                                                                         pd.DataFrame]]:
    """(values of `columns`, their rows) for every combination present, in a stable order."""
    present = [c for c in columns if c in rows]
    for values, group in rows.groupby(present, dropna=False, sort=True):
        yield dict(zip(present, values, strict=True)), group


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines_plot(ax: Any, values: pd.DataFrame) -> None:
    """One line per variant (row) of `values` against its columns; empty rows skipped; more
    than ten lines take twenty colours."""
    if len(values.index) > 10:
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for variant in values.index:
        line = values.loc[variant].dropna()
        if len(line):
            ax.plot(line.index, line.values, marker="o", label=variant)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


# -- speed ----------------------------------------------------------------------------------


def speed_settings(rows: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """(setting, its rows) per `BENCH_SETTING` and batch. A batch that follows the length (a
    fixed number of tokens, `B = tokens // N`) stays one setting, its batch shown as
    `<largest>..<smallest>`; a batch that varies at one length splits the setting."""
    for setting, group in groups(rows, BENCH_SETTING):
        per_point = group.groupby(["variant", "seq_len"])["batch"].nunique()
        if (per_point > 1).any():
            for batch, part in groups(group, ["batch"]):
                yield setting | batch, part
        else:
            batches = sorted(set(group["batch"].dropna()), reverse=True) or ["?"]
            batch = batches[0] if len(batches) == 1 else f"{batches[0]}..{batches[-1]}"
            yield setting | {"batch": batch}, group


def setting_slug(setting: Mapping[str, Any]) -> str:
    """A file-name-safe name of a setting, e.g. `cpu-float32-b1-h8-kv8-d64-causal-both`
    (`-packed16` for 16 packed documents)."""
    batch = str(setting["batch"]).replace("..", "-")
    return (f"{str(setting['device']).replace(':', '')}-{setting['dtype']}-b{batch}"
            f"-h{setting['heads']}-kv{setting['kv_heads']}-d{setting['head_dim']}-"
            f"{'causal' if str(setting['causal']) == 'True' else 'bidir'}-{setting['mode']}"
            + ("" if documents(setting) is None else f"-{documents(setting)}"))


def documents(setting: Mapping[str, Any]) -> str | None:
    """`packed16` / `padded16` for a setting of documents, None for plain rows."""
    layout = setting.get("layout", "plain")
    return None if layout == "plain" else f"{layout}{setting['docs']}"


def speed_section(setting: Mapping[str, Any], rows: pd.DataFrame,
                  plot_dir: Path) -> tuple[Section, list[dict[str, Any]]]:
    """Tables, plots and exponents of one setting's rows."""
    phases = [p for p in PHASES if numeric(rows.loc[rows["status"] == "ok", f"{p}_ms"]).notna()
              .any()]
    statuses = status_grid(rows)
    baseline = BASELINE if BASELINE in statuses.index else None
    sec, exponents = Section(speed_title(setting)), []
    for phase in phases:
        time, memory = grid(rows, f"{phase}_ms"), grid(rows, f"{phase}_peak_mib")
        sec.tables.append((f"{PHASES[phase]} time (ms)", shown(time, statuses, True)))
        sec.tables.append((f"{PHASES[phase]} peak memory (MiB)", shown(memory, statuses, True)))
        if baseline:
            sec.tables.append((f"{PHASES[phase]} speedup vs {baseline} (its time / variant's)",
                               shown(time.rdiv(time.loc[baseline], axis=1), statuses, False)))
            sec.tables.append((f"{PHASES[phase]} memory vs {baseline} (variant's peak / its)",
                               shown(memory.div(memory.loc[baseline], axis=1), statuses,
                                     False)))
        sec.tables.append((f"{PHASES[phase]} useful TFLOP/s",
                           shown(grid(rows, f"{phase}_tflops"), statuses, False)))
        exponents += [{"setting": setting_slug(setting), "variant": variant, "phase": phase,
                       "time_exponent": scaling_exponent(time.columns, time.loc[variant]),
                       "memory_exponent": scaling_exponent(memory.columns,
                                                           memory.loc[variant])}
                      for variant in time.index]
    if phases:
        slug = setting_slug(setting)
        sec.plots = [speed_plot(rows, phases, "ms", "time (ms)", plot_dir / f"time_{slug}.png"),
                     speed_plot(rows, phases, "peak_mib", "peak memory (MiB)",
                                plot_dir / f"memory_{slug}.png")]
    peaks = rows["matmul_peak_tflops"].dropna()
    versions = sorted(set(rows["torch_version"]) - {""})
    threads = rows["threads"].dropna()
    sec.facts = (f"{setting.get('device_name') or setting['device']}"
                 + (f"; torch {', '.join(versions)}" if versions else "")
                 + (f"; {int(threads.max())} threads" if len(threads)
                    and setting["device"] == "cpu" else "")
                 + (f"; measured {setting['dtype']} matmul peak "
                    f"{format_number(float(peaks.iloc[-1]))} TFLOP/s" if len(peaks) else "")
                 + ("" if phases else "; no point succeeded"))
    sec.failures = failure_lines(rows, lambda r: f"{r.variant} N={r.seq_len}")
    return sec, exponents


def speed_title(setting: Mapping[str, Any]) -> str:
    return (f"{setting['device']} {setting['dtype']}, B={setting['batch']} "
            f"heads={setting['heads']} kv_heads={setting['kv_heads']} "
            f"head_dim={setting['head_dim']}, "
            f"{'causal' if str(setting['causal']) == 'True' else 'bidirectional'}, "
            f"mode={setting['mode']}"
            + ("" if documents(setting) is None else
               f", {setting['docs']} documents {setting['layout']} (N tokens in all)"))


def speed_plot(rows: pd.DataFrame, phases: Sequence[str], suffix: str, ylabel: str,
               path: Path) -> Path:
    """Log-log lines of `<phase>_<suffix>` vs N per variant, one panel per phase."""
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        lines_plot(ax, grid(rows, f"{phase}_{suffix}"))
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=ylabel,
               title=PHASES[phase])
        ax.set_xscale("log", base=2)
    return save(fig, path)


def log_to_wandb(rows: pd.DataFrame, plots: Sequence[Path], out: Path,
                 logger: Mapping[str, Any]) -> None:
    """One W&B run: the speed rows as a Table, line plots vs N per variant, the PNG plots."""
    import wandb

    wandb_run = start_run(logger, name=f"report-{out.name}", group=out.name, job_type="report",
                          config={"folders": sorted(rows["folder"].unique())}, dir=out)
    metrics: dict[str, Any] = {"report/rows": wandb.Table(dataframe=rows.astype(str))}
    for setting, group in speed_settings(rows):
        slug = setting_slug(setting)
        for phase in PHASES:
            for suffix, what in (("ms", "time (ms)"), ("peak_mib", "peak memory (MiB)")):
                values = grid(group, f"{phase}_{suffix}")
                lines = {v: values.loc[v].dropna() for v in values.index}
                lines = {v: line for v, line in lines.items() if len(line)}
                if lines:
                    metrics[f"report/{slug}/{phase}_{suffix}"] = wandb.plot.line_series(
                        xs=[list(map(int, line.index)) for line in lines.values()],
                        ys=[list(map(float, line.values)) for line in lines.values()],
                        keys=list(lines), title=f"{PHASES[phase]} {what} vs N ({slug})",
                        xname="seq_len")
    metrics |= {f"report/plots/{p.stem}": wandb.Image(str(p)) for p in plots}
    wandb_run.log(metrics)
    wandb_run.finish()


# -- quality --------------------------------------------------------------------------------


def quality_metric(rows: pd.DataFrame) -> str:
    """"bits_per_byte" for text tasks, else "accuracy"."""
    return "bits_per_byte" if rows["bits_per_byte"].notna().any() else "accuracy"


def packing_table(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(variant, N) lines of the metric trained unpacked and packed at the same tokens (one
    section is one budget), where both were; empty otherwise."""
    ok = rows[(rows["status"] == "ok") & (rows["eval_len"] == rows["seq_len"])]
    ok = ok.assign(variant=ok["variant"].str.removesuffix(" packed"),
                   packing=ok["packing"].map({True: "packed", False: "unpacked"}))
    table = ok.pivot_table(index=["variant", "seq_len"], columns="packing",
                           values=[metric, "train_tokens"], aggfunc="last")
    if table.empty or {"packed", "unpacked"} - set(table[metric].columns):
        return pd.DataFrame()
    both = table[metric].dropna(subset=["packed", "unpacked"])
    return pd.DataFrame({
        "variant": both.index.get_level_values(0), "N": both.index.get_level_values(1),
        "train tokens": table.loc[both.index, ("train_tokens", "packed")].astype(int).values,
        "unpacked": both["unpacked"].values, "packed": both["packed"].values,
        "packed - unpacked": (both["packed"] - both["unpacked"]).values})


def extrapolation_table(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """variant x "train N -> eval L" cells of the metric, for every evaluated length."""
    ok = rows[rows["status"] == "ok"]
    table = ok.pivot_table(index="variant", columns=["seq_len", "eval_len"], values=metric,
                           aggfunc="last")
    table.columns = [f"{n}->{length}" for n, length in table.columns]
    return table.reset_index()


def position_column(metric: str) -> str:
    """The rows' per-position column of a quality metric: position_accuracy for accuracy,
    else position_loss (in bits per byte for text)."""
    return "position_accuracy" if metric == "accuracy" else "position_loss"


def position_table(rows: pd.DataFrame, metric: str, n: int) -> pd.DataFrame:
    """variant x position bucket: the metric over the answers in each bucket of the ok points
    trained and evaluated at length n (the last row of each variant)."""
    column = position_column(metric)
    ok = rows[(rows["status"] == "ok") & (rows["seq_len"] == n) & (rows["eval_len"] == n)
              & rows[column].notna() & (rows[column] != "")]
    lines = {variant: json.loads(text) for variant, text in zip(ok["variant"], ok[column],
                                                                strict=True)}
    table = pd.DataFrame.from_dict(lines, orient="index").sort_index()
    return table.rename_axis("variant").reset_index() if len(table) else pd.DataFrame()


def position_plot(table: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """One line per variant: the metric against the position bucket."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    values = table.set_index("variant").astype(float)
    lines_plot(ax, values.set_axis(range(values.shape[1]), axis=1))
    ax.set_xticks(range(values.shape[1]), values.columns)
    ax.set(xlabel="position in the sequence (document)", ylabel=metric.replace("_", " "),
           title=title)
    return save(fig, path)


def seed_table(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(variant, N) lines trained with more than one seed (train = eval length): the seeds,
    the mean, min and max of the metric, and max - min."""
    ok = rows[(rows["status"] == "ok") & (rows["eval_len"] == rows["seq_len"])]
    ok = ok.assign(value=numeric(ok[metric]))
    stats = ok.groupby(["variant", "seq_len"]).agg(
        seeds=("seed", "nunique"), mean=("value", "mean"), min=("value", "min"),
        max=("value", "max"))
    stats = stats[stats["seeds"] > 1].assign(spread=lambda t: t["max"] - t["min"])
    return stats.reset_index().rename(columns={"seq_len": "N"})


def speed_costs(rows: pd.DataFrame) -> pd.DataFrame:
    """(attention, params, seq_len) -> the speed columns of the library's last ok row."""
    ok = rows[(rows["status"] == "ok") & rows["contender"].isin(["", LIBRARY])]
    return ok.groupby(["attention", "params", "seq_len"], as_index=False)[
        list(SPEED_COLUMNS)].last()


def pareto(cost: Sequence[float], quality: Sequence[float]) -> list[bool]:
    """Whether each point is undominated: no other has quality >= and cost <=, one strictly."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    flags = []
    for c, q in zip(cost, quality, strict=True):
        dominated = ((quality >= q) & (cost <= c) & ((quality > q) | (cost < c))).any()
        flags.append(bool(np.isfinite(c) and np.isfinite(q) and not dominated))
    return flags


def frontier_table(rows: pd.DataFrame, speed: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One line per ok (variant, N) point whose N the speed sweep measured: the metric, the
    speed columns, and Pareto flags against time and against memory within its N."""
    columns = ["seq_len", "variant", metric, *SPEED_COLUMNS, "pareto_time", "pareto_memory"]
    ok = rows[(rows["status"] == "ok") & (rows["eval_len"] == rows["seq_len"])]
    joined = ok.merge(speed, on=["attention", "params", "seq_len"], how="inner")
    # Lower bits per byte is better: the frontier reads quality as its negation.
    quality = -joined[metric] if metric == "bits_per_byte" else joined[metric]
    frames = [joined.loc[index].assign(
        pareto_time=pareto(joined.loc[index, "fwd_bwd_ms"], quality[index]),
        pareto_memory=pareto(joined.loc[index, "peak_mem_mib"], quality[index]))
        for _, index in joined.groupby("seq_len").groups.items()]
    table = (pd.concat(frames).sort_values(["seq_len", "fwd_bwd_ms"])[columns] if frames
             else pd.DataFrame(columns=columns))
    return table.rename(columns={"seq_len": "N", **SPEED_COLUMNS}).reset_index(drop=True)


def frontier_plot(table: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """The metric vs time and vs memory: one marker per variant, one colour per N, the Pareto
    points of each N joined by a line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>phX*P"
    variants = sorted(table["variant"].unique())
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (cost, flag) in zip(axes, ((SPEED_COLUMNS["fwd_bwd_ms"], "pareto_time"),
                                       (SPEED_COLUMNS["peak_mem_mib"], "pareto_memory")),
                                strict=True):
        for i, (n, part) in enumerate(table.groupby("N")):
            colour = colours[i % len(colours)]
            for _, point in part.iterrows():
                ax.scatter(point[cost], point[metric], color=colour,
                           marker=markers[variants.index(point["variant"]) % len(markers)])
            best = part[part[flag]].sort_values(cost)
            ax.plot(best[cost], best[metric], color=colour, alpha=0.6, label=f"N={n} frontier")
        for j, variant in enumerate(variants):
            ax.scatter([], [], color="grey", marker=markers[j % len(markers)], label=variant)
        ax.set_xscale("log")
        ax.set(xlabel=cost, ylabel=metric.replace("_", " "), title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(fig, path)


def quality_section(setting: Mapping[str, Any], rows: pd.DataFrame,
                    speed: pd.DataFrame | None, plot_dir: Path) -> Section:
    """The metric table, the per-position tables, the extrapolation table, the frontier and
    the plots of one task, model, budget and seed."""
    metric = quality_metric(rows)
    label = metric.replace("_", " ")
    slug = (f"{setting['task']}-{setting['model']}-s{setting['steps']}"
            + (f"-seed{setting['seed']}" if setting["seed"] else ""))
    sec = Section(f"{setting['task']} {setting['task_params']}, model {setting['model']}, "
                  f"{budget(setting)}, seed {setting['seed']}")
    own = rows[rows["eval_len"] == rows["seq_len"]]
    values = grid(own, metric)
    sec.tables.append((f"{label} (train length = eval length)",
                       shown(values, status_grid(own), exponent=False)))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines_plot(ax, values)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sequence length N (train = eval)", ylabel=label, title=setting["task"])
    sec.plots.append(save(fig, plot_dir / f"quality_{slug}.png"))
    if (rows["eval_len"] != rows["seq_len"]).any():
        sec.tables.append((f"{label}, train length -> eval length",
                           extrapolation_table(rows, metric)))
    for n in sorted(own["seq_len"].unique()):
        positions = position_table(rows, metric, n)
        if len(positions):
            caption = f"{label} by position, N={n}"
            sec.tables.append((caption, positions))
            sec.plots.append(position_plot(positions, metric, f"{setting['task']}: {caption}",
                                           plot_dir / f"position_{slug}-n{n}.png"))
    packing = packing_table(rows, metric)
    if len(packing):
        sec.tables.append((f"{label}: trained on unpacked vs packed rows, equal tokens",
                           packing))
    if speed is not None:
        frontier = frontier_table(rows, speed, metric)
        sec.tables.append((f"frontier: {label} vs attention cost", frontier))
        if len(frontier):
            sec.plots.append(frontier_plot(frontier, metric, setting["task"],
                                           plot_dir / f"frontier_{slug}.png"))
    sec.failures = failure_lines(rows, lambda r: f"{r.variant} N={r.seq_len} eval {r.eval_len}")
    return sec


def budget(setting: Mapping[str, Any]) -> str:
    """The training budget of a quality setting, in words."""
    text = (f"{setting['steps']} steps x {setting['tokens_per_step']} tokens, "
            f"lr {setting['lr']}")
    if setting.get("curriculum_steps"):
        text += (f", the first {setting['curriculum_steps']} at N="
                 f"{setting['curriculum_len']}")
    return text


def seed_section(setting: Mapping[str, Any], rows: pd.DataFrame) -> Section | None:
    """The seed-to-seed spread of one task, model and budget, when a point has two seeds."""
    metric = quality_metric(rows)
    table = seed_table(rows, metric)
    if table.empty:
        return None
    sec = Section(f"seed spread, {setting['task']} {setting['task_params']}, model "
                  f"{setting['model']}, {budget(setting)}")
    sec.tables.append((f"{metric.replace('_', ' ')} over seeds", table))
    return sec


# -- decode ---------------------------------------------------------------------------------


def decode_section(rows: pd.DataFrame, plot_dir: Path) -> Section:
    """Growth over the contexts per variant, latency and bytes per context, every point."""
    ok = rows[rows["status"] == "ok"]
    first = rows.iloc[0]
    threads = "" if pd.isna(first["threads"]) else f" with {first['threads']:.0f} thread(s)"
    sec = Section("Streaming decode: latency and cache size against context", facts=(
        f"TransformerLM dim={first['dim']}, depth={first['depth']}, heads={first['heads']}, "
        f"kv_heads={first['kv_heads']}, vocab={first['vocab_size']}, batch={first['batch']}, "
        f"{first['dtype']} on {first['device_name'] or first['device']}{threads}. Context "
        f"built by chunked prefill ({first['prefill_chunk']} tokens per call); latency: "
        f"{first['steps']} greedy decode steps per context, interleaved across contexts, "
        "mean of the medians in ascending and descending order."))
    summary = pd.DataFrame([{
        "variant": variant, "bounded": frame["bounded"].iloc[-1],
        "contexts": f"{frame['context'].min()}..{frame['context'].max()}",
        # Rounded: a constant size fits an exponent of 1e-17, which reads as noise.
        "latency_spread": round(spread(frame["ms_per_token"]), 3),
        "bytes_spread": round(spread(frame["cache_mib"]), 3),
        "latency_exponent": round(scaling_exponent(frame["context"], frame["ms_per_token"]), 3),
        "bytes_exponent": round(scaling_exponent(frame["context"], frame["cache_mib"]), 3),
    } for variant, frame in ok.groupby("variant")], columns=[
        "variant", "bounded", "contexts", "latency_spread", "bytes_spread",
        "latency_exponent", "bytes_exponent"])
    statuses = status_grid(rows, "context")
    latency, size = grid(rows, "ms_per_token", "context"), grid(rows, "cache_mib", "context")
    sec.tables = [
        ("growth over the contexts: spread = max / min - 1; exponent = slope of log(value) "
         "against log(context)", summary),
        ("per-token decode latency (ms, median)", shown(latency, statuses, False, "C=")),
        ("cache size (MiB, every layer)", shown(size, statuses, False, "C=")),
        ("every point", rows[["variant", "context", "status", "ms_per_token", "cache_mib",
                              "keys_per_layer", "prefill_tokens_per_s"]]
         .sort_values(["variant", "context"])),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, values, ylabel in ((axes[0], latency, "ms per token (median)"),
                               (axes[1], size, "cache MiB (all layers)")):
        lines_plot(ax, values)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=ylabel)
    sec.plots = [save(fig, plot_dir / "decode.png")]
    sec.failures = failure_lines(rows, lambda r: f"{r.variant} context={r.context}")
    return sec


# -- goals ----------------------------------------------------------------------------------

COMPARISONS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
STATISTICS = {"spread": lambda over, values: spread(values),
              "exponent": scaling_exponent}
GOAL_KEYS = ("goal", "rows", "where", "baseline", "metric", "over", "statistic", "compare",
             "threshold")


@dataclass(frozen=True)
class Goal:
    """One goal of a goals file (the format is in the module docstring)."""

    goal: str
    table: str
    metric: str
    compare: str
    threshold: float | tuple[float, float]
    rows: Mapping[str, Any] = field(default_factory=dict)
    where: str | None = None
    baseline: Mapping[str, Any] | None = None
    over: str | None = None
    statistic: str | None = None

    @classmethod
    def parse(cls, spec: Any, table: str, origin: str) -> Goal:
        """The goal `spec` (a yaml mapping) of a file's `table`; a `ValueError` naming
        `origin` (file and goal) and what is wrong."""
        def fail(what: str) -> ValueError:
            return ValueError(f"{origin}: {what}")

        if not isinstance(spec, Mapping):
            raise fail(f"a goal must be a mapping, got {spec!r}")
        unknown = sorted(set(spec) - set(GOAL_KEYS))
        if unknown:
            raise fail(f"unknown keys {unknown}; a goal has {', '.join(GOAL_KEYS)}")
        for key in ("goal", "metric", "compare", "threshold"):
            if key not in spec:
                raise fail(f"{key!r} is missing")
        compare, threshold = spec["compare"], spec["threshold"]
        if compare == "between":
            if (not isinstance(threshold, list) or len(threshold) != 2
                    or not all(_is_number(t) for t in threshold) or threshold[0] > threshold[1]):
                raise fail(f"threshold of 'between' must be [low, high], got {threshold!r}")
            threshold = (float(threshold[0]), float(threshold[1]))
        elif compare in COMPARISONS:
            if not _is_number(threshold):
                raise fail(f"threshold must be a number, got {threshold!r}")
            threshold = float(threshold)
        else:
            raise fail(f"compare must be one of {[*COMPARISONS, 'between']}, got {compare!r}")
        _check_selector(spec.get("rows", {}), fail, "rows")
        baseline = spec.get("baseline")
        if baseline is not None:
            if not isinstance(baseline, Mapping) or set(baseline) != {"rows", "match"} or not (
                    isinstance(baseline["match"], list) and baseline["match"]):
                raise fail(f"baseline must be {{rows: {{...}}, match: [columns]}}, got "
                           f"{baseline!r}")
            _check_selector(baseline["rows"], fail, "baseline rows")
        if ("over" in spec) != ("statistic" in spec) or spec.get(
                "statistic", "spread") not in STATISTICS:
            raise fail(f"over and statistic ({' or '.join(STATISTICS)}) go together, got "
                       f"over={spec.get('over')!r}, statistic={spec.get('statistic')!r}")
        for key in ("goal", "metric", "where", "over"):
            if key in spec and not (isinstance(spec[key], str) and spec[key]):
                raise fail(f"{key} must be a non-empty string, got {spec[key]!r}")
        return cls(spec["goal"], table, spec["metric"], compare, threshold,
                   dict(spec.get("rows", {})), spec.get("where"), baseline, spec.get("over"),
                   spec.get("statistic"))

    @property
    def target(self) -> str:
        if self.compare == "between":
            return f"in [{self.threshold[0]:g}, {self.threshold[1]:g}]"
        return f"{self.compare} {self.threshold:g}"

    def passes(self, values: pd.Series) -> pd.Series:
        if self.compare == "between":
            low, high = self.threshold
            return (values >= low) & (values <= high)
        return COMPARISONS[self.compare](values, self.threshold)

    def badness(self, values: pd.Series) -> pd.Series:
        """How far each value is from passing (the worst value has the largest)."""
        if self.compare == "between":
            low, high = self.threshold
            return np.maximum(low - values, values - high)
        return values if self.compare in ("<", "<=") else -values

    def compared(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        """(the ok points compared, with the metric as `value` and the baseline's columns as
        `base_<column>`; the selected points that failed, whose baseline ran; notes on what
        could not be compared)."""
        chosen = rows[select(rows, self.rows)]
        notes: list[str] = []
        if self.where is not None:
            chosen = chosen[self._values(chosen, self.where, notes).fillna(0).astype(bool)]
        failed = chosen[~chosen["status"].isin(OK_STATUSES)]
        ok = chosen[chosen["status"] == "ok"]
        if self.baseline is not None:
            base = rows[select(rows, self.baseline["rows"])]
            on = [c for c in self.baseline["match"] if c in rows]
            base_ok = base[base["status"] == "ok"].drop_duplicates(on, keep="last")
            renamed = base_ok[[*on, *[c for c in base_ok if c not in on]]].rename(
                columns={c: f"base_{c}" for c in base_ok if c not in on})
            ok = ok.merge(renamed, on=on, how="inner")
            failed = failed.merge(base_ok[on], on=on, how="inner")
            base_failed = base.loc[~base["status"].isin(OK_STATUSES), "status"]
            if len(base_failed):
                notes.append(f"the baseline failed at {len(base_failed)} point(s) "
                             f"({', '.join(sorted(set(base_failed)))})")
        return ok.assign(value=self._values(ok, self.metric, notes)), failed, notes

    def evaluate(self, rows: pd.DataFrame) -> dict[str, Any]:
        """The goal's row: target, worst value and where, points compared, failed points,
        met / not met / not measured, and a note (what could not be compared)."""
        length = SOURCES[self.table].length
        ok, failed, notes = self.compared(rows)
        values = ok["value"]
        where = ok["variant"] + [f" {length}={n}" for n in ok[length]]
        if self.over is not None:
            group_by = [c for c in (*SOURCES[self.table].setting, "attention", "params",
                                    "variant", "folder") if c in ok and c != self.over]
            aggregated = [(str(group["variant"].iloc[0]),
                           STATISTICS[self.statistic](numeric(group[self.over]),
                                                      values[group.index]))
                          for _, group in ok.groupby(group_by, dropna=False, sort=True)]
            where = pd.Series([w for w, _ in aggregated], dtype=object)
            values = pd.Series([v for _, v in aggregated], dtype=float)
        values = values.dropna()
        row: dict[str, Any] = {"goal": self.goal, "target": self.target, "worst": math.nan,
                               "at": "", "points": len(values), "failed": len(failed)}
        if len(values):
            worst = self.badness(values).idxmax()
            row |= {"worst": float(values[worst]), "at": where[worst]}
        if not len(values) and not len(failed):
            result = "not measured"
        else:
            result = "met" if not len(failed) and bool(self.passes(values).all()) else "not met"
        if len(failed):
            notes.insert(0, "failed: " + ", ".join(
                f"{v} {length}={n} ({s})" for v, n, s in zip(
                    failed["variant"], failed[length], failed["status"], strict=True)))
        return row | {"result": result, "note": "; ".join(notes)}

    def values_by_length(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The metric of every compared point as (goal, variant) x length cells (the ratios
        and efficiencies behind the goal); empty for a goal `over` the lengths."""
        length = SOURCES[self.table].length
        ok = self.compared(rows)[0].dropna(subset=["value"])
        if self.over is not None or ok.empty:
            return pd.DataFrame()
        table = ok.pivot_table(index="variant", columns=length, values="value", aggfunc="last")
        table.columns = [f"{'N' if length == 'seq_len' else 'C'}={n}" for n in table.columns]
        return table.rename_axis("variant").reset_index().assign(goal=self.goal)

    def _values(self, frame: pd.DataFrame, expression: str, notes: list[str]) -> pd.Series:
        """`expression` over `frame`'s columns as numbers (NaN where it has no value)."""
        names = set(re.findall(r"[A-Za-z_]\w*", expression))
        columns = {name: numeric(frame[name]) for name in names if name in frame}
        try:
            result = pd.DataFrame(columns, index=frame.index).eval(expression, engine="python")
        except Exception as error:  # an unknown column, or not an expression pandas reads
            if len(frame):
                notes.append(f"cannot compute {expression!r}: {type(error).__name__}: {error}")
            return pd.Series(math.nan, index=frame.index, dtype=float)
        if not isinstance(result, pd.Series):  # a constant
            result = pd.Series(result, index=frame.index)
        return result.astype(float)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_selector(selector: Any, fail, what: str) -> None:
    if not isinstance(selector, Mapping):
        raise fail(f"{what} must be a mapping of column to value, got {selector!r}")
    for column, wanted in selector.items():
        if isinstance(wanted, Mapping) and not (
                set(wanted) <= set(COMPARISONS) and all(map(_is_number, wanted.values()))):
            raise fail(f"{what}: {column} must be a value, a list or {{op: number}} with op in "
                       f"{list(COMPARISONS)}, got {wanted!r}")


def select(rows: pd.DataFrame, selector: Mapping[str, Any]) -> pd.Series:
    """Which rows match every `column: wanted` of `selector`: a value (numbers compare as
    numbers, anything else as text), a list of values (any of them) or {op: number}."""
    mask = pd.Series(True, index=rows.index)
    for column, wanted in selector.items():
        if column not in rows:
            return pd.Series(False, index=rows.index)
        values = rows[column]
        if isinstance(wanted, Mapping):
            for op, bound in wanted.items():
                mask &= COMPARISONS[op](numeric(values), bound)
            continue
        hit = pd.Series(False, index=rows.index)
        for option in wanted if isinstance(wanted, list) else [wanted]:
            hit |= ((numeric(values) == option) if _is_number(option)
                    else (values.astype(str) == str(option)))
        mask &= hit.fillna(False).astype(bool)
    return mask


@dataclass(frozen=True)
class GoalsFile:
    """A goals file: its name, the table its goals read, the goals."""

    name: str
    table: str
    goals: tuple[Goal, ...]


def load_goals(name: str | Path) -> GoalsFile:
    """`conf/goals/<name>.yaml`, or the yaml file at the path `name`; a `ValueError` naming
    the file and what is wrong."""
    path = Path(name)
    if not path.suffix:
        path = GOALS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in GOALS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"goals={name}: no file {path}; known goals: {known}")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, Mapping) or set(spec) != {"table", "goals"} or spec[
            "table"] not in SOURCES or not isinstance(spec["goals"], list):
        raise ValueError(f"{path}: a goals file is a mapping of `table` (one of "
                         f"{list(SOURCES)}) and `goals` (a list)")
    goals = tuple(Goal.parse(goal, spec["table"], f"{path} goal {index + 1}")
                  for index, goal in enumerate(spec["goals"]))
    return GoalsFile(path.stem, spec["table"], goals)


def goals_section(files: Sequence[GoalsFile], tables: Mapping[str, pd.DataFrame]
                  ) -> tuple[Section, pd.DataFrame]:
    """Every goal evaluated on its table's rows: one table per file (a file of which no goal
    was measured is one line)."""
    sec, evaluated = Section("Goals"), []
    for goals_file in files:
        frame = pd.DataFrame([goal.evaluate(tables[goals_file.table])
                              for goal in goals_file.goals])
        evaluated.append(frame.assign(file=goals_file.name))
        counts = frame["result"].value_counts()
        summary = ", ".join(f"{counts.get(r, 0)} {r}" for r in ("met", "not met",
                                                                "not measured"))
        if counts.get("not measured", 0) == len(frame):
            sec.failures.append(f"{goals_file.name} ({goals_file.table}): none of its "
                                f"{len(frame)} goals measured")
        else:
            sec.tables.append((f"goals of {goals_file.name} ({goals_file.table}): {summary}",
                               frame))
            points = [goal.values_by_length(tables[goals_file.table])
                      for goal in goals_file.goals]
            points = [frame for frame in points if not frame.empty]
            if points:
                by_length = pd.concat(points, ignore_index=True)
                lengths = sorted((c for c in by_length if c[:2] in ("N=", "C=")),
                                 key=lambda c: int(c[2:]))
                sec.tables.append((f"goals of {goals_file.name}: the value at each point",
                                   by_length[["goal", "variant", *lengths]]))
    return sec, pd.concat(evaluated, ignore_index=True) if evaluated else pd.DataFrame()


# -- the report -----------------------------------------------------------------------------


def run(folders: Sequence[str | Path], out: str | Path | None = None, *,
        speed: str | Path | None = None, goals: Sequence[str | Path] | None = None,
        wandb_logger: Mapping[str, Any] | None = None) -> Report:
    """Write `<out>/report.md` and `<out>/plots/` (out: the first folder) for every results
    table the folders hold.

    speed: a bench results folder to join the quality rows with (the frontier); goals: goals
    files (names under `conf/goals/` or paths), by default every one whose table the folders
    hold; wandb_logger: a `logger` mapping as in `conf/logger/wandb.yaml` to also log the
    speed rows to W&B as one run.
    """
    if not folders:
        raise ValueError("folders must name at least one results folder, got none")
    out = Path(out or folders[0])
    tables = {kind: load(folders, kind) for kind in SOURCES}
    if all(frame.empty for frame in tables.values()):
        names = ", ".join(source.csv for source in SOURCES.values())
        raise FileNotFoundError(f"no results ({names}) in {', '.join(map(str, folders))}: "
                                "are these results folders of experiments.bench, .train or "
                                ".decode?")
    plot_dir = out / "plots"
    sections: list[tuple[str, Section]] = []
    exponents: list[dict[str, Any]] = []
    for setting, group in speed_settings(tables["bench"]):
        sec, found = speed_section(setting, group, plot_dir)
        sections.append(("Speed", sec))
        exponents += found
    speed_rows = speed_costs(load([speed], "bench")) if speed is not None else None
    for setting, group in groups(tables["train"], QUALITY_SETTING):
        sections.append(("Quality", quality_section(setting, group, speed_rows, plot_dir)))
    for setting, group in groups(tables["train"], QUALITY_SETTING[:-1]):  # all but the seed
        if (spread_sec := seed_section(setting, group)) is not None:
            sections.append(("Quality", spread_sec))
    if not tables["decode"].empty:
        sections.append(("Decode", decode_section(tables["decode"], plot_dir)))
    if goals is None:  # every goals file whose table the folders hold
        files = [load_goals(path) for path in sorted(GOALS_DIR.glob("*.yaml"))]
        files = [found for found in files if not tables[found.table].empty]
    else:
        files = [load_goals(name) for name in goals]
    goal_sec, goal_rows = goals_section(files, tables)
    if files:
        sections.append(("Goals", goal_sec))
    sources = ", ".join(f"`{f}`" for f in folders)
    intro = {"bench": "Speed: medians after warm-up; fitted exponent = slope of log(value) over "
                      "log(N); useful TFLOP/s count the variant's own `flops` "
                      "(forward+backward = 3.5 forwards).",
             "train": "Quality: each point trains a fresh model at length N and evaluates "
                      "held-out sequences (the same for every variant)"
                      + (f"; frontier speed columns from `{speed}` (attention alone, "
                         "forward+backward)." if speed is not None else ".")}
    markdown = [f"# Results: {sources}\n",
                " ".join(line for kind, line in intro.items() if not tables[kind].empty)
                + "\n"]
    text = []
    for part, sec in sections:
        heading = part if part == sec.title else f"{part}: {sec.title}"
        markdown += [f"## {heading}\n", *([f"{sec.facts}\n"] if sec.facts else [])]
        markdown += [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in sec.plots]
        text += ["", f"== {heading}", *([sec.facts] if sec.facts else [])]
        for caption, table in sec.tables:
            markdown += [f"### {caption[0].upper()}{caption[1:]}\n", markdown_table(table)]
            text += ["", f"{caption}:", text_table(table)]
        if sec.failures:
            listed = "Not measured" if part == "Goals" else "Failed and skipped points"
            markdown += [f"### {listed}\n", *[f"* {line}" for line in sec.failures], ""]
            text += ["", f"{listed.lower()}:", *[f"  {line}" for line in sec.failures]]
    plots = [p for _, sec in sections for p in sec.plots]
    report_path = out / "report.md"
    write_atomic(report_path, "\n".join(markdown))
    text += ["", "plots: " + ", ".join(str(p) for p in plots), f"report: {report_path}"]
    if wandb_logger is not None and not tables["bench"].empty:
        log_to_wandb(tables["bench"], plots, out, wandb_logger)
    return Report("\n".join(markdown), "\n".join(text), plots, pd.DataFrame(exponents),
                  goal_rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="results folders (bench.csv, train.csv, "
                        "decode.csv)")
    parser.add_argument("--speed", help="a bench results folder to join the quality rows with "
                        "(the accuracy-vs-time and -memory frontier)")
    parser.add_argument("--goals", nargs="+", help="goals files: names under conf/goals/ or "
                        "paths (default: every one whose table the folders hold)")
    parser.add_argument("--out", help="where report.md and plots/ go (default: first folder)")
    parser.add_argument("--wandb", action="store_true", help="also log the speed rows to W&B")
    parser.add_argument("--wandb-mode", choices=["offline", "online"], default="offline")
    parser.add_argument("--wandb-project", default="attn-zoo")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    logger = ({"name": "wandb", "mode": args.wandb_mode, "project": args.wandb_project,
               "entity": args.wandb_entity} if args.wandb else None)
    print(run(args.folders, args.out, speed=args.speed, goals=args.goals,
              wandb_logger=logger).text)


if __name__ == "__main__":
    main()
