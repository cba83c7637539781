"""experiments.report: tables, ratios, exponents and plots from known power laws; goals as
yaml data; failures listed when every point failed; W&B."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import wandb
import yaml

from experiments import report, results
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
        "memory_cpu-float32-b1-h8-kv8-d64-causal-both.png",
        "time_cpu-float32-b1-h8-kv8-d64-causal-both.png"]
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
    assert "## Speed: cpu bfloat16" in md and "## Speed: cpu float32" in md


def test_scaling_exponent_skips_failed_points():
    assert report.scaling_exponent([1, 2, 4], [1, 8, math.nan]) == pytest.approx(3)
    assert math.isnan(report.scaling_exponent([1, 2], [1, math.nan]))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results .* in .*results folders"):
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
    slug = "cpu-float32-b1-h8-kv8-d64-causal-both"
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
    result = report.run([folder], speed=speed)
    md = result.markdown
    assert "| variant | N=256 | N=1024 | N=2048 |" in md
    assert "| bigbird |  | 0.400 | oom |" in md and "| full | 1.00 | 0.900 | 0.800 |" in md
    assert "| variant | 256->256 | 1024->1024 | 1024->4096 | 2048->2048 |" in md
    assert "| local | n/a | 0.500 | 0.100 | 0.300 |" in md
    # bigbird at 1024 is less accurate than local and slower and larger: off both frontiers
    # (the speed rows' fwd_bwd_ms is 3 * time)
    frontier = report.frontier_table(report.load([folder], "train"),
                                     report.speed_costs(report.load([speed], "bench")),
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


def test_packed_and_unpacked_text_points_get_their_table(tmp_path):
    def text(attention: str, n: int, bits: float, packing: bool | None, **params) -> dict:
        values = quality_row(attention, n, math.nan, **params) | {
            "task": "stdlib_lm", "task_params": "{}", "bits_per_byte": bits,
            "train_tokens": 40960}
        return values if packing is None else values | {"packing": packing}

    folder = tmp_path / "text"
    folder.mkdir()
    pd.DataFrame([text("full", 1024, 2.5, None), text("full", 1024, 2.4, True),
                  text("local", 1024, 2.75, False, window=64),
                  text("local", 1024, 2.5, True, window=64),
                  text("local", 2048, 2.0, True, window=64)]).to_csv(folder / "train.csv",
                                                                     index=False)
    md = report.run([folder]).markdown
    # A row without the packing column trained unpacked; one layout alone is no comparison.
    assert "| full | 2.50 |  |" in md and "| full packed | 2.40 |  |" in md
    assert "| local packed | 2.50 | 2.00 |" in md
    table = md.split("trained on unpacked vs packed rows, equal tokens")[1]
    assert "| variant | N | train tokens | unpacked | packed | packed - unpacked |" in table
    assert "| full | 1024 | 40960 | 2.50 | 2.40 | -0.100 |" in table
    assert "| local | 1024 | 40960 | 2.75 | 2.50 | -0.250 |" in table
    assert "2048 |" not in table


def test_packed_and_padded_bench_rows_are_settings_of_their_own(tmp_path):
    documents = {"layout": "packed", "docs": 16, "batch": 1}
    write(tmp_path / "docs", [row("full", 1024, 1.0, 1.0), row("full", 1024, 2.0, 2.0) | documents,
                              row("full", 1024, 3.0, 3.0) | documents | {
                                  "layout": "padded", "batch": 16}])
    result = report.run([tmp_path / "docs"])
    assert "head_dim=64, causal, mode=both\n" in result.markdown  # the plain rows
    assert ", 16 documents packed (N tokens in all)" in result.markdown
    assert ", 16 documents padded (N tokens in all)" in result.markdown
    assert {p.name for p in result.plots} >= {
        "time_cpu-float32-b1-h8-kv8-d64-causal-both.png",
        "time_cpu-float32-b1-h8-kv8-d64-causal-both-packed16.png",
        "time_cpu-float32-b16-h8-kv8-d64-causal-both-padded16.png"}


# -- every point failed ---------------------------------------------------------------------


def test_a_sweep_whose_every_point_failed_gets_its_report_with_the_failures(tmp_path, capsys):
    failed = [{k: v for k, v in row("local", n, 0, 0, status, window=256).items()
               if not k.startswith("fwd")} | {"error": f"{message} at {n}"}
              for n, status, message in ((1024, "unsupported", "ValueError: window"),
                                         (2048, "oom", "OutOfMemoryError: boom"))]
    write(tmp_path / "sweep", failed)  # no metric column at all in the file
    report.main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "no point succeeded" in out
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "* local N=1024: unsupported: ValueError: window at 1024" in md
    assert "* local N=2048: oom: OutOfMemoryError: boom at 2048" in md


# -- goals ----------------------------------------------------------------------------------


def goals_file(tmp_path, table: str, goals: list[dict]) -> str:
    path = tmp_path / "goals.yaml"
    path.write_text(yaml.safe_dump({"table": table, "goals": goals}))
    return str(path)


@pytest.fixture
def contenders(tmp_path):
    """local on the library and FlexAttention at 4K and 16K; the library 2x faster at 4K,
    1.25x at 16K, its memory growing as N^1 between them; full's point at 16K failed."""
    rows = []
    for n, ours, flex in ((4096, 1.0, 2.0), (16384, 4.0, 5.0)):
        rows.append(row("local", n, ours, n / 1024, window=256) | {"contender": "attn_zoo"})
        rows.append(row("local", n, flex, 1.0, window=256) | {"contender": "flex_attention"})
    rows.append(row("full", 4096, 1.0, 1.0) | {"contender": "attn_zoo"})
    rows.append(row("full", 16384, 0, 0, "oom") | {"contender": "attn_zoo"})
    rows.append(row("full", 16384, 3.0, 1.0) | {"contender": "flex_attention"})
    # A peer whose package is missing fails before reaching the device: no device name.
    rows.append(row("local", 4096, 0, 0, "missing", window=256)
                | {"contender": "local-attention", "device_name": ""})
    write(tmp_path / "sweep", rows)
    return tmp_path / "sweep"


