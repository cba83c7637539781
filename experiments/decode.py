"""Streaming decode benchmark: per-token latency and cache bytes against the context length.

    python -m experiments.decode attention=local out_dir=results/cpu/decode   # one variant
    python -m experiments.decode -m out_dir=results/cpu/decode                # every variant

Configs: `conf/decode.yaml` (typed by `experiments.config.DecodeConfig`). One job is one
variant in a small `TransformerLM` (random weights: speed and memory do not depend on them).
For each context length C of `contexts` (ascending), the model's `DecodeCache` is brought to C
positions by a chunked prefill through the caches (`prefill_chunk` tokens per call, exact: a
cache's `extend` equals that many single steps) and a copy of the cache is kept; the next
length continues from the cache. Then every copy decodes `warmup` untimed greedy tokens, and
`steps` rounds time one greedy decode step of each copy in turn, half of them in ascending and
half in descending order of context (so that drifts in machine load reach every context alike
and none always runs first). A point (variant, C) records:

* `ms_per_token`: per-token latency, the mean of its medians in the two orders (the whole
  model, batch `batch`);
* `cache_mib`: bytes of every layer's cache tensors after the timed steps, in MiB, and
  `keys_per_layer`: positions a layer's cache holds (pooled keys counted once each);
* `prefill_tokens_per_s`: throughput of the chunked prefill that reached C.

Variants listed in `bounded` (constant-size caches) run every context; the others (growing
caches, quadratic prefill) stop at `max_context`, and their longer contexts become rows with
status `skipped`. A failing point is a row with `status` (oom, unsupported, error) and the
message; the sweep goes on. Rows go to `<out_dir>/decode.csv` (rewritten atomically); a point
already there is not measured again (failed ones are, with `retry_failed=true`), so a re-run
resumes. After each job the table (`decode.md`, `decode_table.csv`) and the plot
(`decode.png`) are rebuilt from every row.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from attn_zoo import DecodeCache, TransformerLM
from experiments.bench import (
    CONF_DIR,
    check_device,
    classify,
    device_name,
    environment,
)
from experiments.config import attention_params, register_configs
from experiments.measure import (
    MIB,
    interleaved_median_times,
    locked,
    print_tables,
    read_rows,
    write_atomic,
    write_tables,
)

log = logging.getLogger(__name__)

CSV_NAME = "decode.csv"
MODEL_AXES = ("vocab_size", "dim", "depth", "heads", "kv_heads", "batch", "dtype", "device",
              "prefill_chunk", "steps")
KEY = ("attention", "params", "context", *MODEL_AXES)
METRICS = ("ms_per_token", "cache_mib", "keys_per_layer", "prefill_tokens_per_s")
COLUMNS = (*KEY, "status", "error", *METRICS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLAT_GOAL = 0.10
"""A bounded cache's latency and bytes stay within 10% over the contexts (max / min - 1)."""


# -- rows -----------------------------------------------------------------------------------


def key_of(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[column]) for column in KEY)


def write_row(out_dir: Path, row: dict[str, Any]) -> None:
    """Add `row` to `<out_dir>/decode.csv`, replacing a row with the same key, atomically."""
    with locked(out_dir / CSV_NAME):
        rows = read_rows(out_dir / CSV_NAME, COLUMNS, KEY)
        if not rows.empty:
            rows = rows[[key_of(old) != key_of(row) for _, old in rows.iterrows()]]
        fresh = pd.DataFrame([row])
        merged = fresh if rows.empty else pd.concat([rows, fresh], ignore_index=True)
        order = [c for c in COLUMNS if c in merged] + [c for c in merged if c not in COLUMNS]
        write_atomic(out_dir / CSV_NAME, merged[order].to_csv(index=False))


def points_of(cfg: DictConfig) -> list[dict[str, Any]]:
    """The identifying columns of every point (one per context) of the job `cfg`."""
    values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    params = attention_params(cfg.attention)
    base = {"attention": cfg.attention.name, "params": json.dumps(params, sort_keys=True)}
    base |= {axis: values[axis] for axis in MODEL_AXES}
    return [base | {"context": context} for context in sorted(values["contexts"])]


# -- measuring ------------------------------------------------------------------------------


class Stream:
    """A model's cache at some context and its last token, decoded one greedy token per step."""

    def __init__(self, model: TransformerLM, cache: DecodeCache, last: torch.Tensor) -> None:
        self.model, self.cache, self.last = model, cache, last

    def step(self) -> None:
        """One greedy decode step: the last token in, the next one out."""
        with torch.no_grad():
            self.last = self.model(self.last, self.cache)[:, -1:].argmax(-1)

    def size(self) -> dict[str, float]:
        """The cache's bytes (MiB, every layer) and the positions a layer holds."""
        layers = self.cache.layers
        return {"cache_mib": self.cache.nbytes() / MIB,
                "keys_per_layer": sum(len(layer) for layer in layers) / len(layers)}


