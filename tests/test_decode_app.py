"""experiments.decode: rows, resume, failures as rows, typed columns, quarantine, the report."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import decode, results
from experiments.config import register_configs

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["contexts=[64,256,1024]", "max_context=256", "dim=16", "depth=1", "heads=2",
         "kv_heads=1", "vocab_size=32", "prefill_chunk=100", "warmup=1", "steps=3"]


def config(out_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("decode", overrides=[f"out_dir={out_dir}", *SMALL, *overrides])


def raw(path: Path) -> list[dict[str, str]]:
    """The CSV's records as text, exactly as stored."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_job_writes_rows_and_the_report_and_resumes(tmp_path):
    result = decode.run(config(tmp_path, "attention=local", "attention.window=16"))
    assert result["measured"] == 3
    rows = decode.table(tmp_path).read()
    assert list(rows["context"]) == [64, 256, 1024] and set(rows["status"]) == {"ok"}
    assert (rows["ms_per_token"] > 0).all() and rows["cache_mib"].nunique() == 1
    assert (rows["keys_per_layer"] == 17).all() and rows["bounded"].all()
    assert (tmp_path / "plots" / "decode.png").stat().st_size > 0
    # A growing cache stops at max_context: its cache class says it is not bounded.
    decode.run(config(tmp_path, "attention=full"))
    rows = decode.table(tmp_path).read().set_index(["attention", "context"])
    assert rows.loc[("full", 1024), "status"] == "skipped"
    assert not rows.loc[("full", 64), "bounded"]
    assert rows.loc[("full", 256), "cache_mib"] > 3 * rows.loc[("full", 64), "cache_mib"]
    assert decode.run(config(tmp_path, "attention=local", "attention.window=16"))[
        "measured"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "| local | 0.00117 | 0.00117 | 0.00117 |" in md  # cache MiB per context
    assert "full context=1024: skipped: context above max_context=256" in md
    assert "a bounded cache's bytes are flat over the contexts" in md  # conf/goals/decode.yaml


def test_a_failing_point_is_a_row_and_the_longer_contexts_fail_too(tmp_path, monkeypatch):
    prefill = decode.Decoder.prefill

    def failing(self, context):
        if context >= 256:
            raise RuntimeError("no room for this context")
        return prefill(self, context)

    monkeypatch.setattr(decode.Decoder, "prefill", failing)
    result = decode.run(config(tmp_path, "attention=compressive", "attention.segment=8",
                               "attention.mem_len=16", "attention.cmem_len=4"))
    assert [row["status"] for row in result["rows"]] == ["ok", "error", "error"]
    errors = list(decode.table(tmp_path).read()["error"])
    assert "no room" in errors[1] and "an earlier context failed" in errors[2]


def test_every_point_failing_still_writes_rows_and_a_report_listing_them(tmp_path):
    """A bad parameter fails every point as unsupported; the app prints its table and the
    report lists the failures instead of dying on the missing metric columns."""
    out = tmp_path / "bad"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.decode", f"out_dir={out}", *SMALL,
         "attention=local", "attention.window=-1", "hydra.run.dir=" + str(tmp_path / "hydra")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [row["status"] for row in raw(out / "decode.csv")] == ["unsupported"] * 3
    assert "window must be" in done.stdout and "unsupported" in done.stdout
    md = (out / "report.md").read_text()
    assert md.count("local context=") == 3 and "unsupported: ValueError: window" in md


@pytest.mark.parametrize("commit", ["1234e56", "0123456"])
def test_a_commit_that_looks_like_a_number_stays_text(tmp_path, monkeypatch, commit):
    monkeypatch.setattr(results, "git_commit", lambda: commit)
    decode.run(config(tmp_path, "attention=local", "attention.window=16", "contexts=[64]"))
    decode.run(config(tmp_path, "attention=full", "contexts=[64]"))  # the next write
    assert [row["commit"] for row in raw(tmp_path / "decode.csv")] == [commit, commit]
    assert list(decode.table(tmp_path).read()["commit"]) == [commit, commit]


def test_a_malformed_line_is_quarantined_and_the_sweep_goes_on(tmp_path):
    decode.run(config(tmp_path, "attention=local", "attention.window=16", "contexts=[64]"))
    with open(tmp_path / "decode.csv", "a") as handle:
        handle.write("local,oops\n")  # a line cut short
    with pytest.warns(UserWarning, match=r"decode\.csv: line 3: 2 fields"):
        result = decode.run(config(tmp_path, "attention=full", "contexts=[64]"))
    assert result["measured"] == 1 and result["rows"][0]["status"] == "ok"
    assert (tmp_path / "decode.csv.bad").read_text() == "local,oops\n"
    assert [row["attention"] for row in raw(tmp_path / "decode.csv")] == ["local", "full"]
    assert "| full | " in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("override,message", [
    ("threads=0", "threads must be >= 1 or null, got 0"),
    ("steps=0", "steps must be >= 1, got 0"),
    ("warmup=-1", "warmup must be >= 0, got -1"),
    ("prefill_chunk=0", "prefill_chunk must be >= 1, got 0"),
    ("contexts=[]", r"contexts must be a non-empty list of lengths >= 1, got \[\]"),
    ("contexts=[0,64]", "contexts must be"),
])
def test_a_setting_out_of_range_is_an_error_before_anything_runs(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        decode.run(config(tmp_path, "attention=local", override))
    assert not (tmp_path / "decode.csv").exists()
