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

A variant whose cache is bounded (its cache class declares `bounded = True`: constant size)
runs every context; the others (growing caches, quadratic prefill) stop at `max_context`, and
their longer contexts become rows with status `skipped`. A failing point is a row with
`status` (oom, unsupported, error) and the message; the sweep goes on. Rows are appended to
`<out_dir>/decode.csv` (`experiments.results.Table`: typed columns, whole lines under a lock,
a malformed line moved aside with a warning), with `bounded` and the environment; a point
already there is not measured again (failed ones are, with `retry_failed=true`), so a re-run
resumes. After each job the report (`experiments.report`: `report.md`, `plots/decode.png`,
the goals of `conf/goals/decode.yaml`) is rebuilt from every row.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

import attn_zoo
from attn_zoo import DecodeCache, TransformerLM
from attn_zoo.cache import cache_for
from experiments import report
from experiments.bench import CONF_DIR, DTYPES, check_device
from experiments.config import attention_params, register_configs
from experiments.measure import MIB, median_time, text_table
from experiments.results import (
    ENVIRONMENT_COLUMNS,
    STATUS_COLUMNS,
    Table,
    device_name,
    environment,
    error_row,
)

log = logging.getLogger(__name__)

CSV_NAME = "decode.csv"
MODEL_AXES = {"vocab_size": int, "dim": int, "depth": int, "heads": int, "kv_heads": int,
              "batch": int, "dtype": str, "device": str, "prefill_chunk": int, "steps": int}
KEY = ("attention", "params", "context", *MODEL_AXES)
METRICS = ("ms_per_token", "cache_mib", "keys_per_layer", "prefill_tokens_per_s")
COLUMNS = ({"attention": str, "params": str, "context": int} | MODEL_AXES
           | {"bounded": bool} | STATUS_COLUMNS | dict.fromkeys(METRICS, float)
           | ENVIRONMENT_COLUMNS)


def table(out_dir: str | Path) -> Table:
    """The results table `<out_dir>/decode.csv`."""
    return Table(Path(out_dir) / CSV_NAME, COLUMNS, KEY)


def points_of(cfg: DictConfig) -> list[dict[str, Any]]:
    """The identifying columns of every point (one per context) of the job `cfg`."""
    values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    params = attention_params(cfg.attention)
    base = {"attention": cfg.attention.name, "params": json.dumps(params, sort_keys=True)}
    base |= {axis: values[axis] for axis in MODEL_AXES}
    return [base | {"context": context} for context in sorted(values["contexts"])]


def validate(cfg: DictConfig) -> None:
    """`ValueError` naming the first setting out of range, and its value."""
    for name, low in (("vocab_size", 1), ("dim", 1), ("depth", 1), ("heads", 1),
                      ("kv_heads", 1), ("batch", 1), ("prefill_chunk", 1), ("warmup", 0),
                      ("steps", 1), ("max_context", 1)):
        if cfg[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {cfg[name]}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 or null, got {cfg.threads}")
    if not cfg.contexts or min(cfg.contexts) < 1:
        raise ValueError(f"contexts must be a non-empty list of lengths >= 1, got "
                         f"{list(cfg.contexts)}")


def is_bounded(cfg: DictConfig) -> bool:
    """Whether the variant's cache has a constant size (its cache class says so)."""
    attention = attn_zoo.build(cfg.attention.name, **attention_params(cfg.attention))
    return bool(type(cache_for(attention)).bounded)


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
    runs first. A stream's latency is the mean of its medians in the two orders."""
    for stream in streams.values():
        for _ in range(cfg.warmup):
            stream.step()
    medians: dict[int, list[float]] = {context: [] for context in streams}
    for order in (sorted(streams), sorted(streams, reverse=True)):
        seconds: dict[int, list[float]] = {context: [] for context in streams}
        for _ in range(max(1, cfg.steps // 2)):
            for context in order:
                seconds[context].append(median_time(streams[context].step, device=device,
                                                    warmup=0, repeats=1))
        for context, values in seconds.items():
            medians[context].append(statistics.median(values))
    return {context: {"ms_per_token": sum(medians[context]) / 2 * 1e3} | stream.size()
            for context, stream in streams.items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure every point of the job `cfg` not done yet; write their rows and the report.

    Returns {"rows": this job's rows (fresh or reused), "measured": how many were measured}.
    """
    validate(cfg)
    results = table(cfg.out_dir)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        bounded, broken = is_bounded(cfg), None
    except Exception as error:  # bad parameters: every point of the job is a failure row
        bounded, broken = None, error
    rows: dict[int, dict[str, Any]] = {}
    streams: dict[int, Stream] = {}
    decoder, device = None, torch.device("cpu")
    for point in points_of(cfg):
        context = point["context"]
        earlier = results.done(point)
        if earlier is not None and earlier["status"] != "skipped" and (
                earlier["status"] == "ok" or not cfg.retry_failed):
            rows[context] = earlier | {"measured": False}
            continue
        row = rows[context] = dict(point) | {"bounded": bounded, "measured": True}
        if broken is not None:
            fail(row, broken)
        elif not bounded and context > cfg.max_context:
            row |= {"status": "skipped", "error": f"context above max_context="
                    f"{cfg.max_context} for a cache that grows with the context"}
        else:
            try:
                device = check_device(cfg.device)
                row |= environment(device)
                decoder = decoder or Decoder(cfg, device)
                row["prefill_tokens_per_s"] = decoder.prefill(context)
                streams[context] = decoder.fork()
            except Exception as error:  # a failing point is a row; the sweep goes on
                fail(row, error)
                # The cache is in an unknown state: the longer contexts fail too.
                broken = RuntimeError(f"an earlier context failed: {row['error']}")
    if streams:
        try:
            for context, measured in time_streams(streams, cfg, device).items():
                rows[context] |= measured | {"status": "ok", "error": ""}
        except Exception as error:
            for context in streams:
                fail(rows[context], error)
    fresh = [row for row in rows.values() if row["measured"]]
    results.append({key: value for key, value in row.items() if key != "measured"}
                   for row in fresh)
    for row in fresh:
        log.info("%s-c%s %s", row["attention"], row["context"], row["status"])
    report.run([cfg.out_dir])
    return {"rows": list(rows.values()), "measured": len(fresh)}


def fail(row: dict[str, Any], error: BaseException) -> None:
    """Mark `row` failed by `error` (status and message)."""
    row |= error_row(error)
    log.error("%s-c%s failed: %s", row["attention"], row["context"], row["error"])


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="decode", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    result = run(cfg)
    shown = pd.DataFrame(result["rows"]).reindex(columns=["attention", "context", "status",
                                                          *METRICS])
    print(f"\n{cfg.attention.name} on {device_name(torch.device(cfg.device))}\n"
          f"{text_table(shown)}\n\nwritten under {cfg.out_dir}/", flush=True)
    for row in result["rows"]:
        if row["status"] not in ("ok", "skipped"):
            print(f"error at context={row['context']}: {row['error']}", flush=True)
    return result


if __name__ == "__main__":
    main()
