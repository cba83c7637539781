"""experiments.bench: a job's rows, its check, failures as rows, skipped lengths after an oom,
resume, settings rejected before anything runs, clean CPU memory, a multirun end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import attn_zoo
from attn_zoo.registry import get
from experiments import bench, contenders
from experiments.config import register_configs
from experiments.wandb_logger import read_offline_run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["heads=2", "head_dim=16", "seq_len=64", "warmup=1", "repeats=1", "logger=none",
        "check_n=40", "matmul_peak=false"]
TINY_CLI = [*TINY, "threads=1"]


def config(out_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("bench", overrides=[*TINY, f"out_dir={out_dir}", *overrides])


def rows(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "bench.csv")


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_job_is_a_checked_row_per_length_in_increasing_order(tmp_path):
    result = bench.run(config(tmp_path, "attention=local", "attention.window=8", "kv_heads=1",
                              "seq_len=[128,64]"))
    assert result["status"] == "ok" and not result["skipped"]
    written = rows(tmp_path).to_dict("records")
    assert [row["seq_len"] for row in written] == [64, 128]
    for row in written:
        assert (row["contender"], row["attention"], row["heads"], row["kv_heads"],
                row["window"], row["mode"]) == ("attn_zoo", "local", 2, 1, 8, "both")
        assert json.loads(row["params"]) == {"window": 8, "scale": None}
        assert 0 <= row["check_error"] < 1e-5 and row["check_n"] == 40
        assert row["check_against"] == "float64 dense pattern"
        for metric in ("fwd_ms", "fwd_bwd_ms", "peak_mem_mib", "useful_tflops",
                       "tokens_per_s", "first_call_s"):
            assert row[metric] > 0
        assert row["peak_mem_mib"] == max(row["fwd_peak_mib"], row["fwd_bwd_peak_mib"])
        assert row["torch_version"] == torch.__version__ and row["device_name"]


def test_forward_mode_measures_the_forward_only(tmp_path):
    (row,) = bench.run(config(tmp_path, "attention=full", "mode=fwd"))["rows"]
    assert row["fwd_ms"] > 0 and "fwd_bwd_ms" not in row
    assert row["useful_tflops"] == row["fwd_tflops"]


def test_tokens_set_the_batch_of_each_length(tmp_path):
    result = bench.run(config(tmp_path, "attention=full", "mode=fwd", "tokens=128",
                              "seq_len=[32,64,256]"))
    assert [row["batch"] for row in result["rows"]] == [4, 2, 1]


def test_failing_jobs_are_rows_and_the_sweep_goes_on(tmp_path):
    statuses = [bench.run(config(tmp_path, *point))["status"] for point in (
        ["attention=full"], ["attention=local", "attention.window=-1"], ["attention=local"])]
    assert statuses == ["ok", "unsupported", "ok"]
    failed = rows(tmp_path).iloc[1]
    assert failed["status"] == "unsupported" and "window must be >= 0" in failed["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_says_so_in_the_row(tmp_path):
    result = bench.run(config(tmp_path, "attention=full", "device=cuda"))
    assert result["status"] == "error" and "no CUDA GPU is visible" in result["rows"][0]["error"]
    assert rows(tmp_path)["error"].str.contains("device=cuda").all()


def test_a_rerun_skips_done_lengths_and_retries_failed_ones_on_request(tmp_path):
    ok = config(tmp_path, "attention=local")
    bad = config(tmp_path, "attention=local", "attention.window=-1")
    first = bench.run(ok)
    bench.run(bad)
    again = bench.run(ok)
    assert again["skipped"] and again["rows"][0]["timestamp"] == first["rows"][0]["timestamp"]
    assert bench.run(bad)["skipped"]
    assert not bench.run(config(tmp_path, "attention=local", "attention.window=-1",
                                "retry_failed=true"))["skipped"]
    longer = bench.run(config(tmp_path, "attention=local", "seq_len=[64,65]"))
    assert [row["seq_len"] for row in longer["rows"]] == [64, 65]
    assert len(rows(tmp_path)) == 4


def test_dry_run_lists_the_lengths_to_measure_and_measures_nothing(tmp_path, capsys):
    bench.run(config(tmp_path, "attention=full", "mode=fwd"))
    bench.run(config(tmp_path, "attention=full", "mode=fwd", "seq_len=[64,96]", "dry_run=true"))
    assert "to measure: full/attn_zoo N=96" in capsys.readouterr().out
    assert len(rows(tmp_path)) == 1


def fake(monkeypatch, name: str, wrap) -> None:
    """Register contender `name`: the library's, its forward at length n wrapped by `wrap`."""

    def builder(setting):
        real = contenders.CONTENDERS["attn_zoo"](setting)
        build = real.build
        real.build = lambda n, batch: wrap(build(n, batch), n)
        real.name = name
        return real

    monkeypatch.setitem(contenders.CONTENDERS, name, builder)


