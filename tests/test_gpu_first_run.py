"""experiments.gpu_first_run: the refusal without CUDA, the steps it builds, and a run of tiny
steps on CPU (a failing and a timed-out step recorded, the next steps still run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from experiments import gpu_first_run as first_run

PYTHON = sys.executable


def test_without_cuda_it_refuses_with_exit_code_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert first_run.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--tests-timeout", "0"], ["--device", "mps"],
                                  ["--compile-subset", "most"]])
def test_bad_options_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        first_run.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_cuda_steps_run_natively_and_compile_for_this_device(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 6))
    monkeypatch.setattr(first_run, "compile_archs", lambda arch: sorted({arch, 80, 90}))
    args = first_run.parse_args(["--bench-args", "attention=local,full"])
    tests, compile_check, bench = first_run.default_steps(args, tmp_path)
    assert tests.argv[1:] == ["-m", "pytest", "-q", *first_run.TEST_FILES]
    assert tests.timeout_s == 180 and tests.env == {"TRITON_INTERPRET": None}
    assert compile_check.argv[1:] == [
        "-m", "attn_zoo.kernels.compile_check", "--subset", "ci", "--out",
        str(tmp_path / "compile_check"), "--archs", "80", "86", "90"]
    assert compile_check.env == {"TRITON_INTERPRET": None}
    assert bench.argv[1:] == ["-m", "experiments.bench", "-m", "bench=gpu_quick",
                              f"out_dir={tmp_path / 'gpu_bench'}", "max_minutes=3.75",
                              "attention=local,full"]
    assert bench.timeout_s == 300 and bench.env == {"TRITON_INTERPRET": None}


def test_cpu_steps_use_the_interpreter_and_the_bench_on_cpu(tmp_path):
    args = first_run.parse_args(["--device", "cpu", "--bench-timeout", "60",
                                 "--compile-subset", "full"])
    tests, compile_check, bench = first_run.default_steps(args, tmp_path)
    assert tests.env == {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    assert "--archs" not in compile_check.argv and "full" in compile_check.argv
    assert bench.argv[-3:] == [f"out_dir={tmp_path / 'gpu_bench'}", "max_minutes=0.75",
                               "device=cpu"]
    assert bench.env == {"TRITON_INTERPRET": "1"}


def test_compile_archs_add_this_device_to_the_checks_defaults():
    from attn_zoo.kernels.compile_check import ARCHS

    assert first_run.compile_archs(86) == sorted({86, *ARCHS})


def test_a_run_records_every_step_and_fails_when_one_did(tmp_path, capsys):
    steps = [
        first_run.Step("passes", [PYTHON, "-c", "print('all good')"], 20),
        first_run.Step("fails", [PYTHON, "-c", "import sys; print('broken'); sys.exit(3)"], 20),
        first_run.Step("hangs", [PYTHON, "-c", "import subprocess, time; "
                                 "worker = subprocess.Popen(['sleep', '60']); "
                                 "print('waiting', worker.pid, flush=True); time.sleep(60)"], 1),
        first_run.Step("sees_env", [PYTHON, "-c", "import os; print(os.environ.get('A_VAR'), "
                                    "os.environ.get('TRITON_INTERPRET'))"], 20,
                       {"A_VAR": "set", "TRITON_INTERPRET": None}),
    ]
    args = first_run.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert first_run.run(args, steps, ["--device", "cpu"]) == 1
    logs = tmp_path / "first_run"
    assert "all good" in (logs / "passes.log").read_text()
    # The timed-out step's own child is killed with it (gone, or a zombie awaiting its reaper).
    worker = Path("/proc") / (logs / "hangs.log").read_text().split()[-1] / "status"
    assert not worker.exists() or "zombie" in worker.read_text()
    assert (logs / "sees_env.log").read_text().splitlines()[-1] == "set None"
    summary = (tmp_path / "first_run.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["passes"][1] == "ok" and rows["sees_env"][1] == "ok"
    assert rows["fails"][1] == "failed (exit 3)"
    assert rows["hangs"][1] == "timed out after 1 s" and float(rows["hangs"][2]) < 10
    assert rows["fails"][3] == "`first_run/fails.log`"
    assert "## fails: failed (exit 3)" in summary and "broken" in summary
    assert "## hangs: timed out after 1 s" in summary and "waiting" in summary
    assert "## passes" not in summary
    assert "python -m experiments.gpu_first_run --device cpu" in summary
    assert "failed: fails, hangs" in capsys.readouterr().out


def test_a_tiny_cpu_run_of_the_real_compile_and_bench_steps(tmp_path):
    # The default compile check and bench steps (the test step would only rerun tests): the
    # compile check, given 1 s, times out (its subset takes minutes) and the bench still runs.
    argv = ["--device", "cpu", "--out", str(tmp_path), "--compile-timeout", "1",
            "--bench-args", "attention=full contender=sdpa seq_len=[64] head_dim=16 heads=2 "
            "dtype=float32 mode=fwd warmup=1 repeats=1 check_n=16 matmul_peak=false "
            "logger=none"]
    args = first_run.parse_args(argv)
    _, compile_check, bench = first_run.default_steps(args, tmp_path)
    assert first_run.run(args, [compile_check, bench], argv) == 1
    summary = (tmp_path / "first_run.md").read_text()
    assert "| compile_check | timed out after 1 s |" in summary
    assert "| bench | ok |" in summary
    assert "`python -m experiments.bench -m bench=gpu_quick out_dir=" in summary
    assert (tmp_path / "gpu_bench" / "report.md").is_file()
    assert (tmp_path / "gpu_bench" / "bench.csv").read_text().count("\n") == 2
