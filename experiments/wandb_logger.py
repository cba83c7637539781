"""Weights & Biases for the experiment apps: offline unless asked, a no-op object when off.

`start_run(logger, ...)` returns a `wandb` run when `logger.name == "wandb"` and its mode is
not "disabled", and a `NullRun` otherwise; both take `log(metrics)`, `summary[key] = value`
and `finish()`. Offline runs need no account and no network: they are written under
`<dir>/wandb/offline-run-*` and `wandb sync <that folder>` uploads them later;
`read_offline_run(<that folder>)` reads one back without W&B (the tests use it).
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class NullRun:
    """Stands in for a W&B run when logging is off: every call does nothing."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Drop `metrics`."""

    def finish(self) -> None:
        """Nothing to close."""


def _mode(logger: Mapping[str, Any]) -> str:
    mode = logger.get("mode", "offline")
    return mode.name if isinstance(mode, enum.Enum) else str(mode)


def start_run(
    logger: Mapping[str, Any],
    *,
    name: str,
    group: str,
    job_type: str,
    config: Mapping[str, Any],
    dir: str | Path,
) -> Any:
    """A W&B run holding `config` (logged once), or a `NullRun` when logging is off.

    logger: the composed `logger` group (`name`, `project`, `entity`, `mode`, `tags`).
    dir: the folder under which W&B writes its `wandb/` folder (created if missing).
    """
    if logger.get("name") != "wandb" or _mode(logger) == "disabled":
        return NullRun()
    import wandb

    Path(dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=logger.get("project"),
        entity=logger.get("entity"),
        mode=_mode(logger),
        tags=list(logger.get("tags") or []),
        name=name,
        group=group,
        job_type=job_type,
        config=dict(config),
        dir=str(dir),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", save_code=False,
                                x_disable_stats=True),
    )


_BLOCK = 32768  # W&B's run file: a LevelDB-style log of 32 KiB blocks after a 7-byte header


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            return
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run's name, group, job_type, config and last logged values, read from disk.

    run_dir: a `wandb/offline-run-*` folder. Values are decoded from their JSON.
    """
    (path,) = Path(run_dir).glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "summary": {}}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"name": record.run.display_name, "group": record.run.run_group,
                    "job_type": record.run.job_type}
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind in ("history", "summary"):
            items = record.history.item if kind == "history" else record.summary.update
            run["summary"] |= {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                               for i in items}
    return run