def test_after_an_oom_the_longer_lengths_are_skipped_not_attempted(tmp_path, monkeypatch):
    attempted = []

    def oom_from_128(forward, n):
        attempted.append(n)
        if n >= 128 and n != 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return forward

    fake(monkeypatch, "oom_from_128", oom_from_128)
    result = bench.run(config(tmp_path, "attention=local", "contender=oom_from_128",
                              "seq_len=[64,128,256,512]"))
    assert [row["status"] for row in result["rows"]] == ["ok", "oom", "skipped", "skipped"]
    assert result["rows"][2]["error"] == "oom at N=128"
    assert 256 not in attempted and 512 not in attempted
    assert rows(tmp_path)["status"].tolist() == ["ok", "oom", "skipped", "skipped"]


def test_a_first_call_over_the_limit_skips_the_longer_lengths(tmp_path, monkeypatch):
    def slow_from_128(forward, n):
        def slow(q, k, v):
            time.sleep(0.3 if q.shape[2] >= 128 else 0)
            return forward(q, k, v)

        return slow

    fake(monkeypatch, "slow_from_128", slow_from_128)
    result = bench.run(config(tmp_path, "attention=full", "contender=slow_from_128",
                              "mode=fwd", "call_limit_s=0.2", "seq_len=[64,128,256]"))
    assert [row["status"] for row in result["rows"]] == ["ok", "over_budget", "skipped"]


def test_a_contender_that_differs_from_the_reference_is_wrong_and_not_timed(tmp_path,
                                                                          monkeypatch):
    fake(monkeypatch, "off", lambda forward, n: lambda q, k, v: forward(q, k, v) * 1.1)
    result = bench.run(config(tmp_path, "attention=local", "contender=off", "seq_len=[64,128]"))
    assert [row["status"] for row in result["rows"]] == ["wrong", "wrong"]
    assert "differs from the float64 dense pattern reference" in result["rows"][0]["error"]
    assert "fwd_ms" not in result["rows"][0]


def test_sdpa_rows_are_full_attention_checked_against_the_reference(tmp_path):
    result = bench.run(config(tmp_path, "attention=local", "contender=sdpa", "kv_heads=1"))
    (row,) = result["rows"]
    assert (row["contender"], row["attention"], row["status"]) == ("sdpa", "full", "ok")
    assert row["check_error"] < 1e-5 and row["backend"] == ""
    assert json.loads(row["params"]) == {"scale": None}


@pytest.mark.parametrize("contender, backend", [("flex_attention", "auto"),
                                                 ("attn_zoo", "flex")])
def test_flex_attention_and_the_flex_backend_match_the_reference(tmp_path, contender, backend):
    (row,) = bench.run(config(tmp_path, "attention=local", "attention.window=8",
                              f"contender={contender}", f"backend={backend}"))["rows"]
    assert row["status"] == "ok" and row["check_error"] < 1e-5 and row["fwd_ms"] > 0
    assert row["error"] == "fwd_bwd unavailable: FlexAttention has no CPU backward"


