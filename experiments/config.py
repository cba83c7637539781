"""Structured-config schemas of the Hydra apps, registered in Hydra's ConfigStore.

Every yaml under `conf/` is backed by a dataclass here, so that a misspelt key or a value of
the wrong type fails when Hydra composes the config, before anything runs:

* `schema/bench`: the bench app's top-level keys (their values live in `conf/bench.yaml`).
* `schema/decode`: the decode app's top-level keys (values in `conf/decode.yaml`).
* `schema/logger`: the `logger` group (`conf/logger/{wandb,none}.yaml`).
* `schema/attention/<name>`: one per registered variant, generated from its `Params`
  dataclass: a `name` field plus every parameter but `backend`, which is the top-level
  `backend` key (one axis for all variants), and `sinks`, set by `model.sinks`.
  `conf/attention/<name>.yaml` lists the values.
* `schema/train`, `schema/model`, `schema/task/<name>`: the train app's top-level keys, its
  backbone sizes (`conf/model/`) and one per task of `experiments.tasks` (`conf/task/`),
  the latter generated from the task's dataclass like the attention schemas.

Resolvers: `${hydra_dir:${out_dir}}` (each app's Hydra folder, unique per process),
`${device_slug:${device}}` (a folder name for the device), `${floordiv:a,b}` and
`${if:condition,text}` (text when the condition holds, else empty). Call
`register_configs()` before Hydra composes (the apps do it at import).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import os
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import attn_zoo
from attn_zoo.params import BACKENDS
from attn_zoo.registry import get
from experiments.tasks import TASKS

Dtype = enum.Enum("Dtype", ["float32", "bfloat16", "float16"])
Mode = enum.Enum("Mode", ["fwd", "fwd_bwd", "both"])
Backend = enum.Enum("Backend", list(BACKENDS))
Layout = enum.Enum("Layout", ["plain", "packed", "padded"])
WandbMode = enum.Enum("WandbMode", ["offline", "online", "disabled"])

BENCH_AXES = ("batch", "heads", "kv_heads", "head_dim", "dtype", "device", "causal", "backend",
              "mode", "layout", "docs", "sinks")
"""Top-level keys that, with the variant, its parameters and `seq_len`, identify a point."""


@dataclasses.dataclass
class LoggerConfig:
    """`logger` group: `name` is "wandb" or "none"; the rest configures `wandb.init`."""

    name: str = MISSING
    project: str = "attn-zoo"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchConfig:
    """Keys of `conf/bench.yaml`; values (and what they mean) live in the yaml only.

    `seq_len` is one length or a list of them (`Any`: OmegaConf has no int-or-list type);
    `experiments.bench.validate` checks it and every value's range.
    """

    attention: Any = MISSING
    logger: LoggerConfig = MISSING
    sweep_name: str = MISSING
    out_dir: str = MISSING
    contender: str = MISSING
    seq_len: Any = MISSING
    batch: int = MISSING
    tokens: int | None = MISSING
    heads: int = MISSING
    kv_heads: int = MISSING
    head_dim: int = MISSING
    dtype: Dtype = MISSING
    device: str = MISSING
    causal: bool = MISSING
    backend: Backend = MISSING
    mode: Mode = MISSING
    layout: Layout = MISSING
    docs: int = MISSING
    sinks: bool = MISSING
    warmup: int = MISSING
    repeats: int = MISSING
    budget_s: float | None = MISSING
    call_limit_s: float | None = MISSING
    check_n: int = MISSING
    check_tolerance: float | None = MISSING
    matmul_peak: bool = MISSING
    max_minutes: float | None = MISSING
    threads: int | None = MISSING
    seed: int = MISSING
    retry_failed: bool = MISSING
    dry_run: bool = MISSING


@dataclasses.dataclass
class ModelConfig:
    """`model` group: the `TransformerLM` backbone's sizes (vocab_size comes from the task)."""

    name: str = MISSING
    dim: int = MISSING
    depth: int = MISSING
    heads: int = MISSING
    kv_heads: int | None = None
    pos: str = "rope"
    norm: str = "rms"
    mlp: str = "swiglu"
    dropout: float = 0.0
    sinks: bool = False
    short_conv: int = 0


@dataclasses.dataclass
class ParallelConfig:
    """`parallel` section of the train app: context- and data-parallel sizes (their product
    is the number of processes torchrun starts)."""

    cp: int = 1
    dp: int = 1


@dataclasses.dataclass
class TrainConfig:
    """Keys of `conf/train.yaml` (and `conf/quality.yaml`); values live in the yamls only."""

    attention: Any = MISSING
    model: ModelConfig = MISSING
    task: Any = MISSING
    logger: LoggerConfig = MISSING
    sweep_name: str = MISSING
    out_dir: str = MISSING
    packing: bool = MISSING
    seq_len: int = MISSING
    eval_lens: list[int] = MISSING
    steps: int = MISSING
    tokens_per_step: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    curriculum_len: int = MISSING
    curriculum_steps: int = MISSING
    grad_clip: float | None = MISSING
    aux_loss_weight: float = MISSING
    eval_sequences: int = MISSING
    position_buckets: list[int] = MISSING
    log_every: int = MISSING
    checkpoint: str | None = MISSING
    device: str = MISSING
    backend: Backend = MISSING
    threads: int | None = MISSING
    seed: int = MISSING
    retry_failed: bool = MISSING
    speed_dir: str | None = MISSING
    parallel: ParallelConfig = MISSING


