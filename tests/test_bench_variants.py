"""experiments.bench_variants: a tiny run writes its files with a row per implementation;
ratios and goals follow from a synthetic table. No timing is asserted."""

from __future__ import annotations

import math

import pandas as pd

from experiments import bench_variants as bench


def test_tiny_run_writes_a_row_per_implementation(tmp_path):
    # 1024: a length every peer takes (bench_variants.CHECK_N).
    args = bench.parse_args(["--lengths", "1024", "--repeats", "1", "--variants", "longformer",
                             "bigbird", "--out", str(tmp_path)])
    tables = bench.run(args)
    for name in ("variants_bench.csv", "ratios.csv", "goals.csv", "variants_bench.md"):
        assert (tmp_path / name).is_file(), name
    table = pd.read_csv(tmp_path / "variants_bench.csv")
    peers = {("hf.longformer", "bidir"), ("hf.bigbird", "bidir"), ("hf.bigbird.no_dense", "bidir")}
    ours = {(f"attn_zoo.{name}", mode) for name in ("longformer", "bigbird")
            for mode in ("causal", "bidir")}
    assert sorted(zip(table["impl"], table["mode"], strict=True)) == sorted(ours | peers)
    installed = bench.LongformerSelfAttention is not None
    for row in table.itertuples():
        if (row.impl, row.mode) in peers and not installed:
            assert row.status == bench.NOT_INSTALLED
            continue
        assert row.status.startswith("ok"), (row.impl, row.status)
        assert row.fwd_ms > 0 and row.fwd_gflops > 0 and row.fwd_peak_mib > 0
        assert (row.impl == "hf.bigbird.no_dense") == math.isnan(row.fwd_bwd_ms)
    assert list(tables["ratios"]["N"]) == [1024]
    assert len(tables["goals"]) == len(bench.GOALS)


def test_a_point_over_budget_becomes_a_row_and_longer_lengths_are_skipped(tmp_path):
    args = bench.parse_args(["--lengths", "128", "64", "--repeats", "1", "--variants", "local",
                             "--no-peers", "--budget", "0", "--out", str(tmp_path)])
    table = bench.run(args)["variants_bench"]
    assert list(table["N"]) == [64, 128]
    assert table["status"][0].startswith("over budget")
    assert table["status"][1] == "skipped: fwd over budget at N=64"
    assert table["fwd_ms"].isna().all()


def test_ratios_and_goals_from_a_synthetic_table():
    n = bench.GOAL_N
    rows = [  # (impl, mode, fwd_ms, fwd_bwd_ms, fwd_peak_mib)
        ("attn_zoo.lsh", "causal", 10.0, 30.0, 100.0),
        ("reformer.lsh", "causal", 25.0, 60.0, 90.0),
        ("attn_zoo.longformer", "bidir", 10.0, 40.0, 50.0),
        ("hf.longformer", "bidir", 15.0, 40.0, 200.0),
        ("attn_zoo.bigbird", "bidir", 8.0, 20.0, 40.0),
        ("hf.bigbird", "bidir", 40.0, 80.0, 8000.0),
    ]
    table = pd.DataFrame(
        [{"impl": impl, "mode": mode, "N": n, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
          "fwd_peak_mib": peak, "status": "ok"} for impl, mode, fwd, fwd_bwd, peak in rows]
        + [{"impl": "hf.bigbird.no_dense", "mode": "bidir", "N": n, "status": "failed"}])
    ratios = bench.ratios(table).set_index("N").loc[n]
    assert ratios["lsh_fwd_speedup"] == 2.5 and ratios["lsh_fwd_bwd_speedup"] == 2.0
    assert math.isclose(ratios["lsh_fwd_peak_ratio"], 100 / 90)
    assert ratios["longformer_fwd_speedup"] == 1.5 and ratios["longformer_fwd_peak_ratio"] == 0.25
    assert ratios["bigbird_fwd_speedup"] == 5.0
    assert math.isnan(ratios["bigbird_no_dense_fwd_speedup"])
    goals = bench.goals(bench.ratios(table)).set_index("goal")["met"]
    assert list(goals) == ["yes", "NO", "NO", "yes", "n/a", "n/a"]
    assert (bench.goals(bench.ratios(table), goal_n=n // 2)["met"] == "n/a").all()