PEERS = {  # contender -> (package, overrides): tiny settings each peer accepts
    "local-attention": ("local_attention", ["attention=local", "attention.window=8"]),
    "reformer": ("reformer_pytorch", ["attention=lsh", "attention.bucket_size=8",
                                      "attention.n_hashes=2", "check_n=32"]),
    "hf_longformer": ("transformers", ["attention=longformer", "attention.window=8",
                                       "causal=false", "check_n=32"]),
    "hf_bigbird": ("transformers", ["attention=bigbird", "attention.block=8", "causal=false",
                                    "seq_len=128", "check_n=128"]),
    "hf_bigbird_no_dense": ("transformers", ["attention=bigbird", "attention.block=8",
                                             "causal=false", "seq_len=128", "check_n=128"]),
}


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_each_peer_does_its_variants_work(tmp_path, peer):
    package, overrides = PEERS[peer]
    pytest.importorskip(package)
    (row,) = bench.run(config(tmp_path, f"contender={peer}", *overrides))["rows"]
    assert row["status"] == "ok", row["error"]
    assert row["contender"] == peer and row["fwd_ms"] > 0 and row["fwd_peak_mib"] > 0
    if row["check_against"].startswith("shape"):  # random choices of its own
        assert pd.isna(row["check_error"])
    else:
        assert row["check_error"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_sdpa_kernels_run_where_torch_offers_them_and_are_unsupported_elsewhere(tmp_path):
    statuses = {name: bench.run(config(tmp_path, "attention=full", f"contender={name}",
                                       "mode=fwd"))["status"]
                for name in ("sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")}
    assert statuses == {"sdpa_math": "ok", "sdpa_flash": "ok", "sdpa_efficient": "unsupported",
                        "sdpa_cudnn": "unsupported"}
    assert "torch offers no EFFICIENT_ATTENTION SDPA kernel" in rows(tmp_path)["error"][2]


def test_variant_parameters_have_one_column_type_across_variants():
    types: dict[str, set[type]] = {}
    for name in attn_zoo.available():
        params = {k: v for k, v in get(name).Params().to_dict().items()
                  if k not in ("backend", "sinks")}  # the bench sets both itself
        for column, kind in bench.param_columns(name, params).items():
            types.setdefault(column, set()).add(kind)
    assert {column: kinds for column, kinds in types.items() if len(kinds) > 1} == {}


def test_a_contender_for_another_variant_writes_no_rows(tmp_path):
    result = bench.run(config(tmp_path, "attention=full", "contender=local-attention"))
    assert result["rows"] == [] and result["status"].startswith("not applicable")
    assert not (tmp_path / "bench.csv").exists()


def test_a_missing_peer_package_is_a_row_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "local_attention", None)  # import fails as if absent
    result = bench.run(config(tmp_path, "attention=local", "contender=local-attention",
                              "seq_len=[64,128]"))
    assert [row["status"] for row in result["rows"]] == ["missing", "missing"]
    assert "pip install 'attn-zoo[bench]'" in result["rows"][0]["error"]


def test_cpu_peak_memory_is_per_length_and_grows_with_it(tmp_path):
    def peaks(lengths: str, folder: str) -> list[float]:
        cfg = config(tmp_path / folder, "attention=local", "attention.window=16", "mode=fwd",
                     f"seq_len={lengths}")
        return [row["peak_mem_mib"] for row in bench.run(cfg)["rows"]]

    # Past the engine's fixed workspace, what grows is linear in N: doubling N doubles it.
    short, middle, long = peaks("[16384,32768,65536]", "a")
    assert (long - middle) / (middle - short) == pytest.approx(2, rel=0.05)
    (again,) = peaks("[16384]", "b")  # after longer lengths in this process
    assert again == pytest.approx(short, rel=0.01)


@pytest.mark.parametrize("override, message", [
    ("repeats=0", "repeats must be >= 1, got 0"),
    ("budget_s=-1", "budget_s must be > 0 and finite, or null, got -1.0"),
    ("threads=0", "threads must be >= 1 or null, got 0"),
    ("warmup=-1", "warmup must be >= 0, got -1"),
    ("seq_len=0", "seq_len must be a length >= 1"),
    ("seq_len=[]", "seq_len must be a length >= 1"),
    ("batch=0", "batch must be >= 1, got 0"),
    ("kv_heads=3", "kv_heads must be a divisor of heads (2), got 3"),
    ("check_n=0", "check_n must be >= 1, got 0"),
    ("call_limit_s=0", "call_limit_s must be > 0 and finite, or null, got 0.0"),
    ("max_minutes=inf", "max_minutes must be > 0 and finite, or null, got inf"),
    ("contender=nope", "contender must be one of"),
    ("device=tpu", "device must be cpu, cuda or cuda:<index>, got 'tpu'"),
    ("out_dir=''", "out_dir must be a folder path (not empty), got ''"),
    ("docs=0", "docs must be >= 1, got 0"),
    ("layout=packed docs=41", "docs must be <= every seq_len and check_n (40) with "
                              "layout=packed, got 41"),
    ("layout=padded batch=2", "batch must be 1, with tokens null, for layout=padded"),
])
def test_nonsense_settings_fail_before_anything_runs(tmp_path, override, message):
    cfg = config(tmp_path, "attention=full", *override.split())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        bench.validate(cfg)
    with pytest.raises(ValueError):
        bench.run(cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("multirun", [False, True])
def test_an_empty_out_dir_fails_on_the_command_line_and_writes_nothing(tmp_path, multirun):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", *(["-m"] * multirun),
                           *TINY_CLI, "attention=full", "out_dir="], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "out_dir must be a folder path (not empty), got ''" in done.stderr
    assert not any(tmp_path.iterdir())


