"""experiments.report: tables, ratios, exponents and plots from known power laws; W&B."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import wandb

from experiments import report
from experiments.wandb_logger import read_offline_run

LENGTHS = [1024, 2048, 4096]
SETTING = {"device": "cpu", "device_name": "test cpu", "dtype": "float32", "batch": 1,
           "heads": 8, "kv_heads": 8, "head_dim": 64, "causal": True, "backend": "auto",
           "mode": "both", "threads": 2, "torch_version": "2.x", "matmul_peak_tflops": 0.1}


def row(attention: str, n: int, time: float, memory: float, status: str = "ok",
        **params) -> dict:
    values = {"fwd_ms": time, "fwd_bwd_ms": 3 * time, "fwd_peak_mib": memory,
              "fwd_bwd_peak_mib": 2 * memory, "fwd_tflops": 1e-3, "fwd_bwd_tflops": 2e-3}
    if status != "ok":
        values = dict.fromkeys(values, math.nan)
    return SETTING | values | {
        "attention": attention, "params": json.dumps(params, sort_keys=True), "seq_len": n,
        "status": status, "error": "" if status == "ok" else "OutOfMemoryError: boom", **params}


def write(folder, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "bench.csv", index=False)


@pytest.fixture
def folder(tmp_path):
    rows = [row("full", n, 1e-6 * n**2, 1e-3 * n) for n in LENGTHS]
    rows += [row("local", n, 1e-3 * n, 2e-3 * n, window=256) for n in LENGTHS]
    rows += [row("bigbird", 1024, 2.0, 1.0), row("bigbird", 2048, 4.0, 2.0),
             row("bigbird", 4096, 0, 0, status="oom")]
    write(tmp_path / "sweep", rows)
    return tmp_path / "sweep"


def test_exponents_ratios_and_failed_cells(folder):
    result = report.run([folder])
    exponents = result.exponents.set_index(["variant", "phase"])
    assert exponents.loc[("full", "fwd"), "time_exponent"] == pytest.approx(2)
    assert exponents.loc[("local", "fwd_bwd"), "time_exponent"] == pytest.approx(1)
    assert exponents.loc[("local", "fwd"), "memory_exponent"] == pytest.approx(1)
    assert exponents.loc[("bigbird", "fwd"), "time_exponent"] == pytest.approx(1)
    md = result.markdown
    assert "| variant | N=1024 | N=2048 | N=4096 | exponent |" in md
    # full / local at 4096: 16.8 ms / 4.10 ms; memory 8.19 / 4.10 MiB
    assert "| local | 1.02 | 2.05 | 4.10 |" in md
    assert "| bigbird | 2.00 | 4.00 | oom | 1.00 |" in md
    assert "bigbird N=4096: oom: OutOfMemoryError: boom" in md
    assert (folder / "report.md").read_text() == md
    assert "forward time (ms)" in result.text and "plots:" in result.text


def test_plots_are_written(folder):
    result = report.run([folder])
    assert sorted(p.name for p in result.plots) == [
        "memory_cpu-float32-b1-h8-kv8-d64-causal-auto-both.png",
        "time_cpu-float32-b1-h8-kv8-d64-causal-auto-both.png"]
    for plot in result.plots:
        assert plot.read_bytes()[:4] == b"\x89PNG" and plot.parent == folder / "plots"


def test_folders_combine_and_varying_parameters_label_variants(folder, tmp_path):
    write(tmp_path / "other", [row("local", n, 2e-3 * n, 2e-3 * n, window=128) for n in LENGTHS])
    result = report.run([folder, tmp_path / "other"], out=tmp_path / "both")
    assert "| local window=128 |" in result.markdown and "| local window=256 |" in result.markdown
    assert (tmp_path / "both" / "report.md").exists()


def test_settings_get_their_own_sections(folder):
    rows = pd.read_csv(folder / "bench.csv")
    rows = pd.concat([rows, rows.assign(dtype="bfloat16")])
    rows.to_csv(folder / "bench.csv", index=False)
    md = report.run([folder]).markdown
    assert "## cpu bfloat16" in md and "## cpu float32" in md


def test_scaling_exponent_skips_failed_points():
    assert report.scaling_exponent([1, 2, 4], [1, 8, math.nan]) == pytest.approx(3)
    assert math.isnan(report.scaling_exponent([1, 2], [1, math.nan]))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder"):
        report.run([tmp_path])


def test_cli_logs_the_sweep_to_offline_wandb(folder, capsys):
    report.main([str(folder), "--wandb"])
    assert "forward time (ms)" in capsys.readouterr().out
    # The W&B service writes the run file asynchronously; shutting it down flushes it.
    wandb.teardown()
    (run_dir,) = (folder / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["job_type"] == "report" and run["name"] == "report-sweep"
    logged = run["summary"]
    slug = "cpu-float32-b1-h8-kv8-d64-causal-auto-both"
    assert logged["report/rows/_type"] == "table-file" and logged["report/rows/nrows"] == 9
    for phase in ("fwd", "fwd_bwd"):
        for metric in ("ms", "peak_mib"):  # a line plot: a table and its custom chart
            assert logged[f"report/{slug}/{phase}_{metric}_table/_type"] == "table-file"
    assert logged[f"report/plots/time_{slug}/_type"] == "image-file"


# -- quality --------------------------------------------------------------------------------


def quality_row(attention: str, n: int, accuracy: float, eval_len: int | None = None,
                status: str = "ok", **params) -> dict:
    return {"attention": attention, "params": json.dumps(params, sort_keys=True),
            "model": "tiny", "task": "mqar", "task_params": '{"n_pairs": 4}', "seq_len": n,
            "eval_len": eval_len or n, "steps": 10, "tokens_per_step": 4096, "lr": 0.003,
            "seed": 0, "status": status, "error": "" if status == "ok" else "ValueError: x",
            "accuracy": accuracy if status == "ok" else math.nan, "eval_loss": 1.0}


@pytest.fixture
def quality(tmp_path):
    rows = [quality_row("full", 1024, 0.9), quality_row("full", 2048, 0.8),
            quality_row("local", 1024, 0.5, window=256), quality_row("local", 2048, 0.3,
                                                                     window=256),
            quality_row("local", 1024, 0.1, eval_len=4096, window=256),
            quality_row("bigbird", 1024, 0.4), quality_row("bigbird", 2048, 0, status="oom"),
            quality_row("full", 256, 1.0)]
    folder = tmp_path / "quality"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    speed = [row("full", n, 10.0 * n / 1024, 8.0 * n / 1024) for n in (1024, 2048)]
    speed += [row("local", n, 2.0, 4.0, window=256) for n in (1024, 2048)]
    speed += [row("local", 1024, 1.0, 1.0, window=64)]  # other parameters: not joined
    speed += [row("bigbird", 1024, 3.0, 5.0), row("bigbird", 2048, 0, 0, status="oom")]
    write(tmp_path / "speed", [r | {"peak_mem_mib": r["fwd_bwd_peak_mib"]} for r in speed])
    return folder, tmp_path / "speed"


def test_pareto_flags_undominated_points():
    assert report.pareto([1, 2, 3, 2], [0.5, 0.9, 0.4, 0.9]) == [True, True, False, True]
    assert report.pareto([1, math.nan], [0.5, 0.9]) == [True, False]


def test_quality_report_tables_and_frontier(quality):
    folder, speed = quality
    result = report.quality_run(folder, speed=speed)
    md = result.markdown
    assert "| variant | N=256 | N=1024 | N=2048 |" in md
    assert "| bigbird |  | 0.400 | oom |" in md and "| full | 1.00 | 0.900 | 0.800 |" in md
    assert "| variant | 256->256 | 1024->1024 | 1024->4096 | 2048->2048 |" in md
    assert "| local | n/a | 0.500 | 0.100 | 0.300 |" in md
    # bigbird at 1024 is less accurate than local and slower and larger: off both frontiers
    # (the speed rows' fwd_bwd_ms is 3 * time)
    frontier = report.frontier_table(report.load_quality(folder), report.load_speed(speed),
                                     "accuracy")
    at_1024 = frontier[frontier["N"] == 1024].set_index("variant")
    assert at_1024["pareto_time"].to_dict() == {"local": True, "bigbird": False, "full": True}
    assert at_1024.loc["full", "attention fwd+bwd ms"] == pytest.approx(30.0)
    assert sorted(frontier["N"].unique()) == [1024, 2048]  # N=256 was not speed-measured
    assert "bigbird N=2048 eval 2048: oom" in md
    assert {p.name for p in result.plots} == {"quality_mqar-tiny-s10.png",
                                              "frontier_mqar-tiny-s10.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)


def test_quality_cli(quality, capsys):
    folder, speed = quality
    report.main([str(folder), "--speed", str(speed)])
    out = capsys.readouterr().out
    assert "frontier:" in out and (folder / "report.md").exists()
