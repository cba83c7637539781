"""Typed results tables shared by every app: locked appends, done-keys, error rows, environment.

A results folder holds one CSV per app (`bench.csv`, `train.csv`, `decode.csv`). Parallel jobs
(joblib workers, SLURM tasks) append to the same file, so every write holds an exclusive lock
(a `.<name>.lock` file beside it) and adds whole lines; nothing is rewritten except to add
columns or to move malformed lines aside. Columns are typed, so text stays text: a commit
`1234e56` or a code `0123456` never comes back as a number.

    table = Table(out_dir / "bench.csv", {"attention": str, "seq_len": int, ...}, key=(...))
    if table.done(point) is None:
        table.append([point | measure(point)])
    rows = table.latest()      # one row per key, the last written
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import functools
import importlib.metadata
import io
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

COLUMN_TYPES = (str, int, float, bool)
"""The types a column may have."""

STATUS_COLUMNS: dict[str, type] = {"status": str, "error": str}
"""Every row's outcome: `status` ok | oom | unsupported | error | skipped, and the error."""

ENVIRONMENT_COLUMNS: dict[str, type] = {
    "device_name": str, "threads": int, "torch_version": str, "triton_version": str,
    "cuda_version": str, "commit": str, "timestamp": str,
}
"""The columns `environment` fills."""

_PANDAS_DTYPES = {str: object, int: "Int64", float: "float64", bool: "boolean"}
_BOOLS = {"True": True, "False": False}


class MalformedLine(ValueError):
    """A CSV record that does not fit the table's columns."""