def test_two_runs_started_together_get_their_own_hydra_folders(tmp_path):
    command = [sys.executable, "-m", "experiments.bench", *TINY_CLI, "attention=full",
               "mode=fwd", f"out_dir={tmp_path}"]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for process in runs:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
    folders = sorted(path.name for path in (tmp_path / "hydra").iterdir())
    assert len(folders) == 2
    assert {name.rsplit("-", 1)[1] for name in folders} == {str(p.pid) for p in runs}


def test_a_killed_run_leaves_no_temporary_files(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.bench", *TINY_CLI, "attention=full",
         f"out_dir={tmp_path}", "seq_len=[64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80,"
         "1024,2048,4096,8192]", "repeats=50", "budget_s=null"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    csv = tmp_path / "bench.csv"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not csv.exists() or csv.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert csv.read_text().count("\n") >= 3
    names = [path.name for path in tmp_path.iterdir()]
    leftovers = [name for name in names if name not in ("bench.csv", "hydra")
                 and not name.endswith(".lock")]
    assert leftovers == []
    assert rows(tmp_path)["status"].eq("ok").all()


def test_git_is_queried_read_only_and_once_per_process(tmp_path):
    calls = tmp_path / "git_calls"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    real_git = subprocess.run(["which", "git"], capture_output=True, text=True).stdout.strip()
    (fake_bin / "git").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real_git} "$@"\n')
    (fake_bin / "git").chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "-m", *TINY_CLI, "attention=full,local",
         "mode=fwd", "seq_len=[32,64]", f"out_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=os.environ | {"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(rows(tmp_path / "out")) == 4
    lines = calls.read_text().splitlines()
    assert lines and all(line.startswith("--no-optional-locks") for line in lines)
    assert sum(" status" in line for line in lines) <= 1


def test_progress_line():
    assert bench.progress_line(1, 4, 10.0, "x").startswith("[######------------------] 1/4")
    assert "~0:00:30 left" in bench.progress_line(1, 4, 10.0, "x")
    assert bench.progress_line(3, None, 5.0, "x") == "[point 3] 0:00:05 elapsed  x"


def test_two_job_multirun_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    done = cli("-m", "attention=full,local", "seq_len=[32,64]", "heads=2", "head_dim=16",
               "repeats=1", "threads=1", "check_n=40", f"out_dir={out}", "sweep_name=e2e")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2/2" in done.stdout and "forward time (ms)" in done.stdout
    table = rows(out).set_index(["attention", "seq_len"])
    assert sorted(table.index) == [("full", 32), ("full", 64), ("local", 32), ("local", 64)]
    assert (table["status"] == "ok").all() and (table["matmul_peak_tflops"] > 0).all()
    assert (out / "report.md").exists()
    runs = {run["name"]: run for run in map(read_offline_run,
                                            (out / "wandb").glob("offline-run-*"))}
    assert sorted(runs) == ["full-attn_zoo", "local-attn_zoo"]
    for name, run in runs.items():
        attention = name.split("-")[0]
        assert run["group"] == "e2e" and run["config"]["attention"]["name"] == attention
        assert run["summary"]["bench/status"] == "ok"
        assert run["summary"]["bench/seq_len"] == 64
        assert run["summary"]["bench/fwd_ms"] == pytest.approx(table.loc[(attention, 64),
                                                                         "fwd_ms"])


def test_document_lengths_are_seeded_positive_and_sum_to_n():
    lengths = bench.document_lengths(1000, 16, seed=3)
    assert len(lengths) == 16 and sum(lengths) == 1000 and min(lengths) >= 1
    assert lengths == bench.document_lengths(1000, 16, seed=3)
    assert lengths != bench.document_lengths(1000, 16, seed=4)
    assert bench.document_lengths(5, 5, seed=0) == [1] * 5


