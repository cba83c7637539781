"""experiments.results: typed columns, locked appends, quarantine of bad lines, environment."""

from __future__ import annotations

import math
import multiprocessing
import pickle
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import results
from experiments.results import Table

COLUMNS = {"name": str, "seq_len": int, "ms": float, "ok": bool, "commit": str}
KEY = ("name", "seq_len")


def table(tmp_path: Path, **kwargs) -> Table:
    return Table(tmp_path / "rows.csv", COLUMNS, KEY, **kwargs)


def test_text_columns_stay_text_across_writes(tmp_path):
    rows = table(tmp_path)
    rows.append([{"name": "a", "seq_len": 1, "ms": 1.5, "ok": True, "commit": "1234e56"}])
    rows.append([{"name": "b", "seq_len": 2, "ms": math.nan, "ok": False, "commit": "0123456"}])
    rows.append([{"name": "c", "seq_len": 3}])
    with open(rows.path, "a") as handle:  # whole numbers as an untyped writer leaves them
        handle.write("d,4.0,,,\n")
    frame = rows.read()
    assert frame["commit"].tolist() == ["1234e56", "0123456", "", ""]
    assert frame["seq_len"].tolist() == [1, 2, 3, 4]
    assert frame["seq_len"].dtype == "Int64" and frame["ok"].dtype == "boolean"
    assert frame["ms"].iloc[0] == 1.5 and math.isnan(frame["ms"].iloc[1])
    assert pd.isna(frame["ok"].iloc[2]) and frame["name"].tolist() == ["a", "b", "c", "d"]


def test_values_of_the_wrong_type_and_unknown_columns_are_refused(tmp_path):
    rows = table(tmp_path)
    with pytest.raises(TypeError, match="'seq_len' holds int, got '12'"):
        rows.append([{"name": "a", "seq_len": "12"}])
    with pytest.raises(ValueError, match="no column 'window'"):
        rows.append([{"name": "a", "seq_len": 1, "window": 4}])
    assert not rows.path.exists() or rows.read().empty


def test_extra_columns_are_added_to_the_header_and_kept_as_text(tmp_path):
    rows = table(tmp_path, extra=str)
    rows.append([{"name": "a", "seq_len": 1}])
    rows.append([{"name": "b", "seq_len": 2, "window": "007"}])
    frame = rows.read()
    assert frame["window"].tolist() == ["", "007"]
    assert rows.path.read_text().splitlines()[0].endswith(",window")


def test_done_and_latest_take_the_last_row_of_a_key(tmp_path):
    rows = table(tmp_path)
    rows.append([{"name": "a", "seq_len": 1, "ms": 1.0}, {"name": "b", "seq_len": 1, "ms": 2.0}])
    rows.append([{"name": "a", "seq_len": 1, "ms": 3.0}])
    assert rows.done({"name": "a", "seq_len": 1})["ms"] == 3.0
    assert rows.done({"name": "a", "seq_len": 2}) is None
    assert rows.latest()[["name", "ms"]].values.tolist() == [["b", 2.0], ["a", 3.0]]
    assert len(rows.read()) == 3


def test_malformed_lines_are_quarantined_with_a_warning(tmp_path):
    rows = table(tmp_path)
    rows.append([{"name": "a", "seq_len": 1, "ms": 1.0}])
    with open(rows.path, "a") as handle:
        handle.write("garbage\n")
        handle.write("b,4.5,1.0,True,x\n")
    with pytest.warns(UserWarning) as caught:
        rows.append([{"name": "c", "seq_len": 3}])  # the sweep goes on
    messages = [str(warning.message) for warning in caught]
    assert any("rows.csv: line 3: 1 fields where the header has 5" in m for m in messages)
    assert any("line 4: column 'seq_len' holds int, got '4.5'" in m for m in messages)
    with open(rows.path, "a") as handle:
        handle.write("d,4,1.")  # a write cut off by a kill
    with pytest.warns(UserWarning, match="line 4: an unfinished line"):
        frame = rows.read()
    assert frame["name"].tolist() == ["a", "c"]
    bad = rows.path.with_name("rows.csv.bad").read_text().splitlines()
    assert bad == ["garbage", "b,4.5,1.0,True,x", "d,4,1."]
    rows.append([{"name": "e", "seq_len": 5}])  # the file is clean again: no more warnings
    assert rows.read()["name"].tolist() == ["a", "c", "e"]


def test_no_temporary_files_are_left_behind(tmp_path):
    rows = table(tmp_path, extra=str)
    for index in range(3):
        rows.append([{"name": "a", "seq_len": index, f"p{index}": "x"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rows.csv.lock", "rows.csv"]


def _append_many(path: str, worker: int) -> None:
    rows = Table(path, COLUMNS, KEY)
    for index in range(20):
        rows.append([{"name": f"w{worker}", "seq_len": index, "ms": float(index)}])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "rows.csv")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(path, w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(Table(path, COLUMNS, KEY).read()) == 60


@pytest.mark.parametrize(("error", "status"), [
    (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "oom"),
    (ValueError("window must be >= 0,\ngot -1"), "unsupported"),
    (RuntimeError("boom"), "error"),
])
def test_error_rows(error, status):
    row = results.error_row(error)
    assert row["status"] == status and "\n" not in row["error"]
    assert row["error"].startswith(type(error).__name__ + ": ")


def test_environment_is_read_only_and_picklable(tmp_path):
    results.git_commit.cache_clear()  # once per process: HEAD may have moved since
    env = results.environment(torch.device("cpu"))
    assert set(env) == set(results.ENVIRONMENT_COLUMNS)
    assert pickle.loads(pickle.dumps(results.git_commit)) is results.git_commit
    root = Path(results.__file__).resolve().parent.parent
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert env["commit"].startswith(head)


def test_git_commit_takes_no_index_lock(tmp_path, monkeypatch):
    calls = []
    real_run = subprocess.run

    def spy(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    results.git_commit.cache_clear()
    try:
        results.git_commit()
    finally:
        results.git_commit.cache_clear()
    assert calls and all(command[:2] == ["git", "--no-optional-locks"] for command in calls)
