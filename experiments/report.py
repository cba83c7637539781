"""Tables, plots and scaling exponents from benchmark results folders.

    python -m experiments.report results/bench                   # writes results/bench/report.md
    python -m experiments.report results/a results/b --out results/ab
    python -m experiments.report results/bench --wandb           # + a W&B run (offline)

Reads `bench.csv` of each folder (written by `experiments.bench`). Rows are grouped by
setting (device, dtype, batch, heads, kv_heads, head_dim, causal, backend, mode); for each,
for the forward and, when measured, the forward+backward: time and peak memory as variants x
sequence lengths, each with the fitted scaling exponent (the least-squares slope of log value
over log N through the ok points: time ~ N^exponent), the speedup over `full` (its time
over the variant's) and the memory ratio to `full` (the variant's peak over its), and useful
TFLOP/s beside the measured matmul peak. A failed point shows its status (oom, unsupported,
error) in its cells. Log-log plots of time and memory vs N per variant go to
`<out>/plots/{time,memory}_<setting>.png`; everything is written to `<out>/report.md` and
printed. With `--wandb`, one W&B run (offline unless `--wandb-mode online`) logs the rows as a
Table and a line plot of each metric vs sequence length per variant.

A folder holding `train.csv` (written by `experiments.train`) gets the quality report instead:

    python -m experiments.report results/cpu/quality --speed results/cpu/sweep

per task (and model and budget): the metric (accuracy, or bits per byte for text) as
variants x training lengths (evaluated at the training length), the length-extrapolation
table when points were evaluated at other lengths, and, with `--speed` (a bench results
folder), the frontier: each (variant, N) evaluated at a length the speed sweep measured, with
its accuracy beside the attention's forward+backward time and peak memory at that N (the
speed sweep's training-step columns `fwd_bwd_ms` and `peak_mem_mib`, its last ok row of the
same variant and parameters), and whether it is on the Pareto frontier of its N (no other
variant at that N is at least as accurate and at most as costly, and better in one). Plots:
`<out>/plots/quality_<task>.png` (metric vs N) and `frontier_<task>.png` (accuracy vs time
and vs memory).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.measure import format_number, markdown_table, text_table, write_atomic  # noqa: E402
from experiments.wandb_logger import start_run  # noqa: E402

CSV_NAME = "bench.csv"
QUALITY_CSV = "train.csv"
QUALITY_SETTING = ("task", "task_params", "model", "steps", "tokens_per_step", "lr", "seed")
SPEED_COLUMNS = {"fwd_bwd_ms": "attention fwd+bwd ms", "peak_mem_mib": "attention peak MiB"}
SETTING = ("device", "device_name", "dtype", "batch", "heads", "kv_heads", "head_dim", "causal",
           "backend", "mode")
PHASES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
MODE_PHASES = {"fwd": ("fwd",), "fwd_bwd": ("fwd_bwd",), "both": ("fwd", "fwd_bwd")}
BASELINE = "full"


@dataclass
class Report:
    """What `run` produced: the markdown file's text, the terminal text, the plot files."""

    markdown: str
    text: str
    plots: list[Path] = field(default_factory=list)
    exponents: pd.DataFrame = field(default_factory=pd.DataFrame)


def load(folders: Sequence[str | Path]) -> pd.DataFrame:
    """The rows of every folder's bench.csv, with a `variant` label per parameter setting."""
    frames = []
    for folder in folders:
        path = Path(folder) / CSV_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: is {folder} a results folder of "
                                    "experiments.bench?")
        frames.append(pd.read_csv(path).assign(folder=str(folder)))
    rows = pd.concat(frames, ignore_index=True)
    rows["device_name"] = rows.get("device_name", pd.Series(dtype=str)).fillna("")
    rows["error"] = rows["error"].fillna("")
    rows["variant"] = variant_labels(rows)
    return rows


def variant_labels(rows: pd.DataFrame) -> pd.Series:
    """`attention`, plus `key=value` for each parameter that varies among its rows."""
    params = rows["params"].map(json.loads)
    labels = rows["attention"].copy()
    for name, index in rows.groupby("attention").groups.items():
        settings = params[index]
        varying = sorted(key for key in settings.iloc[0]
                         if settings.map(lambda p, key=key: json.dumps(p.get(key))).nunique() > 1)
        if varying:
            labels[index] = [name + " " + " ".join(f"{key}={p[key]}" for key in varying)
                             for p in settings]
    return labels


