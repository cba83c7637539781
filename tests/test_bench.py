"""experiments.bench: rows, failures as rows, resume, clean CPU memory, a multirun end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import bench
from experiments.config import register_configs
from experiments.wandb_logger import read_offline_run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["heads=2", "head_dim=16", "seq_len=64", "warmup=1", "repeats=1", "logger=none"]


@pytest.fixture(autouse=True)
def cheap_matmul_peak(monkeypatch):
    """In-process points skip the seconds-long matmul peak (the end-to-end run measures it)."""
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 2e12)


def config(out_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("bench", overrides=[*TINY, f"out_dir={out_dir}", *overrides])


def rows(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "bench.csv")


def test_a_point_is_a_row_with_its_parameters_and_environment(tmp_path):
    row = bench.run(config(tmp_path, "attention=local", "attention.window=8", "kv_heads=1"))
    assert row["status"] == "ok" and not row["skipped"]
    (written,) = rows(tmp_path).to_dict("records")
    for column in bench.COLUMNS:
        assert column in written
    assert (written["attention"], written["seq_len"], written["heads"], written["kv_heads"],
            written["window"], written["mode"]) == ("local", 64, 2, 1, 8, "both")
    assert json.loads(written["params"]) == {"window": 8, "scale": None}
    for metric in ("fwd_ms", "fwd_bwd_ms", "peak_mem_mib", "useful_tflops", "tokens_per_s",
                   "matmul_peak_tflops"):
        assert written[metric] > 0
    assert written["peak_mem_mib"] == max(written["fwd_peak_mib"], written["fwd_bwd_peak_mib"])
    assert written["torch_version"] == torch.__version__ and written["device_name"]
    peaks = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert list(peaks.values()) == [written["matmul_peak_tflops"]] == [2.0]


def test_forward_mode_measures_the_forward_only(tmp_path):
    row = bench.run(config(tmp_path, "attention=full", "mode=fwd"))
    assert row["fwd_ms"] > 0 and "fwd_bwd_ms" not in row
    assert row["useful_tflops"] == row["fwd_tflops"]


def test_failing_points_are_rows_and_the_sweep_goes_on(tmp_path):
    statuses = [bench.run(config(tmp_path, *point))["status"] for point in (
        ["attention=full"], ["attention=local", "attention.window=-1"], ["attention=local"])]
    assert statuses == ["ok", "unsupported", "ok"]
    failed = rows(tmp_path).iloc[1]
    assert failed["status"] == "unsupported" and "window must be >= 0" in failed["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_says_so_in_the_row(tmp_path):
    row = bench.run(config(tmp_path, "attention=full", "device=cuda"))
    assert row["status"] == "error" and "no CUDA GPU is visible" in row["error"]
    assert rows(tmp_path)["error"].str.contains("device=cuda").all()


def test_a_rerun_skips_done_points_and_retries_failed_ones_on_request(tmp_path):
    ok = config(tmp_path, "attention=local")
    bad = config(tmp_path, "attention=local", "attention.window=-1")
    first = bench.run(ok)
    bench.run(bad)
    again = bench.run(ok)
    assert again["skipped"] and again["timestamp"] == first["timestamp"]
    assert bench.run(bad)["skipped"]
    assert not bench.run(config(tmp_path, "attention=local", "attention.window=-1",
                                "retry_failed=true"))["skipped"]
    assert not bench.run(config(tmp_path, "attention=local", "seq_len=65"))["skipped"]
    assert len(rows(tmp_path)) == 3


def test_cpu_peak_memory_is_per_point_and_tells_4x_apart(tmp_path):
    def peak(n: int, folder: str) -> float:
        cfg = config(tmp_path / folder, "attention=local", "attention.window=16", "mode=fwd",
                     f"seq_len={n}")
        return bench.run(cfg)["peak_mem_mib"]

    small = peak(1024, "a")
    large = peak(4096, "a")
    assert large / small == pytest.approx(4, rel=0.1)
    assert peak(1024, "b") == pytest.approx(small, rel=0.01)  # after a larger point


def test_progress_line():
    assert bench.progress_line(1, 4, 10.0, "x").startswith("[######------------------] 1/4")
    assert "~0:00:30 left" in bench.progress_line(1, 4, 10.0, "x")
    assert bench.progress_line(3, None, 5.0, "x") == "[point 3] 0:00:05 elapsed  x"


def test_two_point_multirun_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "experiments.bench", "-m", "attention=full,local",
               "seq_len=64", "heads=2", "head_dim=16", "repeats=1", "threads=1",
               f"out_dir={out}", "sweep_name=e2e"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2/2" in done.stdout and "forward time (ms)" in done.stdout
    table = rows(out).set_index("attention")
    assert sorted(table.index) == ["full", "local"] and (table["status"] == "ok").all()
    assert (out / "report.md").exists() and len(list((out / "plots").glob("*.png"))) == 2
    runs = {run["name"]: run for run in map(read_offline_run,
                                            (out / "wandb").glob("offline-run-*"))}
    assert sorted(runs) == ["full-n64", "local-n64"]
    for name, run in runs.items():
        attention = name.split("-")[0]
        assert run["group"] == "e2e" and run["config"]["attention"]["name"] == attention
        assert run["summary"]["bench/status"] == "ok"
        assert run["summary"]["bench/fwd_ms"] == pytest.approx(table.loc[attention, "fwd_ms"])
        assert run["summary"]["bench/peak_mem_mib"] == pytest.approx(
            table.loc[attention, "peak_mem_mib"])