class Decoder:
    """A model and one cache, brought to longer and longer contexts by chunked prefill."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.model = TransformerLM(
            cfg.vocab_size, cfg.dim, cfg.depth, cfg.heads, cfg.kv_heads,
            attention=cfg.attention.name, attention_params=attention_params(cfg.attention),
        ).to(device=device, dtype=DTYPES[cfg.dtype.name]).eval()
        self.cache = self.model.init_cache()
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        self.last = torch.zeros(cfg.batch, 1, dtype=torch.long, device=device)

    def prefill(self, context: int) -> float:
        """Bring the cache to `context` positions with random tokens; returns tokens/s."""
        todo = context - self.cache.seen
        begin = time.perf_counter()
        with torch.no_grad():
            while self.cache.seen < context:
                size = min(self.cfg.prefill_chunk, context - self.cache.seen)
                chunk = torch.randint(0, self.cfg.vocab_size, (self.cfg.batch, size),
                                      generator=self.generator, device=self.device)
                self.last = self.model(chunk, self.cache)[:, -1:].argmax(-1)
        return todo / max(time.perf_counter() - begin, 1e-9)

    def fork(self) -> Stream:
        """A stream that decodes from a copy of the cache as it is now (the model is shared)."""
        shared = {id(layer.attention): layer.attention for layer in self.cache.layers}
        return Stream(self.model, copy.deepcopy(self.cache, shared), self.last.clone())


def time_streams(streams: dict[int, Stream], cfg: DictConfig,
                 device: torch.device) -> dict[int, dict[str, float]]:
    """Per-token latency and size of every stream: `warmup` untimed steps each, then rounds of
    one timed step per stream in turn, `steps` / 2 rounds in ascending and as many in descending
    order of context: drifts in machine load reach every context alike, and no context always
    runs first. A stream's latency is the mean of its two medians."""
    for stream in streams.values():
        for _ in range(cfg.warmup):
            stream.step()
    passes = [interleaved_median_times({context: streams[context].step for context in order},
                                       device=device, repeats=max(1, cfg.steps // 2))
              for order in (sorted(streams), sorted(streams, reverse=True))]
    return {context: {"ms_per_token": sum(p[context] for p in passes) / 2 * 1e3}
            | stream.size() for context, stream in streams.items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure every point of the job `cfg` not done yet; write their rows and the report.

    Returns {"rows": this job's rows (fresh or reused), "measured": how many were measured}.
    """
    out_dir = Path(cfg.out_dir)
    with locked(out_dir / CSV_NAME):
        rows = read_rows(out_dir / CSV_NAME, COLUMNS, KEY)
        done = {key_of(row): row for row in rows.to_dict("records")}
    bounded = cfg.attention.name in cfg.bounded
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    rows: dict[int, dict[str, Any]] = {}
    streams: dict[int, Stream] = {}
    decoder, broken, device = None, "", torch.device("cpu")
    for point in points_of(cfg):
        context = point["context"]
        earlier = done.get(key_of(point))
        if earlier is not None and earlier["status"] != "skipped" and (
                earlier["status"] == "ok" or not cfg.retry_failed):
            rows[context] = earlier | {"measured": False}
            continue
        row = rows[context] = dict(point) | {"measured": True}
        if not bounded and context > cfg.max_context:
            row |= {"status": "skipped", "error": f"context above max_context="
                    f"{cfg.max_context} for a cache that grows with the context"}
        elif broken:
            row |= {"status": "error", "error": f"an earlier context failed: {broken}"}
        else:
            try:
                device = check_device(cfg.device)
                row |= environment(device)
                decoder = decoder or Decoder(cfg, device)
                row["prefill_tokens_per_s"] = decoder.prefill(context)
                streams[context] = decoder.fork()
            except Exception as error:  # a failing point is a row; the sweep goes on
                # The cache is in an unknown state: the longer contexts fail too.
                broken = fail(row, error)
    if streams:
        try:
            for context, measured in time_streams(streams, cfg, device).items():
                rows[context] |= measured | {"status": "ok", "error": ""}
        except Exception as error:
            for context in streams:
                fail(rows[context], error)
    for row in rows.values():
        if row["measured"]:
            write_row(out_dir, {key: value for key, value in row.items() if key != "measured"})
            log.info("%s-c%s %s", row["attention"], row["context"], row["status"])
    write_report(out_dir, cfg)
    return {"rows": list(rows.values()),
            "measured": sum(bool(row["measured"]) for row in rows.values())}


def fail(row: dict[str, Any], error: BaseException) -> str:
    """Mark `row` failed by `error` (status and message); returns the message."""
    row |= {"status": classify(error),
            "error": f"{type(error).__name__}: {error}".replace("\n", " ")}
    log.error("%s-c%s failed: %s", row["attention"], row["context"], row["error"])
    return row["error"]


# -- the report -----------------------------------------------------------------------------


def flatness(frame: pd.DataFrame, column: str) -> float:
    """max / min - 1 of `column` over a variant's ok rows (NaN with fewer than two)."""
    values = frame[column].dropna()
    return values.max() / values.min() - 1 if len(values) > 1 else math.nan


def growth_exponent(frame: pd.DataFrame, column: str) -> float:
    """Slope of log(column) against log(context): 1 is linear growth, 0 flat."""
    ok = frame.dropna(subset=[column])
    if len(ok) < 2:
        return math.nan
    return float(np.polyfit(np.log(ok["context"].astype(float)), np.log(ok[column]), 1)[0])


def tables(rows: pd.DataFrame, bounded: list[str]) -> dict[str, tuple[str, pd.DataFrame]]:
    """The goal summary, the latency and bytes pivots and the per-point table of `rows` (every
    column of `COLUMNS`, context as int)."""
    ok = rows[rows["status"] == "ok"].astype({column: float for column in METRICS})
    points = rows[["attention", "context", "status", *METRICS, "error"]].copy()
    points["error"] = points["error"].astype(object).fillna("")
    points = points.sort_values(["attention", "context"])
    pivots = {}
    for column in ("ms_per_token", "cache_mib"):
        frame = ok.pivot_table(index="attention", columns="context", values=column)
        frame.columns = [str(c) for c in frame.columns]
        pivots[column] = frame.reset_index()
    summary = []
    for name, frame in ok.groupby("attention"):
        summary.append({
            "attention": name, "bounded": name in bounded,
            "contexts": f"{frame['context'].min()}..{frame['context'].max()}",
            # Rounded: a constant size fits an exponent of 1e-17, which reads as noise.
            "latency_spread": round(flatness(frame, "ms_per_token"), 3),
            "bytes_spread": round(flatness(frame, "cache_mib"), 3),
            "latency_exponent": round(growth_exponent(frame, "ms_per_token"), 3),
            "bytes_exponent": round(growth_exponent(frame, "cache_mib"), 3),
        })
        row = summary[-1]
        if name in bounded:
            flat = max(row["latency_spread"], row["bytes_spread"]) <= FLAT_GOAL
            row["goal"] = f"flat within {FLAT_GOAL:.0%}: {'met' if flat else 'missed'}"
        elif name == "full":
            linear = abs(row["bytes_exponent"] - 1) <= FLAT_GOAL
            row["goal"] = f"bytes linear: {'met' if linear else 'missed'}"
        else:
            row["goal"] = ""
    summary = pd.DataFrame(summary)
    return {
        "decode_summary": ("Growth over the contexts: spread = max / min - 1; exponent = "
                           "slope of log(value) against log(context)", summary),
        "decode_ms_per_token": ("Per-token decode latency (ms, median)", pivots["ms_per_token"]),
        "decode_cache_mib": ("Cache size (MiB, every layer)", pivots["cache_mib"]),
        "decode_points": ("Every point", points),
    }


def plot(rows: pd.DataFrame, path: Path) -> None:
    """Latency and cache bytes against context, log-log, one line per variant (rows as for
    `tables`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = rows[rows["status"] == "ok"].astype({"ms_per_token": float, "cache_mib": float})
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, frame in ok.sort_values("context").groupby("attention"):
        for axis, column in zip(axes, ("ms_per_token", "cache_mib"), strict=True):
            axis.plot(frame["context"], frame[column], marker="o", label=name)
    for axis, label in zip(axes, ("ms per token (median)", "cache MiB (all layers)"),
                           strict=True):
        axis.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    if not ok.empty:
        axes[1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


def write_report(out_dir: Path, cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Rebuild `decode.md`, the table CSVs and `decode.png` from every row under `out_dir`."""
    with locked(out_dir / CSV_NAME):
        rows = read_rows(out_dir / CSV_NAME, COLUMNS, KEY)
    if rows.empty:
        return {}
    rows = rows.reindex(columns=list(dict.fromkeys([*COLUMNS, *rows.columns])))
    rows["context"] = rows["context"].astype(int)
    built = tables(rows, list(cfg.bounded))
    first = rows.iloc[0]
    header = (f"# Streaming decode: latency and cache size against context\n\n"
              f"Model: TransformerLM dim={first['dim']}, depth={first['depth']}, "
              f"heads={first['heads']}, kv_heads={first['kv_heads']}, "
              f"vocab={first['vocab_size']}, batch={first['batch']}, {first['dtype']} on "
              f"{first.get('device_name', first['device'])} with "
              f"{first.get('threads', '?'):.0f} thread(s). Context built by chunked prefill "
              f"({first['prefill_chunk']} tokens per call); latency: {first['steps']} greedy "
              f"decode steps per context, interleaved across contexts (half in ascending, half "
              f"in descending order), mean of the two medians. Goal: bounded caches "
              f"({', '.join(cfg.bounded)}) flat within {FLAT_GOAL:.0%} in latency and bytes; "
              f"`full` bytes growing linearly (exponent 1).\n\n![decode](decode.png)\n")
    write_tables(out_dir, "decode", header, built)
    plot(rows, out_dir / "decode.png")
    return {key: frame for key, (_, frame) in built.items()}


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="decode", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    result = run(cfg)
    shown = pd.DataFrame(result["rows"])[["attention", "context", "status", *METRICS]]
    print_tables({f"{cfg.attention.name} on {device_name(torch.device(cfg.device))}": shown},
                 Path(cfg.out_dir))
    return result


if __name__ == "__main__":
    main()