def scaling_exponent(n: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) over log(n) through the finite positive points."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    good = np.isfinite(values) & (values > 0)
    if good.sum() < 2 or np.unique(n[good]).size < 2:
        return math.nan
    return float(np.polyfit(np.log(n[good]), np.log(values[good]), 1)[0])


def setting_slug(setting: Mapping[str, Any]) -> str:
    """A file-name-safe name of a setting, e.g. `cpu-float32-b1-h8-kv8-d64-causal-auto-both`."""
    return (f"{setting['device'].replace(':', '')}-{setting['dtype']}-b{setting['batch']}"
            f"-h{setting['heads']}-kv{setting['kv_heads']}-d{setting['head_dim']}-"
            f"{'causal' if str(setting['causal']) == 'True' else 'bidir'}-{setting['backend']}"
            f"-{setting['mode']}")


def grid(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """variant x seq_len values of `column` from ok rows (NaN elsewhere; last row wins)."""
    ok = rows[rows["status"] == "ok"]
    table = ok.pivot_table(index="variant", columns="seq_len", values=column, aggfunc="last")
    return table.reindex(index=sorted(rows["variant"].unique()),
                         columns=sorted(rows["seq_len"].unique()))


def status_grid(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.pivot_table(index="variant", columns="seq_len", values="status",
                            aggfunc="last").reindex(index=sorted(rows["variant"].unique()),
                                                    columns=sorted(rows["seq_len"].unique()))


def shown(values: pd.DataFrame, statuses: pd.DataFrame, exponent: bool) -> pd.DataFrame:
    """Cells as text: the number, or the failed point's status; plus the fitted exponent."""
    cells = values.copy().astype(object)
    for variant in values.index:
        for n in values.columns:
            status = statuses.loc[variant, n]
            cells.loc[variant, n] = (format_number(float(values.loc[variant, n]))
                                     if status == "ok" else ("" if pd.isna(status) else status))
    cells.columns = [f"N={n}" for n in values.columns]
    if exponent:
        cells["exponent"] = [f"{scaling_exponent(values.columns, values.loc[v]):.2f}"
                             for v in values.index]
    return cells.reset_index()


@dataclass
class Section:
    """One setting's tables and plots."""

    title: str
    facts: str
    tables: list[tuple[str, pd.DataFrame]]
    plots: list[Path]
    failures: list[str]
    exponents: list[dict[str, Any]]


def section(setting: Mapping[str, Any], rows: pd.DataFrame, plot_dir: Path) -> Section:
    """Tables, plots and exponents of one setting's rows."""
    phases = MODE_PHASES[setting["mode"]]
    statuses = status_grid(rows)
    tables, exponents = [], []
    baseline = BASELINE if BASELINE in statuses.index else None
    for phase in phases:
        time, memory = grid(rows, f"{phase}_ms"), grid(rows, f"{phase}_peak_mib")
        tables.append((f"{PHASES[phase]} time (ms)", shown(time, statuses, True)))
        tables.append((f"{PHASES[phase]} peak memory (MiB)", shown(memory, statuses, True)))
        if baseline:
            tables.append((f"{PHASES[phase]} speedup vs {baseline} (its time / variant's)",
                           shown(time.rdiv(time.loc[baseline], axis=1), statuses, False)))
            tables.append((f"{PHASES[phase]} memory vs {baseline} (variant's peak / its)",
                           shown(memory.div(memory.loc[baseline], axis=1), statuses, False)))
        tables.append((f"{PHASES[phase]} useful TFLOP/s",
                       shown(grid(rows, f"{phase}_tflops"), statuses, False)))
        for variant in time.index:
            exponents.append({"setting": setting_slug(setting), "variant": variant,
                              "phase": phase,
                              "time_exponent": scaling_exponent(time.columns, time.loc[variant]),
                              "memory_exponent": scaling_exponent(memory.columns,
                                                                  memory.loc[variant])})
    slug = setting_slug(setting)
    plots = [plot(rows, phases, "ms", "time (ms)", plot_dir / f"time_{slug}.png"),
             plot(rows, phases, "peak_mib", "peak memory (MiB)", plot_dir / f"memory_{slug}.png")]
    peaks = rows["matmul_peak_tflops"].dropna() if "matmul_peak_tflops" in rows else []
    versions = sorted(set(rows["torch_version"].dropna().astype(str)))
    facts = (f"{setting['device_name'] or setting['device']}; torch {', '.join(versions)}"
             + (f"; {int(rows['threads'].max())} threads" if rows["threads"].notna().any()
                and setting["device"] == "cpu" else "")
             + (f"; measured {setting['dtype']} matmul peak {format_number(peaks.iloc[-1])} "
                "TFLOP/s" if len(peaks) else ""))
    failed = rows[rows["status"] != "ok"]
    failures = [f"{r.variant} N={r.seq_len}: {r.status}: {r.error}" for r in failed.itertuples()]
    title = (f"{setting['device']} {setting['dtype']}, B={setting['batch']} "
             f"heads={setting['heads']} kv_heads={setting['kv_heads']} "
             f"head_dim={setting['head_dim']}, "
             f"{'causal' if str(setting['causal']) == 'True' else 'bidirectional'}, "
             f"backend={setting['backend']}, mode={setting['mode']}")
    return Section(title, facts, tables, plots, failures, exponents)


def plot(rows: pd.DataFrame, phases: Sequence[str], suffix: str, ylabel: str,
         path: Path) -> Path:
    """Log-log lines of `<phase>_<suffix>` vs N per variant, one panel per phase."""
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        values = grid(rows, f"{phase}_{suffix}")
        for variant in values.index:
            line = values.loc[variant].dropna()
            if len(line):
                ax.plot(line.index, line.values, marker="o", label=variant)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=ylabel,
               title=PHASES[phase])
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def settings_of(rows: pd.DataFrame):
    """(setting dict, its rows) for every setting present, in a stable order."""
    for values, group in rows.groupby(list(SETTING), dropna=False, sort=True):
        yield dict(zip(SETTING, values, strict=True)), group


def run(folders: Sequence[str | Path], out: str | Path | None = None,
        wandb_logger: Mapping[str, Any] | None = None) -> Report:
    """Write `<out>/report.md` and `<out>/plots/` (out: the first folder by default).

    wandb_logger: a `logger` mapping as in `conf/logger/wandb.yaml` to also log the sweep
    to W&B as one run; None for no W&B.
    """
    out = Path(out or folders[0])
    rows = load(folders)
    sections = [section(setting, group, out / "plots") for setting, group in settings_of(rows)]
    sources = ", ".join(f"`{f}`" for f in folders)
    markdown = [f"# Attention benchmark: {sources}\n",
                "Medians after warm-up; fitted exponent = slope of log(value) over log(N). "
                "Useful TFLOP/s count the variant's own `flops` (forward+backward = 3.5 "
                "forwards).\n"]
    text = []
    for sec in sections:
        markdown += [f"## {sec.title}\n", f"{sec.facts}\n"]
        markdown += [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in sec.plots]
        text += ["", f"== {sec.title}", sec.facts]
        for caption, table in sec.tables:
            markdown += [f"### {caption[0].upper()}{caption[1:]}\n", markdown_table(table)]
            text += ["", f"{caption}:", text_table(table)]
        if sec.failures:
            markdown += ["### Failed points\n", *[f"* {line}" for line in sec.failures], ""]
            text += ["", "failed points:", *[f"  {line}" for line in sec.failures]]
        text += ["", "plots: " + ", ".join(str(p) for p in sec.plots)]
    report_path = out / "report.md"
    write_atomic(report_path, "\n".join(markdown))
    text += ["", f"report: {report_path}"]
    exponents = pd.DataFrame([e for sec in sections for e in sec.exponents])
    plots = [p for sec in sections for p in sec.plots]
    if wandb_logger is not None:
        log_to_wandb(rows, plots, out, wandb_logger)
    return Report("\n".join(markdown), "\n".join(text), plots, exponents)


def log_to_wandb(rows: pd.DataFrame, plots: Sequence[Path], out: Path,
                 logger: Mapping[str, Any]) -> None:
    """One W&B run: the rows as a Table, line plots vs N per variant, and the PNG plots."""
    import wandb

    wandb_run = start_run(logger, name=f"report-{out.name}", group=out.name, job_type="report",
                          config={"folders": sorted(rows["folder"].unique())}, dir=out)
    metrics: dict[str, Any] = {"report/rows": wandb.Table(dataframe=rows.astype(str))}
    for setting, group in settings_of(rows):
        slug = setting_slug(setting)
        for phase in MODE_PHASES[setting["mode"]]:
            for suffix, what in (("ms", "time (ms)"), ("peak_mib", "peak memory (MiB)")):
                values = grid(group, f"{phase}_{suffix}")
                lines = {v: values.loc[v].dropna() for v in values.index}
                lines = {v: line for v, line in lines.items() if len(line)}
                metrics[f"report/{slug}/{phase}_{suffix}"] = wandb.plot.line_series(
                    xs=[list(map(int, line.index)) for line in lines.values()],
                    ys=[list(map(float, line.values)) for line in lines.values()],
                    keys=list(lines), title=f"{PHASES[phase]} {what} vs N ({slug})",
                    xname="seq_len")
    metrics |= {f"report/plots/{p.stem}": wandb.Image(str(p)) for p in plots}
    wandb_run.log(metrics)
    wandb_run.finish()


# -- quality ---------------------------------------------------------------------------------


def load_quality(folder: str | Path) -> pd.DataFrame:
    """The rows of `<folder>/train.csv`, with a `variant` label per parameter setting."""
    path = Path(folder) / QUALITY_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {folder} a results folder of "
                                "experiments.train?")
    rows = pd.read_csv(path, dtype={"error": str, "params": str, "task_params": str})
    rows["error"] = rows["error"].fillna("")
    rows["variant"] = variant_labels(rows)
    return rows