def _format(value: Any, kind: type, column: str) -> str:
    """The CSV text of `value` in a column of type `kind`; a `TypeError` when it is not one."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if hasattr(value, "item") and not isinstance(value, str):  # numpy and torch scalars
        value = value.item()
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return str(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    raise TypeError(f"column {column!r} holds {kind.__name__}, got {value!r}")


def _parse(text: str, kind: type, column: str) -> Any:
    """The typed value of CSV `text`; a `MalformedLine` when it is not of type `kind`."""
    if kind is str:
        return text
    if text == "":
        return pd.NA if kind is not float else math.nan
    try:
        if kind is bool:
            return _BOOLS[text]
        if kind is float:
            return float(text)
        # Tables written before columns were typed hold whole numbers as "256.0".
        return int(text) if text.lstrip("-").isdigit() else _whole(float(text))
    except (KeyError, ValueError):
        raise MalformedLine(f"column {column!r} holds {kind.__name__}, got {text!r}") from None


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError(value)
    return int(value)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step (a fixed temporary name: a kill leaves no litter
    that the next write does not overwrite)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


class Table:
    """A results CSV with typed columns, shared by concurrent processes.

    columns: name -> one of `COLUMN_TYPES`; key: the columns that identify a row.
    extra: the type of columns found in rows or in the file but not in `columns` (e.g. a
    variant's own parameters), or None to refuse them.
    defaults: column -> the value an empty cell reads as: what rows written before the
    column existed meant (so that they stay done points).
    """

    def __init__(self, path: str | os.PathLike, columns: Mapping[str, type],
                 key: Sequence[str], *, extra: type | None = None,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not self.path.name:
            raise ValueError(f"path must name a file, got {str(path)!r}")
        self.columns = dict(columns)
        self.key = tuple(key)
        self.extra = extra
        self.defaults = dict(defaults or {})
        for name, value in self.defaults.items():
            _format(value, self._type(name), name)  # a TypeError when it is not of the column
        for name, kind in [*self.columns.items(), ("extra", extra)]:
            if kind not in COLUMN_TYPES and not (name == "extra" and kind is None):
                raise TypeError(f"column {name!r} must have a type in {COLUMN_TYPES}, got {kind}")
        missing = [name for name in self.key if name not in self.columns]
        if missing:
            raise ValueError(f"key columns {missing} are not among the columns")

    # -- reading --------------------------------------------------------------------------

    def read(self) -> pd.DataFrame:
        """Every stored row, typed; malformed lines are moved to `<path>.bad` with a warning."""
        with self._locked():
            header, records = self._load()
        names = list(self.columns) + [name for name in header if name not in self.columns]
        absent = {name: self._parse("", name) for name in names}
        frame = pd.DataFrame([absent | record for record in records], columns=names)
        return frame.astype({name: _PANDAS_DTYPES[self._type(name)] for name in names})

    def latest(self) -> pd.DataFrame:
        """`read()` with one row per key: the last one written."""
        rows = self.read()
        keys = [self._key_text(row) for row in rows.to_dict("records")]
        last = {key: index for index, key in enumerate(keys)}
        return rows.iloc[sorted(last.values())].reset_index(drop=True)

    def done(self, point: Mapping[str, Any]) -> dict[str, Any] | None:
        """The last stored row whose key equals `point`'s, or None."""
        wanted = self._key_text(point)
        rows = self.read().to_dict("records")
        return next((row for row in reversed(rows) if self._key_text(row) == wanted), None)

    # -- writing --------------------------------------------------------------------------

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add `rows` (each written as one whole line) under the table's lock."""
        rows = [dict(row) for row in rows]
        new = [name for row in rows for name in row if name not in self.columns]
        if new and self.extra is None:
            raise ValueError(f"{self.path.name} has no column {sorted(set(new))[0]!r}; "
                             f"columns: {', '.join(self.columns)}")
        with self._locked():
            header, records = self._load()
            wanted = list(dict.fromkeys([*header, *self.columns, *new]))
            lines = [[_format(row.get(name), self._type(name), name) for name in wanted]
                     for row in rows]
            if header != wanted:
                self._rewrite(wanted, records)
            with open(self.path, "a", newline="") as handle:
                handle.write(_csv_text(lines))

    # -- internals ------------------------------------------------------------------------

    def _type(self, name: str) -> type:
        return self.columns.get(name) or self.extra or str

    def _parse(self, text: str, name: str) -> Any:
        if text == "" and name in self.defaults:
            return self.defaults[name]
        return _parse(text, self._type(name), name)

    def _key_text(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(_format(row.get(name), self.columns[name], name) for name in self.key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    def _load(self) -> tuple[list[str], list[dict[str, Any]]]:
        """(header, typed records) of the file; needs the lock. Malformed records are
        quarantined and the file rewritten without them."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], []
        text = self.path.read_text()
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        records, good, bad = [], [], []
        first_line = reader.line_num + 1
        parsed = []
        for fields in reader:
            parsed.append((first_line, fields))
            first_line = reader.line_num + 1
        for index, (line, fields) in enumerate(parsed):
            try:
                if index == len(parsed) - 1 and not text.endswith("\n"):
                    raise MalformedLine("an unfinished line (the write was cut off)")
                if len(fields) != len(header):
                    raise MalformedLine(f"{len(fields)} fields where the header has "
                                        f"{len(header)}")
                records.append({name: self._parse(value, name)
                                for name, value in zip(header, fields, strict=True)})
                good.append(fields)
            except MalformedLine as error:
                bad.append(fields)
                warnings.warn(f"{self.path}: line {line}: {error}; moved to "
                              f"{self.path.name}.bad", stacklevel=3)
        if bad:
            with open(self.path.with_name(self.path.name + ".bad"), "a", newline="") as out:
                out.write(_csv_text(bad))
            _write_atomic(self.path, _csv_text([header, *good]))
        return header, records

    def _rewrite(self, header: list[str], records: list[dict[str, Any]]) -> None:
        lines = [[_format(record.get(name), self._type(name), name) for name in header]
                 for record in records]
        _write_atomic(self.path, _csv_text([header, *lines]))


def _csv_text(lines: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    return buffer.getvalue()


# -- rows of failures -----------------------------------------------------------------------


def error_row(error: BaseException) -> dict[str, str]:
    """The `status` and one-line `error` of a failed point: oom (out of memory), unsupported
    (the input or the combination is rejected) or error."""
    message = str(error).lower()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or (
            "can't allocate memory" in message):
        status = "oom"
    elif isinstance(error, (ValueError, TypeError, NotImplementedError)):
        status = "unsupported"
    else:
        status = "error"
    return {"status": status, "error": " ".join(f"{type(error).__name__}: {error}".split())}


# -- environment ----------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def git_commit() -> str:
    """The checkout's short commit, "+dirty" when tracked files changed, "" outside git.

    Read-only: `--no-optional-locks` keeps `git status` from taking `.git/index.lock`, so
    points measured in parallel never contend with the user's own git commands.
    """
    root = Path(__file__).resolve().parent.parent
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, str | int]:
    """What a reader needs to compare rows: device, threads, versions, commit, time."""
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