@dataclasses.dataclass
class DecodeConfig:
    """Keys of `conf/decode.yaml`; values (and what they mean) live in the yaml only."""

    attention: Any = MISSING
    out_dir: str = MISSING
    contexts: list[int] = MISSING
    max_context: int = MISSING
    vocab_size: int = MISSING
    dim: int = MISSING
    depth: int = MISSING
    heads: int = MISSING
    kv_heads: int = MISSING
    batch: int = MISSING
    dtype: Dtype = MISSING
    device: str = MISSING
    prefill_chunk: int = MISSING
    warmup: int = MISSING
    steps: int = MISSING
    threads: int | None = MISSING
    seed: int = MISSING
    retry_failed: bool = MISSING


def _omegaconf_type(hint: Any, field: str) -> Any:
    """The closest type OmegaConf validates for a `Params` field's type hint."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(hint) if arg is not type(None)]
        inner = _omegaconf_type(args[0], field) if len(args) == 1 else Any
        return inner | None if len(args) < len(get_args(hint)) else inner
    if origin is Literal:
        # OmegaConf has no Literal: an Enum of the allowed strings rejects the others.
        return enum.Enum(f"{field}_choices", [str(choice) for choice in get_args(hint)])
    if hint in (int, float, bool, str):
        return hint
    return Any


def attention_schema(name: str) -> type:
    """A dataclass with `name` plus the variant's parameters (but `backend`, and `sinks`, which
    the model sets from its head count: `model.sinks=true`), same defaults."""
    params = get(name).Params
    hints = get_type_hints(params)
    fields: list[tuple[str, Any, Any]] = [("name", str, dataclasses.field(default=name))]
    for field in dataclasses.fields(params):
        if field.name in ("backend", "sinks"):
            continue
        kind = _omegaconf_type(hints[field.name], field.name)
        default = field.default
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            default = kind[default]
        fields.append((field.name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{params.__name__}Config", fields)


def task_schema(name: str) -> type:
    """A dataclass with `name` plus the fields of the task `name` of `experiments.tasks`."""
    task = TASKS[name]
    hints = get_type_hints(task)
    fields: list[tuple[str, Any, Any]] = [("name", str, dataclasses.field(default=name))]
    for field in dataclasses.fields(task):
        kind = _omegaconf_type(hints[field.name], field.name)
        fields.append((field.name, kind, dataclasses.field(default=field.default)))
    return dataclasses.make_dataclass(f"{task.__name__}Config", fields)


def attention_params(attention: Any) -> dict[str, Any]:
    """The keyword arguments of `attn_zoo.build` from a composed `attention` node."""
    params = {key: value for key, value in dict(attention).items() if key != "name"}
    return {key: value.name if isinstance(value, enum.Enum) else value
            for key, value in params.items()}


def hydra_dir(out_dir: str) -> str:
    """`<out_dir>/hydra/<UTC time>-<process id>`: Hydra's folder of one run or sweep.

    The resolver `${hydra_dir:${out_dir}}` of every app's `hydra.run.dir` and
    `hydra.sweep.dir`: the process id keeps two runs started in the same second apart, and
    an empty `out_dir` (which would put the folder at the file system's root) is a
    `ValueError`. Registered with `use_cache`, so a sweep's workers, which get the parent's
    resolver cache, resolve the parent's folder.
    """
    if not str(out_dir).strip():
        raise ValueError(f"out_dir must be a folder path (not empty), got {out_dir!r}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    return f"{out_dir}/hydra/{stamp}-{os.getpid()}"


def device_slug(device: str) -> str:
    """`${device_slug:${device}}`: a folder name for the device, e.g. "nvidia-h100-80gb-hbm3"
    for a CUDA device (its name), "cpu" otherwise or when no GPU is visible."""
    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(target).lower()).strip("-")
    return slug or "unknown-device"


def floordiv(a: int, b: int) -> int:
    """`${floordiv:a,b}`: a // b (e.g. heads from a hidden size and a head dim)."""
    return int(a) // int(b)


def if_(condition: bool, text: str) -> str:
    """`${if:condition,text}`: text when condition holds, else "" (e.g. a file-name suffix)."""
    return text if condition else ""


@functools.cache
def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore and the resolvers in OmegaConf (once per
    process)."""
    OmegaConf.register_new_resolver("hydra_dir", hydra_dir, use_cache=True)
    OmegaConf.register_new_resolver("floordiv", floordiv)
    OmegaConf.register_new_resolver("if", if_)
    OmegaConf.register_new_resolver("device_slug", device_slug)
    store = ConfigStore.instance()
    store.store(group="schema", name="bench", node=BenchConfig)
    store.store(group="schema", name="decode", node=DecodeConfig)
    store.store(group="schema", name="logger", node=LoggerConfig)
    for name in attn_zoo.available():
        store.store(group="schema/attention", name=name, node=attention_schema(name))
    store.store(group="schema", name="train", node=TrainConfig)
    store.store(group="schema", name="model", node=ModelConfig)
    for name in TASKS:
        store.store(group="schema/task", name=name, node=task_schema(name))