def quality_metric(rows: pd.DataFrame) -> str:
    """"bits_per_byte" for text tasks, else "accuracy"."""
    return ("bits_per_byte" if "bits_per_byte" in rows and rows["bits_per_byte"].notna().any()
            else "accuracy")


def quality_grid(rows: pd.DataFrame, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, statuses) as variant x seq_len over the rows evaluated at their own length."""
    own = rows[rows["eval_len"] == rows["seq_len"]]
    return grid(own, column), status_grid(own)


def extrapolation_table(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """variant x "train N -> eval L" cells of the metric, for every evaluated length."""
    ok = rows[rows["status"] == "ok"]
    table = ok.pivot_table(index="variant", columns=["seq_len", "eval_len"], values=metric,
                           aggfunc="last")
    table.columns = [f"{n}->{length}" for n, length in table.columns]
    return table.reset_index()


def load_speed(folder: str | Path) -> pd.DataFrame:
    """(attention, params, seq_len) -> the speed sweep's columns of its last ok row."""
    speed = load([folder])
    ok = speed[speed["status"] == "ok"]
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
    ok = rows[(rows["status"] == "ok") & (rows["eval_len"] == rows["seq_len"])]
    joined = ok.merge(speed, on=["attention", "params", "seq_len"], how="inner")
    # Lower bits per byte is better: the frontier reads quality as its negation.
    quality = -joined[metric] if metric == "bits_per_byte" else joined[metric]
    frames = []
    for _, index in joined.groupby("seq_len").groups.items():
        part = joined.loc[index].assign(
            pareto_time=pareto(joined.loc[index, "fwd_bwd_ms"], quality[index]),
            pareto_memory=pareto(joined.loc[index, "peak_mem_mib"], quality[index]))
        frames.append(part)
    columns = ["seq_len", "variant", metric, *SPEED_COLUMNS, "pareto_time", "pareto_memory"]
    if not frames:
        return pd.DataFrame(columns=columns).rename(columns={"seq_len": "N", **SPEED_COLUMNS})
    table = pd.concat(frames).sort_values(["seq_len", "fwd_bwd_ms"])[columns]
    return table.rename(columns={"seq_len": "N", **SPEED_COLUMNS}).reset_index(drop=True)