LOCAL = {"attention": "local", "contender": "attn_zoo"}
VERSUS_FLEX = {"rows": {"contender": "flex_attention"},
               "match": ["attention", "params", "seq_len", "dtype", "causal"]}


@pytest.mark.parametrize("spec,expected", [
    # ratio to a baseline, at every N: worst 5 / 4 at 16K
    ({"rows": LOCAL, "baseline": VERSUS_FLEX, "metric": "base_fwd_ms / fwd_ms",
      "compare": ">=", "threshold": 1.2},
     {"result": "met", "worst": 1.25, "points": 2, "at": "local seq_len=16384"}),
    ({"rows": LOCAL, "baseline": VERSUS_FLEX, "metric": "base_fwd_ms / fwd_ms",
      "compare": ">=", "threshold": 1.5}, {"result": "not met", "worst": 1.25}),
    ({"rows": LOCAL | {"seq_len": {"<": 8192}}, "baseline": VERSUS_FLEX,
      "metric": "base_fwd_ms / fwd_ms", "compare": ">=", "threshold": 1.5},
     {"result": "met", "worst": 2.0, "points": 1}),
    # a derived quantity of one row: peak over the float32 output (8 heads, head_dim 64)
    ({"rows": LOCAL | {"seq_len": 16384},
      "metric": "fwd_peak_mib / (batch * heads * seq_len * head_dim * 4 / 1048576)",
      "compare": "<=", "threshold": 0.5}, {"result": "met", "worst": 0.5}),
    # one value per variant over the lengths: memory ~ N^1, time ~ N^1, peak spread 3
    ({"rows": LOCAL, "metric": "fwd_peak_mib", "over": "seq_len", "statistic": "exponent",
      "compare": "between", "threshold": [0.99, 1.01]}, {"result": "met", "worst": 1.0,
                                                        "at": "local"}),
    ({"rows": LOCAL, "metric": "fwd_peak_mib", "over": "seq_len", "statistic": "spread",
      "compare": "<=", "threshold": 0.1}, {"result": "not met", "worst": 3.0}),
    ({"rows": LOCAL, "where": "fwd_ms > 2", "metric": "fwd_ms", "compare": "<=",
      "threshold": 4}, {"result": "met", "points": 1, "worst": 4.0}),
    # a failed point whose baseline ran fails the goal, even with no value measured
    ({"rows": {"attention": "full", "contender": "attn_zoo", "seq_len": 16384},
      "baseline": VERSUS_FLEX, "metric": "base_fwd_ms / fwd_ms", "compare": ">=",
      "threshold": 1.0}, {"result": "not met", "points": 0, "failed": 1}),
    ({"rows": LOCAL | {"seq_len": 999}, "metric": "fwd_ms", "compare": "<", "threshold": 1},
     {"result": "not measured", "points": 0}),
    ({"rows": {"no_such_column": 1}, "metric": "fwd_ms", "compare": "<", "threshold": 1},
     {"result": "not measured"}),
])
def test_goals_are_evaluated_from_yaml(contenders, tmp_path, spec, expected):
    path = goals_file(tmp_path, "bench", [{"goal": "the goal"} | spec])
    result = report.run([contenders], goals=[path])
    (goal,) = result.goals.to_dict("records")
    for key, value in expected.items():
        assert goal[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    shown = (goal["goal"] if goal["result"] != "not measured"
             else "goals (bench): none of its 1 goals measured")
    assert shown in result.markdown and shown in result.text


def test_a_failed_point_is_named_in_the_goal_note(contenders, tmp_path):
    path = goals_file(tmp_path, "bench", [{
        "goal": "full fast", "rows": {"attention": "full", "contender": "attn_zoo"},
        "metric": "fwd_ms", "compare": "<=", "threshold": 10}])
    (goal,) = report.run([contenders], goals=[path]).goals.to_dict("records")
    assert goal["result"] == "not met" and goal["points"] == 1
    assert "full seq_len=16384 (oom)" in goal["note"]


@pytest.mark.parametrize("spec,message", [
    ({"metric": "x", "compare": ">=", "threshold": 1}, "'goal' is missing"),
    ({"goal": "g", "metric": "x", "compare": "=~", "threshold": 1}, "compare must be one of"),
    ({"goal": "g", "metric": "x", "compare": ">=", "threshold": "high"},
     "threshold must be a number"),
    ({"goal": "g", "metric": "x", "compare": "between", "threshold": [2, 1]},
     r"threshold of 'between' must be \[low, high\]"),
    ({"goal": "g", "metric": "x", "compare": ">=", "threshold": 1, "colour": "red"},
     r"unknown keys \['colour'\]"),
    ({"goal": "g", "metric": "x", "compare": ">=", "threshold": 1, "over": "seq_len"},
     "over and statistic"),
    ({"goal": "g", "metric": "x", "compare": ">=", "threshold": 1,
      "baseline": {"rows": {}, "on": ["seq_len"]}}, "baseline must be"),
    ({"goal": "g", "metric": "x", "compare": ">=", "threshold": 1,
      "rows": {"seq_len": {"~": 3}}}, "rows: seq_len must be"),
])
def test_a_bad_goal_names_its_file_and_number(tmp_path, spec, message):
    path = goals_file(tmp_path, "bench", [{"goal": "fine", "metric": "fwd_ms", "compare": "<",
                                           "threshold": 1}, spec])
    with pytest.raises(ValueError, match=f"goals.yaml goal 2: {message}"):
        report.load_goals(path)


def test_unknown_goals_and_tables_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known goals: .*'decode'"):
        report.load_goals("nope")
    (tmp_path / "t.yaml").write_text("table: speed\ngoals: []\n")
    with pytest.raises(ValueError, match="t.yaml: a goals file is a mapping of `table`"):
        report.load_goals(tmp_path / "t.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in report.GOALS_DIR.glob("*.yaml")))
def test_the_shipped_goals_files_load(name):
    goals_file = report.load_goals(name)
    assert goals_file.goals and goals_file.table in report.SOURCES


def test_the_cpu_goals_read_the_bench_columns(tmp_path):
    """cpu_local's goals on rows as the speed app writes them: local beside FlexAttention at
    16K (1.5x faster; its peak 1 MiB of a 32 MiB output); the other two need other rows."""
    cpu = {"device": "cpu", "seq_len": 16384, "window": 256}
    rows = [row("local", 16384, 2.0, 1.0, **cpu) | {"contender": "attn_zoo"},
            row("local", 16384, 3.0, 1.0, **cpu) | {"contender": "flex_attention"}]
    write(tmp_path / "sweep", rows)
    goals = report.run([tmp_path / "sweep"], goals=["cpu_local"]).goals
    assert list(goals["result"]) == ["met", "not measured", "met", "not measured"]
    assert list(goals["worst"].iloc[[0, 2]]) == pytest.approx([1.5, 1 / 32])
    assert "the baseline" not in goals["note"].iloc[1]  # local-attention has no row at all


def test_tile_efficiency_of_the_gpu_goals(tmp_path):
    """(SDPA time / ours) / (dense kernel tiles / visited tiles), the dense kernel tiles
    derived from the tile sizes: N=1024 causal at 64 x 64 tiles holds 136 such tiles."""
    gpu = SETTING | {"device": "cuda", "causal": True, "seq_len": 1024}
    tiles = {"block_m": 64, "block_n": 64, "visited_tiles": 17, "dense_tiles": 256}
    rows = [row("local", 1024, 0.5, 1.0, window=64) | gpu | tiles
            | {"contender": "attn_zoo", "backend": "triton"},
            row("full", 1024, 2.0, 1.0) | gpu | {"contender": "sdpa"}]
    # Written as the speed app writes: typed columns (the tile sizes stay ints).
    table = results.Table(tmp_path / "sweep" / "bench.csv", report.SOURCES["bench"].columns,
                          key=(), extra=str)
    table.append([{k: str(v) if k == "window" else v for k, v in r.items()} for r in rows])
    goals = report.run([tmp_path / "sweep"], goals=["gpu"]).goals
    tile = goals[goals["goal"].str.startswith("local's Triton forward reaches")].iloc[0]
    assert report.dense_kernel_tiles(1024, 64, 64, causal=True) == 136
    assert tile["result"] == "not met" and tile["worst"] == pytest.approx(4.0 / (136 / 17))


def test_contenders_share_their_setting_tables_under_their_own_labels(contenders):
    md = report.run([contenders], goals=[]).markdown
    assert md.count("## Speed:") == 1 and "* local (local-attention) N=4096: missing" in md
    assert "| local | 1.00 | 4.00 | 1.00 |" in md  # forward ms at 4K and 16K, exponent 1
    assert "| local (flex_attention) | 2.00 | 5.00 | 0.66 |" in md
    assert "| full | 1.00 | oom |" in md and "## Goals" not in md


def test_a_batch_that_follows_the_length_keeps_one_setting(tmp_path):
    """B = 4096 // N (a fixed number of tokens) is one section; when two batches meet at one N,
    each batch is its own section."""
    rows = [row("local", n, n / 1024, 1.0) | {"batch": 4096 // n} for n in LENGTHS]
    write(tmp_path / "tokens", rows)
    result = report.run([tmp_path / "tokens"], goals=[])
    assert result.markdown.count("## Speed:") == 1 and "B=4..1 " in result.markdown
    assert {p.name for p in result.plots} == {"time_cpu-float32-b4-1-h8-kv8-d64-causal-both.png",
                                              "memory_cpu-float32-b4-1-h8-kv8-d64-causal-both.png"}
    write(tmp_path / "batches", rows + [row("local", 1024, 2.0, 1.0) | {"batch": 8}])
    assert report.run([tmp_path / "batches"], goals=[]).markdown.count("## Speed:") == 4


def test_the_value_of_a_goal_at_each_point_is_a_table(contenders, tmp_path):
    path = goals_file(tmp_path, "bench", [
        {"goal": "local beats flex", "rows": LOCAL, "baseline": VERSUS_FLEX,
         "metric": "base_fwd_ms / fwd_ms", "compare": ">=", "threshold": 1},
        {"goal": "local memory linear", "rows": LOCAL, "metric": "fwd_peak_mib",
         "over": "seq_len", "statistic": "exponent", "compare": "<=", "threshold": 1.1}])
    md = report.run([contenders], goals=[path]).markdown
    assert "### Goals of goals: the value at each point" in md
    assert "| local beats flex | local | 2.00 | 1.25 |" in md  # flex time / ours at 4K, 16K
    assert "| local memory linear | local |" not in md  # one value over the lengths


def test_per_position_tables_plots_and_seed_spreads(tmp_path):
    def point(attention: str, seed: int, accuracy: float, by_position: dict | None) -> dict:
        return quality_row(attention, 2048, accuracy) | {
            "seed": seed, "curriculum_len": 256, "curriculum_steps": 5,
            "position_accuracy": json.dumps(by_position) if by_position else ""}

    folder = tmp_path / "positions"
    folder.mkdir()
    near, far = {"0-63": 1.0, "64-255": 1.0, "256-1023": 0.2, "1024-2047": 0.1}, None
    pd.DataFrame([point("full", 0, 0.9, {"0-63": 1.0, "64-255": 0.9, "256-1023": 0.9,
                                         "1024-2047": 0.8}),
                  point("full", 1, 0.7, far), point("local", 0, 0.3, near),
                  point("local", 1, 0.2, near)]).to_csv(folder / "train.csv", index=False)
    result = report.run([folder])
    md = result.markdown
    assert "10 steps x 4096 tokens, lr 0.003, the first 5 at N=256" in md
    assert "| variant | 0-63 | 64-255 | 256-1023 | 1024-2047 |" in md
    assert "| local | 1.00 | 1.00 | 0.200 | 0.100 |" in md
    assert "| full | 1.00 | 0.900 | 0.900 | 0.800 |" in md
    # seed spread: a section of its own, over the seeds of each (variant, N)
    assert "| variant | N | seeds | mean | min | max | spread |" in md
    assert "| full | 2048 | 2 | 0.800 | 0.700 | 0.900 | 0.200 |" in md
    assert "| local | 2048 | 2 | 0.250 | 0.200 | 0.300 | 0.100 |" in md
    names = {p.name for p in result.plots}
    assert {"position_mqar-tiny-s10-n2048.png", "position_mqar-tiny-s10-seed1-n2048.png",
            "quality_mqar-tiny-s10-seed1.png"} <= names
    table = report.position_table(report.load([folder], "train").query("seed == 0"),
                                  "accuracy", 2048)
    assert list(table.columns) == ["variant", "0-63", "64-255", "256-1023", "1024-2047"]
