"""experiments.gpu_bench: point selection, ratios and goals from synthetic rows, resuming, failure
rows, the report files, and a tiny real run on CPU. No timing is asserted."""

from __future__ import annotations

import math
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from attn_zoo.kernels import layout as layout_cache
from attn_zoo.kernels.layout import build_layout

import attn_zoo
from experiments import gpu_bench as bench
from experiments.measure import FWD_BWD_FACTOR

TINY = ["--device", "cpu", "--dims", "16", "--dtype", "float32", "--tokens", "128",
        "--hidden", "32", "--warmup", "1", "--repeats", "1"]


def args_for(tmp_path, *extra: str):
    return bench.parse_args([*TINY, "--out", str(tmp_path), *extra])


def point_row(variant, impl, n, mode, ms, status="ok", direction="causal", head_dim=64,
              visited_tiles=None):
    """A results row as the bench writes it (B = 16384 // N, H = 2048 // D); with
    `visited_tiles`, the layout statistics of a triton row at 128 x 64 tiles."""
    batch, heads = bench.shape(n, head_dim, 16384, 2048)
    row = {"variant": variant, "impl": impl, "dtype": "bfloat16", "head_dim": head_dim,
           "seq_len": n, "batch": batch, "heads": heads, "direction": direction, "mode": mode,
           "status": status, "error": "" if status == "ok" else f"{status} happened"}
    if visited_tiles is not None:
        dense = -(-n // 128) * -(-n // 64)
        row |= {"block_m": 128, "block_n": 64, "visited_tiles": visited_tiles,
                "dense_tiles": dense, "pairs": visited_tiles * 128 * 32,
                "density": visited_tiles / dense, "pair_fill": 0.5}
    return row | ({"ms": ms, "tflops": 1.0, "peak_mib": 10.0} if status == "ok"
                  else {"ms": math.nan, "tflops": math.nan, "peak_mib": math.nan})


# -- points ---------------------------------------------------------------------------------


def test_default_points_cover_every_contender_shape_and_mode():
    args = bench.parse_args([])
    assert args.lengths == [1024 * 2**i for i in range(7)] and args.dims == [64, 128]
    assert args.directions == ["causal"] and args.modes == ["fwd", "fwd_bwd"]
    points = bench.enumerate_points(args.variants, args.impls, args.lengths, args.dims,
                                    args.directions, args.modes)
    # 10 triton + 6 flex (static variants, full included) + sdpa (full) + torch (lsh).
    assert len(points) == 18 * 7 * 2 * 2
    impls = {(p.variant, p.impl) for p in points}
    assert {v for v, i in impls if i == "flex"} == {
        "local", "longformer", "bigbird", "sparse_strided", "sparse_fixed", "full"}
    assert {v for v, i in impls if i == "sdpa"} == {"full"}
    assert {v for v, i in impls if i == "torch"} == {"lsh"}
    assert {v for v, i in impls if i == "triton"} == set(bench.VARIANTS)
    for p in points:
        assert (p.batch, p.heads) == (max(1, 16384 // p.seq_len), 2048 // p.head_dim)
    order = [(p.head_dim, p.seq_len) for p in points]
    assert order == sorted(order)
    assert len({p.key for p in points}) == len(points)


def test_bidirectional_points_leave_out_causal_only_variants_and_quick_is_small():
    points = bench.enumerate_points(["compressive", "local"], ["triton"], [256], [32],
                                    ["causal", "bidir"], ["fwd"])
    assert [(p.variant, p.direction) for p in points] == [
        ("compressive", "causal"), ("local", "causal"), ("local", "bidir")]
    quick = bench.parse_args(["--quick"])
    assert (quick.lengths, quick.dims) == (list(bench.QUICK_LENGTHS), list(bench.QUICK_DIMS))
    assert bench.parse_args(["--quick", "--dims", "128"]).dims == [128]


@pytest.mark.parametrize("argv", [["--hidden", "100"], ["--lengths", "0"], ["--variants", "nope"],
                                  ["--repeats", "0"], ["--max-minutes", "0"]])
def test_bad_options_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_shape_rejects_a_head_dim_that_does_not_divide_hidden():
    with pytest.raises(ValueError, match="hidden"):
        bench.shape(1024, 48, 16384, 2048)
    assert bench.shape(65536, 128, 16384, 2048) == (1, 16)


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.gpu_slug("  NVIDIA A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"
    assert bench.gpu_slug("???") == "unknown-device"


def test_checkout_kernels_finder_maps_the_kernels_folder():
    spec = bench.CheckoutKernelsFinder().find_spec("attn_zoo.kernels")
    assert spec.origin == str(bench.KERNELS_DIR / "__init__.py")
    assert spec.submodule_search_locations == [str(bench.KERNELS_DIR)]
    assert bench.CheckoutKernelsFinder().find_spec("kernels") is None


def test_kernels_are_imported_up_front_and_a_missing_install_says_what_to_run(monkeypatch):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    bench.require_kernels(cuda, ["triton", "flex"])  # every module of attn_zoo.kernels imports
    bench.require_kernels(torch.device("cpu"), ["triton"])

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(bench.importlib, "import_module", missing)
    bench.require_kernels(cuda, ["flex", "sdpa"])  # no triton contender: nothing to import
    with pytest.raises(RuntimeError, match="pip install --no-deps --no-build-isolation -e ."):
        bench.require_kernels(cuda, ["triton"])


# -- ratios and goals -----------------------------------------------------------------------


def synthetic_rows() -> pd.DataFrame:
    rows = [
        point_row("local", "triton", 4096, "fwd", 3.0),  # below 8K: not a goal point
        point_row("local", "flex", 4096, "fwd", 1.0),
        point_row("local", "triton", 8192, "fwd", 0.9),
        point_row("local", "flex", 8192, "fwd", 1.0),
        point_row("local", "triton", 16384, "fwd", 1.9),
        point_row("local", "flex", 16384, "fwd", 2.0),
        point_row("local", "triton", 8192, "fwd_bwd", 3.6),
        point_row("local", "flex", 8192, "fwd_bwd", 3.0),
        point_row("longformer", "triton", 8192, "fwd", 0.5),
        point_row("longformer", "flex", 8192, "fwd", 1.0),
        point_row("longformer", "triton", 16384, "fwd", None, status="oom"),
        point_row("longformer", "flex", 16384, "fwd", 2.0),
        point_row("bigbird", "triton", 8192, "fwd", 0.5),
        point_row("bigbird", "flex", 8192, "fwd", 1.0),
        point_row("bigbird", "triton", 16384, "fwd", 1.0),
        point_row("bigbird", "flex", 16384, "fwd", None, status="error"),
        point_row("full", "triton", 1024, "fwd", 1.2),
        point_row("full", "sdpa", 1024, "fwd", 1.0),
        point_row("full", "flex", 1024, "fwd", 2.4),
        point_row("full", "triton", 1024, "fwd", 1.0, direction="bidir"),  # not causal
        point_row("full", "sdpa", 1024, "fwd", 0.1, direction="bidir"),
        point_row("lsh", "triton", 16384, "fwd", 8.0),
        point_row("lsh", "torch", 16384, "fwd", 50.0),
        point_row("lsh", "triton", 16384, "fwd_bwd", 10.0),
        point_row("lsh", "torch", 16384, "fwd_bwd", 40.0),
    ]
    return pd.DataFrame(rows)


def test_ratios_pair_contenders_at_the_same_point():
    ratios = bench.ratios(synthetic_rows()).set_index(
        ["variant", "head_dim", "direction", "mode", "seq_len"])
    assert ratios.loc[("local", 64, "causal", "fwd", 8192), "triton_over_flex"] == 0.9
    full = ratios.loc[("full", 64, "causal", "fwd", 1024)]
    assert full["triton_over_sdpa"] == 1.2 and full["triton_over_flex"] == 0.5
    assert ratios.loc[("lsh", 64, "causal", "fwd", 16384), "torch_over_triton"] == 50 / 8
    # A failed point has no time: no ratio.
    assert math.isnan(ratios.loc[("longformer", 64, "causal", "fwd", 16384), "triton_over_flex"])


def test_goals_from_a_synthetic_table():
    goals = bench.goals(synthetic_rows()).set_index("goal")
    assert len(goals) == 10 + 1 + 2 + 6

    def goal(prefix: str) -> pd.Series:
        (name,) = [g for g in goals.index if g.startswith(prefix)]
        return goals.loc[name]

    local = goal("local fwd: ours")  # 0.9 at 8K, 0.95 at 16K; the 3.0 at 4K does not count
    assert (local["met"], local["points"], local["at"]) == ("met", 2, "D=64 N=16384 causal")
    assert local["worst"] == pytest.approx(0.95)
    assert goal("local fwd_bwd: ours")["met"] == "not met"
    assert goal("local fwd_bwd: ours")["worst"] == pytest.approx(1.2)
    longformer = goal("longformer fwd: ours")  # fast where it ran, but failed where Flex ran
    assert (longformer["met"], longformer["ours_failed"], longformer["worst"]) == (
        "not met", 1, 0.5)
    bigbird = goal("bigbird fwd: ours")  # Flex failed at 16K: that point is not compared
    assert (bigbird["met"], bigbird["points"]) == ("met", 1)
    assert "flex failed at 1 point" in bigbird["note"]
    assert goal("sparse_fixed fwd_bwd")["met"] == "not measured"
    full = goal("full causal fwd")
    assert full["met"] == "met" and full["worst"] == pytest.approx(1 / 1.2)
    assert goal("lsh causal fwd:")["met"] == "met"
    assert goal("lsh causal fwd:")["worst"] == pytest.approx(6.25)
    lsh_train = goal("lsh causal fwd_bwd")
    assert lsh_train["met"] == "not met" and lsh_train["worst"] == pytest.approx(4.0)
    assert goal("local fwd: tile efficiency")["met"] == "not measured"  # no layout statistics


@pytest.mark.parametrize("n", [1000, 4097])
@pytest.mark.parametrize(("block_m", "block_n"), [(128, 64), (64, 64), (32, 16)])
def test_dense_kernel_tiles_are_the_full_layouts_tiles(n, block_m, block_n):
    for causal in (False, True):
        layout = build_layout(attn_zoo.build("full").pattern(n, causal), n, n, block_m, block_n)
        assert bench.dense_kernel_tiles(n, block_m, block_n, causal) == layout.visited_tiles
    assert bench.dense_kernel_tiles(n, block_m, block_n, False) == layout.dense_tiles


def tile_rows() -> pd.DataFrame:
    """Causal fwd points at 128 x 64 tiles: the dense kernel visits 2 * 64 * 65 / 2 = 4160
    tiles at 8K (of 8192), 128 * 129 = 16512 at 16K (of 32768), 32 * 33 = 1056 at 4K."""
    return pd.DataFrame([
        point_row("full", "sdpa", 4096, "fwd", 1.0),
        point_row("full", "sdpa", 8192, "fwd", 9.0),
        point_row("full", "sdpa", 16384, "fwd", 19.0),
        point_row("full", "triton", 8192, "fwd", 10.0, visited_tiles=4160),
        # sparsity 1 - 400 / 2048 < 0.9: not a goal point
        point_row("local", "triton", 4096, "fwd", 1.0, visited_tiles=400),
        # predicted 4160 / 416 = 10, achieved 9 / 0.9 = 10: efficiency 1
        point_row("local", "triton", 8192, "fwd", 0.9, visited_tiles=416),
        # predicted 16512 / 1032 = 16, achieved 19 / 1.9 = 10: efficiency 0.625
        point_row("local", "triton", 16384, "fwd", 1.9, visited_tiles=1032),
        point_row("longformer", "triton", 8192, "fwd", 0.9, visited_tiles=416),
        # failed where SDPA ran; its layout (sparsity 0.95) puts it among the goal's points
        point_row("longformer", "triton", 16384, "fwd", None, status="oom", visited_tiles=1640),
        point_row("bigbird", "triton", 8192, "fwd", 1.0, visited_tiles=208),
        point_row("bigbird", "triton", 16384, "fwd", 1.0),  # no layout statistics: left out
    ])


def test_tile_efficiency_is_the_achieved_over_the_tile_predicted_speedup():
    frame = bench.ratios(tile_rows()).set_index(["variant", "seq_len"])
    local = frame.loc["local"]
    assert local.loc[8192, "dense_kernel_tiles"] == 4160
    assert local.loc[8192, "predicted_speedup"] == pytest.approx(10.0)
    assert local.loc[8192, "achieved_speedup"] == pytest.approx(10.0)
    assert local.loc[8192, "tile_efficiency"] == pytest.approx(1.0)
    assert local.loc[8192, "tile_sparsity"] == pytest.approx(1 - 416 / 8192)
    assert local.loc[16384, "tile_efficiency"] == pytest.approx(0.625)
    assert local.loc[4096, "tile_efficiency"] == pytest.approx((1.0 / 1.0) / (1056 / 400))
    # full: every causal dense tile visited, so its efficiency is SDPA's time over ours.
    assert frame.loc[("full", 8192), "predicted_speedup"] == 1.0
    assert frame.loc[("full", 8192), "tile_efficiency"] == pytest.approx(0.9)
    assert math.isnan(frame.loc[("bigbird", 16384), "tile_efficiency"])


def test_tile_efficiency_goals_take_points_of_high_sparsity_only():
    goals = bench.goals(tile_rows()).set_index("goal")

    def goal(prefix: str) -> pd.Series:
        (name,) = [g for g in goals.index if g.startswith(prefix)]
        return goals.loc[name]

    local = goal("local fwd: tile efficiency")  # 1.0 at 8K, 0.625 at 16K; 4K is too dense
    assert (local["met"], local["points"], local["target"]) == ("not met", 2, ">= 0.8")
    assert local["worst"] == pytest.approx(0.625) and local["at"] == "D=64 N=16384 causal"
    longformer = goal("longformer fwd: tile efficiency")
    assert (longformer["met"], longformer["points"], longformer["ours_failed"]) == (
        "not met", 1, 1)
    assert "ours failed at 1 point(s) where full_sdpa ran" in longformer["note"]
    bigbird = goal("bigbird fwd: tile efficiency")  # 9 / 1 / (4160 / 208) = 0.45
    assert (bigbird["met"], bigbird["points"]) == ("not met", 1)
    assert bigbird["worst"] == pytest.approx(0.45)
    assert goal("local fwd_bwd: tile efficiency")["met"] == "not measured"
    passing = tile_rows()
    passing = passing[(passing["variant"] != "local") | (passing["seq_len"] != 16384)]
    assert bench.goals(passing).set_index("goal").loc[local.name, "met"] == "met"


def test_tile_tables_show_efficiency_and_layouts():
    tables = bench.result_tables(tile_rows())
    efficiency = tables[bench.TILE_EFFICIENCY_TITLE].set_index(
        ["variant", "head_dim", "direction", "mode"])
    assert efficiency.loc[("local", 64, "causal", "fwd"), "16K"] == "0.625"
    assert efficiency.loc[("full", 64, "causal", "fwd"), "8K"] == "0.900"
    layouts = tables["Tile layouts of the triton kernel: tile sparsity / pair fill"].set_index(
        ["variant", "direction", "tiles"])
    assert layouts.loc[("local", "causal", "128x64"), "8K"] == "0.949 / 0.500"
    assert layouts.loc[("longformer", "causal", "128x64"), "16K"] == "0.950 / 0.500"
    assert "bigbird" in layouts.index.get_level_values(0)  # its 8K point has statistics


def test_a_goal_whose_kernel_failed_everywhere_is_not_met():
    rows = pd.DataFrame([point_row("full", "triton", 1024, "fwd", None, status="unsupported"),
                         point_row("full", "sdpa", 1024, "fwd", 1.0)])
    full = bench.goals(rows).set_index("goal").filter(like="full causal", axis=0).iloc[0]
    assert (full["met"], full["points"], full["ours_failed"]) == ("not met", 0, 1)


def test_report_tables_show_numbers_and_failed_statuses():
    tables = bench.result_tables(synthetic_rows())
    times = tables["Time (ms)"].set_index(["variant", "impl", "head_dim", "direction", "mode"])
    assert times.loc[("longformer", "triton", 64, "causal", "fwd"), "16K"] == "oom"
    assert times.loc[("local", "triton", 64, "causal", "fwd"), "8K"] == "0.900"
    flex = tables["Ours / FlexAttention time (< 1: ours faster)"].set_index(
        ["variant", "head_dim", "direction", "mode"])
    assert flex.loc[("local", 64, "causal", "fwd_bwd"), "8K"] == "1.20"
    assert set(tables["Failures"]["status"]) == {"oom", "error"}


# -- the results file -----------------------------------------------------------------------


def test_append_replaces_the_same_point_and_resume_skips_done_points(tmp_path):
    csv = tmp_path / bench.CSV_NAME
    points = bench.enumerate_points(["local"], ["triton", "flex"], [1024], [64], ["causal"],
                                    ["fwd"])
    assert bench.pending_points(points, bench.read_rows(csv)) == points
    triton, flex = points
    bench.append_row(csv, asdict(triton) | {"status": "oom", "error": "no memory"})
    bench.append_row(csv, asdict(flex) | {"status": "ok", "error": "", "ms": 1.5})
    rows = bench.read_rows(csv)
    assert bench.pending_points(points, rows) == []
    assert bench.pending_points(points, rows, retry_failed=True) == [triton]
    bench.append_row(csv, asdict(triton) | {"status": "ok", "error": "", "ms": 1.0})
    rows = bench.read_rows(csv)
    assert len(rows) == 2 and list(rows["status"]) == ["ok", "ok"]
    assert rows.set_index("impl").loc["triton", "ms"] == 1.0


def fake_measure(failures: dict[tuple[str, int], BaseException]):
    """A stand-in for measure_point: fixed numbers, or the error given for (impl, N)."""
    calls = []

    def measure(point, contenders, inputs, settings, checks):
        calls.append(point)
        error = failures.get((point.impl, point.seq_len))
        if error is not None:
            raise error
        return {"ms": float(point.seq_len) / 100, "tflops": 1.0, "peak_mib": 2.0,
                "first_call_s": 0.1}

    return measure, calls


def test_failing_points_become_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    measure, calls = fake_measure({
        ("sdpa", 128): torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"),
        ("triton", 64): ValueError("backend 'triton' is not supported"),
        ("torch", 64): RuntimeError("compile failed"),
        ("torch", 128): bench.WrongResult("out differs")})
    monkeypatch.setattr(bench, "measure_point", measure)
    plotted = []
    monkeypatch.setattr(bench, "plot_variant", lambda rows, variant, path: plotted.append(path))
    args = args_for(tmp_path, "--variants", "full", "lsh", "--impls", "sdpa", "triton", "torch",
                    "--lengths", "64", "128", "256", "--modes", "fwd")
    outcome = bench.run(args)
    assert (outcome.selected, outcome.measured, outcome.missing) == (12, 12, 0)
    rows = bench.typed(bench.read_rows(tmp_path / bench.CSV_NAME)).set_index(
        ["variant", "impl", "seq_len"])
    assert rows.loc[("full", "sdpa", 128), "status"] == "oom"
    assert rows.loc[("full", "sdpa", 256), "status"] == "skipped"  # after an oom, not tried
    assert rows.loc[("full", "sdpa", 256), "error"] == "oom at N=128"
    assert rows.loc[("full", "triton", 64), "status"] == "unsupported"
    assert rows.loc[("lsh", "triton", 64), "status"] == "unsupported"
    assert rows.loc[("lsh", "torch", 64), "status"] == "error"
    assert rows.loc[("lsh", "torch", 64), "error"] == "RuntimeError: compile failed"
    assert rows.loc[("lsh", "torch", 128), "status"] == "wrong"
    assert rows.loc[("lsh", "torch", 256), "status"] == "ok"
    assert rows.loc[("full", "triton", 256), "ms"] == 2.56
    # Layout statistics of tiled triton points, failed ones too; none for lsh or SDPA.
    assert rows.loc[("full", "triton", 64), "visited_tiles"] == 3  # causal, 32 x 32 tiles
    assert rows.loc[("full", "triton", 256), "pairs"] == 256 * 257 // 2
    assert rows.loc[[("lsh", "triton", 64), ("full", "sdpa", 64)], "visited_tiles"].isna().all()
    assert len(calls) == 11  # every point but the skipped one
    for name in ("gpu_bench.md", "goals.csv", "ratios.csv"):
        assert (tmp_path / name).is_file(), name
    assert plotted == [tmp_path / "plots" / "full.png", tmp_path / "plots" / "lsh.png"]
    report = (tmp_path / "gpu_bench.md").read_text()
    assert "## Goals" in report and "| oom |" in report and "| skipped |" in report
    goals = pd.read_csv(tmp_path / "goals.csv").set_index("goal")
    full = goals.loc[[g for g in goals.index if g.startswith("full causal")][0]]
    # Unsupported at N=64 where SDPA ran; SDPA failed or was skipped at the other lengths.
    assert (full["met"], full["points"], full["ours_failed"]) == ("not met", 0, 1)


def test_a_rerun_measures_only_what_is_missing_and_max_minutes_stops_a_run(tmp_path,
                                                                          monkeypatch):
    measure, calls = fake_measure({})
    monkeypatch.setattr(bench, "measure_point", measure)
    monkeypatch.setattr(bench, "plot_variant", lambda rows, variant, path: None)
    selection = ["--variants", "full", "--impls", "sdpa", "--lengths", "64", "128"]
    stopped = bench.run(args_for(tmp_path, *selection, "--max-minutes", "1e-9"))
    assert (stopped.measured, stopped.missing, calls) == (0, 4, [])
    first = bench.run(args_for(tmp_path, *selection, "--lengths", "64"))
    assert (first.measured, first.missing) == (2, 0)
    second = bench.run(args_for(tmp_path, *selection))
    assert (second.measured, second.missing) == (2, 0)
    assert [p.seq_len for p in calls] == [64, 64, 128, 128]
    assert len(bench.read_rows(tmp_path / bench.CSV_NAME)) == 4
    third = bench.run(args_for(tmp_path, *selection))
    assert third.measured == 0 and len(calls) == 4
    assert "All 4 points" in (tmp_path / "gpu_bench.md").read_text()


def test_dry_run_lists_points_and_measures_nothing(tmp_path, capsys):
    outcome = bench.run(args_for(tmp_path, "--variants", "lsh", "--lengths", "64", "--dry-run"))
    assert (outcome.selected, outcome.measured, outcome.missing) == (4, 0, 4)
    assert "lsh/torch D=16 N=64 causal fwd_bwd" in capsys.readouterr().out
    assert not (tmp_path / bench.CSV_NAME).exists()


# -- the triton check -----------------------------------------------------------------------


def test_relative_error_uses_the_reference_scale_and_a_quantile_for_content_based():
    expected = torch.ones(1000, 4)
    got = expected.clone()
    got[0] += 0.5  # one row far off
    assert bench.relative_error(got, expected, None) == pytest.approx(0.5)
    assert bench.relative_error(got, expected, 0.99) == pytest.approx(0.0, abs=1e-6)
    assert bench.relative_error(None, None, None) == 0.0
    with pytest.raises(bench.WrongResult, match="gradient"):
        bench.relative_error(None, expected, None)


def test_check_against_torch_passes_an_equal_backend_and_flags_a_wrong_one(monkeypatch):
    cpu = torch.device("cpu")
    error = bench.check_against_torch("local", True, 16, cpu, "float32", 40, 1e-6,
                                      backend="torch")
    assert error == 0.0
    build = attn_zoo.build

    class Off(torch.nn.Module):
        """The torch backend with every output scaled by 1.1: a wrong kernel."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, q, k, v, causal):
            return self.inner(q, k, v, causal=causal) * 1.1

    def wrong_build(name, backend, **params):
        attn = build(name, backend="torch", **params)
        return Off(attn) if backend == "triton" else attn

    monkeypatch.setattr(bench.attn_zoo, "build", wrong_build)
    with pytest.raises(bench.WrongResult, match="triton differs from the torch backend"):
        bench.check_against_torch("local", True, 16, cpu, "float32", 40, 1e-2)


# -- real runs ------------------------------------------------------------------------------


def test_tiny_cpu_run_measures_sdpa_and_the_lsh_torch_backend(tmp_path):
    args = args_for(tmp_path, "--variants", "full", "lsh", "--impls", "sdpa", "torch",
                    "--lengths", "64", "--modes", "fwd_bwd", "--point-budget", "0.5")
    outcome = bench.run(args)
    assert (outcome.selected, outcome.measured, outcome.missing) == (2, 2, 0)
    rows = bench.read_rows(tmp_path / bench.CSV_NAME)
    assert list(rows["status"]) == ["ok"] * 2, rows["error"].tolist()
    assert list(rows["impl"]) == ["sdpa", "torch"]
    assert (rows["ms"] > 0).all() and (rows["tflops"] > 0).all() and (rows["peak_mib"] > 0).all()
    assert set(rows["batch"]) == {"2"} and set(rows["heads"]) == {"2"}  # 128 // 64, 32 // 16
    # useful TFLOP/s = flops(N, D, causal) * B * H (* 3.5 for fwd+bwd) / time
    for row in rows.itertuples():
        attn = attn_zoo.build(row.variant)
        factor = FWD_BWD_FACTOR if row.mode == "fwd_bwd" else 1.0
        expected = attn.flops(64, 16, True) * 2 * 2 * factor / (row.ms / 1e3) / 1e12
        assert row.tflops == pytest.approx(expected)
    assert (tmp_path / "plots" / "full.png").stat().st_size > 0


def test_tiny_cpu_run_of_the_kernel_records_the_layout_it_ran_on(tmp_path):
    args = args_for(tmp_path, "--variants", "local", "full", "--impls", "triton", "sdpa",
                    "--lengths", "80", "--modes", "fwd", "--check-n", "40", "--point-budget",
                    "0.1")
    outcome = bench.run(args)
    rows = bench.typed(bench.read_rows(tmp_path / bench.CSV_NAME)).set_index(["variant", "impl"])
    assert list(rows["status"]) == ["ok"] * 3, rows["error"].tolist()
    block_m, block_n = bench.kernel_tiles(torch.float32, 16, torch.device("cpu"))
    local = attn_zoo.build("local", backend="triton")
    expected = build_layout(local.pattern(80, True), 80, 80, block_m, block_n).stats()
    for column in bench.LAYOUT_COLUMNS:
        assert rows.loc[("local", "triton"), column] == pytest.approx(expected[column]), column
    # The kernel ran on the layout the benchmark built: one cached layout of this module at N=80
    # (cache keys: (pattern key, n, m, block_m, block_n, device)).
    params = tuple(local.params.to_dict().items())
    built = [key for key in layout_cache._CACHE
             if key[0][:2] == ("local", params) and key[1:5] == (80, 80, block_m, block_n)]
    assert len(built) == 1
    ratios = pd.read_csv(tmp_path / "ratios.csv").set_index("variant")
    assert ratios.loc["local", "tile_efficiency"] > 0
    assert bench.TILE_EFFICIENCY_TITLE in outcome.tables
    assert "tile sparsity / pair fill" in (tmp_path / "gpu_bench.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_gpu_run_of_every_contender(tmp_path):
    args = bench.parse_args(["--variants", "local", "full", "lsh", "--lengths", "1024",
                             "--dims", "64", "--repeats", "3", "--out", str(tmp_path)])
    bench.run(args)
    rows = bench.read_rows(tmp_path / bench.CSV_NAME)
    assert set(rows["impl"]) == {"triton", "flex", "sdpa", "torch"}
    assert list(rows["status"]) == ["ok"] * len(rows), rows["error"].tolist()