def quality_plot(values: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """The metric vs training length N per variant."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant in values.index:
        line = values.loc[variant].dropna()
        if len(line):
            ax.plot(line.index, line.values, marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sequence length N (train = eval)", ylabel=metric.replace("_", " "),
           title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_plot(table: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """Accuracy vs time and vs memory: one marker per variant, one colour per N, the Pareto
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_run(folder: str | Path, speed: str | Path | None = None,
                out: str | Path | None = None) -> Report:
    """Write the quality report of `<folder>/train.csv` to `<out>/report.md` (out: folder),
    joined with the speed sweep in `speed` (a bench results folder) when given."""
    out = Path(out or folder)
    rows = load_quality(folder)
    speed_rows = load_speed(speed) if speed is not None else None
    markdown = [f"# Quality: `{folder}`\n",
                "Each point trains a fresh model on the task at length N and evaluates it on "
                "held-out sequences (the same for every variant)."
                + (f" Speed columns: `{speed}` (attention alone, forward+backward)."
                   if speed is not None else "") + "\n"]
    text, plots = [], []
    for values_of, group in group_settings(rows):
        metric = quality_metric(group)
        slug = "-".join(str(values_of[k]) for k in ("task", "model")) + f"-s{values_of['steps']}"
        title = (f"{values_of['task']} {values_of['task_params']}, model {values_of['model']}, "
                 f"{values_of['steps']} steps x {values_of['tokens_per_step']} tokens, "
                 f"lr {values_of['lr']}, seed {values_of['seed']}")
        values, statuses = quality_grid(group, metric)
        table = shown(values, statuses, exponent=False)
        plots.append(quality_plot(values, metric, values_of["task"],
                                  out / "plots" / f"quality_{slug}.png"))
        markdown += [f"## {title}\n", f"![quality_{slug}](plots/quality_{slug}.png)\n",
                     f"### {metric.replace('_', ' ')} (train length = eval length)\n",
                     markdown_table(table)]
        text += ["", f"== {title}", f"{metric}:", text_table(table)]
        if (group["eval_len"] != group["seq_len"]).any():
            extra = extrapolation_table(group, metric)
            markdown += [f"### {metric.replace('_', ' ')}, train length -> eval length\n",
                         markdown_table(extra)]
            text += ["", "train length -> eval length:", text_table(extra)]
        if speed_rows is not None:
            frontier = frontier_table(group, speed_rows, metric)
            markdown.append(f"### Frontier: {metric.replace('_', ' ')} vs attention cost\n")
            if len(frontier):
                plots.append(frontier_plot(frontier, metric, values_of["task"],
                                           out / "plots" / f"frontier_{slug}.png"))
                markdown.append(f"![frontier_{slug}](plots/frontier_{slug}.png)\n")
            markdown.append(markdown_table(frontier) if len(frontier) else
                            "No point at a length the speed sweep measured.\n")
            text += ["", "frontier:", text_table(frontier)]
        failed = group[group["status"] != "ok"]
        if len(failed):
            lines = [f"{r.variant} N={r.seq_len} eval {r.eval_len}: {r.status}: {r.error}"
                     for r in failed.itertuples()]
            markdown += ["### Failed points\n", *[f"* {line}" for line in lines], ""]
            text += ["", "failed points:", *[f"  {line}" for line in lines]]
    report_path = out / "report.md"
    write_atomic(report_path, "\n".join(markdown))
    text += ["", "plots: " + ", ".join(str(p) for p in plots), f"report: {report_path}"]
    return Report("\n".join(markdown), "\n".join(text), plots)


def group_settings(rows: pd.DataFrame):
    """(setting dict, its rows) per task, model and budget, in a stable order."""
    for values, group in rows.groupby(list(QUALITY_SETTING), dropna=False, sort=True):
        yield dict(zip(QUALITY_SETTING, values, strict=True)), group


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+",
                        help="results folders holding bench.csv, or one holding train.csv")
    parser.add_argument("--speed", help="with a train.csv folder: the bench folder to join "
                        "into the accuracy-vs-time and -memory frontier")
    parser.add_argument("--out", help="where report.md and plots/ go (default: first folder)")
    parser.add_argument("--wandb", action="store_true", help="also log the sweep to W&B")
    parser.add_argument("--wandb-mode", choices=["offline", "online"], default="offline")
    parser.add_argument("--wandb-project", default="attn-zoo")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    if (Path(args.folders[0]) / QUALITY_CSV).exists():
        if len(args.folders) > 1:
            parser.error("a quality report reads one train.csv folder")
        print(quality_run(args.folders[0], args.speed, args.out).text)
        return
    logger = ({"name": "wandb", "mode": args.wandb_mode, "project": args.wandb_project,
               "entity": args.wandb_entity} if args.wandb else None)
    print(run(args.folders, args.out, logger).text)


if __name__ == "__main__":
    main()