@pytest.mark.parametrize("attention", ["local", "hierarchical", "lsh"])
def test_packed_and_padded_points_hold_the_same_documents_and_are_checked(tmp_path, attention):
    small = {"local": ["attention.window=8"], "hierarchical": ["attention.block=8"],
             "lsh": ["attention.bucket_size=8", "attention.n_hashes=2"]}[attention]
    written = {layout: bench.run(config(tmp_path, f"attention={attention}", *small,
                                        f"layout={layout}", "docs=5", "seq_len=[97,128]",
                                        "kv_heads=1"))["rows"]
               for layout in ("packed", "padded")}
    for layout, batch in (("packed", 1), ("padded", 5)):
        for row in written[layout]:
            assert row["status"] == "ok", row["error"]
            assert (row["layout"], row["docs"], row["batch"]) == (layout, 5, batch)
            lengths = json.loads(row["doc_lens"])
            assert len(lengths) == 5 and sum(lengths) == row["seq_len"]
            assert row["check_error"] < 1e-5 and row["tokens_per_s"] > 0
    assert written["packed"][0]["check_against"] == {
        "local": "float64 dense pattern per document",
        "hierarchical": "float64 torch backend per document",
        "lsh": "float64 torch backend"}[attention]  # lsh: its random rotations, packed
    # Both layouts count the documents' own work: padding is not useful.
    attn = attn_zoo.build(attention, **{o.split("=")[0][10:]: int(o.split("=")[1])
                                         for o in small})
    for packed, padded in zip(written["packed"], written["padded"], strict=True):
        assert packed["doc_lens"] == padded["doc_lens"]
        flops = sum(attn.flops(n, 16, True) * 2 for n in json.loads(packed["doc_lens"]))
        for row in (packed, padded):
            assert row["fwd_tflops"] * row["fwd_ms"] * 1e9 == pytest.approx(flops)
    table = rows(tmp_path)
    assert table["layout"].tolist() == ["packed", "packed", "padded", "padded"]


@pytest.mark.parametrize("layout, ignored", [("packed", "document_ids"),
                                              ("padded", "key_padding_mask")])
def test_a_contender_that_ignores_the_documents_is_wrong(tmp_path, monkeypatch, layout,
                                                         ignored):
    def ignoring(forward, n):
        return lambda q, k, v, **masks: forward(q, k, v, **{key: value for key, value in
                                                            masks.items() if key != ignored})

    fake(monkeypatch, "ignoring", ignoring)
    (row,) = bench.run(config(tmp_path, "attention=local", "attention.window=8",
                              "contender=ignoring", f"layout={layout}", "docs=4",
                              "causal=false"))["rows"]  # causal: padding is never seen
    assert row["status"] == "wrong" and "fwd_ms" not in row


def test_only_the_library_runs_packed_and_padded_layouts(tmp_path):
    result = bench.run(config(tmp_path, "attention=full", "contender=sdpa", "layout=packed"))
    assert result["rows"] == [] and "not packed" in result["status"]


def test_plain_rows_written_before_the_layout_columns_stay_done(tmp_path):
    first = bench.run(config(tmp_path, "attention=full", "mode=fwd"))
    rows(tmp_path).drop(columns=["layout", "docs", "doc_lens"]).to_csv(
        tmp_path / "bench.csv", index=False)
    again = bench.run(config(tmp_path, "attention=full", "mode=fwd"))
    assert again["skipped"] and again["rows"][0]["timestamp"] == first["rows"][0]["timestamp"]
    assert again["rows"][0]["layout"] == "plain"


@pytest.mark.parametrize("attention", ["local", "hierarchical"])
def test_sinks_rows_are_checked_against_the_null_key_reference(tmp_path, monkeypatch, attention):
    """sinks=true builds the library's variant with a sink per query head; the check holds it
    to the reference with the null key (a module that drops its sink is wrong); the other
    contenders have no sinks."""
    small = {"local": "attention.window=8", "hierarchical": "attention.block=8"}[attention]
    (row,) = bench.run(config(tmp_path, f"attention={attention}", small, "sinks=true",
                              "seq_len=[64]"))["rows"]
    assert row["status"] == "ok" and row["sinks"] is True and row["check_error"] < 1e-5
    if attention == "local":  # hierarchical's reference is its own float64 torch backend
        monkeypatch.setattr(attn_zoo.attention, "with_sink", lambda out, lse, sink: out)
        (wrong,) = bench.run(config(tmp_path / "dropped", f"attention={attention}", small,
                                    "sinks=true", "seq_len=[64]"))["rows"]
        assert wrong["status"] == "wrong"
    assert bench.run(config(tmp_path, "contender=sdpa", "sinks=true"))["status"].startswith(
        "not applicable")
