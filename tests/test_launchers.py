"""A small sweep of experiments.bench through Hydra's parallel launchers: joblib (worker
processes) and submitit_local (pickled jobs in their own processes, the path SLURM takes).
Each job's rows must reach the shared results CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["attention=full,local", "seq_len=[32,64]", "heads=2", "head_dim=16", "mode=fwd",
         "warmup=0", "repeats=1", "budget_s=null", "threads=1", "check_n=40",
         "matmul_peak=false", "logger=none"]


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
])
def test_a_sweep_through_a_parallel_launcher_writes_every_row(tmp_path, launcher):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "-m", *launcher, *SWEEP,
                           f"out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = pd.read_csv(tmp_path / "bench.csv")
    assert sorted(zip(rows["attention"], rows["seq_len"], strict=True)) == [
        ("full", 32), ("full", 64), ("local", 32), ("local", 64)]
    assert (rows["status"] == "ok").all()
    (sweep,) = (tmp_path / "hydra").iterdir()  # one folder, both jobs inside
    assert sorted(path.name for path in sweep.iterdir() if path.name.isdigit()) == ["0", "1"]
