"""The kernels compiled natively for real GPU targets (no GPU needed), and read in place.

`attn_zoo.kernels.compile_check` compiles what the launchers would launch on sm_80 / sm_90
with Triton's compiler and bundled ptxas; these tests run its CI subset and hold the kernels
to the spill goals, check that captured launches are the real ones, that every configuration
table entry is in the check's matrix, and that a (B, N, H, D) projection output viewed as
(B, H, N, D) reaches the kernels without a copy.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from attn_zoo.kernels import block_sparse, bucket, selection
from attn_zoo.kernels import compile_check as check
from attn_zoo.kernels.block_sparse import layout_attention, tile_config
from attn_zoo.kernels.bucket import lsh_attention
from attn_zoo.kernels.launch import (
    ARCH_FAMILIES,
    PRECISIONS,
    capture,
    padded_dim,
    precision,
    target_arch,
)
from attn_zoo.kernels.layout import build_layout

from experiments.bootstrap import COMPAT_DIR, ROOT
from experiments.measure import peak_memory


def test_capture_configures_for_the_arch_and_records_instead_of_running():
    q = torch.zeros(1, 1, 1, 40, 64, dtype=torch.bfloat16)
    k = v = torch.zeros(1, 1, 40, 64, dtype=torch.bfloat16)
    with capture(90) as launches:
        assert target_arch(torch.device("cpu")) == 90
        tiles = tile_config(q.dtype, 64, q.device)
        layout = build_layout(lambda i, j: j <= i, 40, 40, tiles.block_m, tiles.block_n)
        layout_attention(q, k, v, layout, scale=0.125)
    assert tiles == block_sparse.CONFIGS[90, "16bit"][64]
    # k and v flagged for inf or NaN, the forward kernel, its repair launch.
    assert [launch.kernel.fn.__name__ for launch in launches] == [
        "_bad_rows_kernel", "_bad_rows_kernel", "_forward_kernel", "_forward_kernel"]
    launch = launches[2]
    assert launch.args[0] is q and launch.kwargs["BLOCK_M"] == tiles.block_m
    assert launch.kwargs["num_warps"] == tiles.fwd_warps and not launch.kwargs["REPAIR"]
    assert launches[3].kwargs["REPAIR"]
    assert target_arch(torch.device("cpu")) is None  # the interpreter again, outside


def test_every_configuration_table_entry_is_in_the_check_matrix():
    covered = {(case.arch, check.KINDS[case.precision], padded_dim(case.head_dim))
               for case in check.cases("full", check.ARCHS)}
    for table in (block_sparse.CONFIGS, bucket.CONFIGS, selection.CONFIGS):
        assert set(table) == {(family, kind) for family in ARCH_FAMILIES for kind in PRECISIONS}
        entries = {(family, kind, dim) for (family, kind), dims in table.items() for dim in dims}
        assert entries == covered
    assert set(check.SHARED_LIMITS) == set(ARCH_FAMILIES) == set(check.ARCHS)


def _block_sparse_call(q, k, v, layout):
    out, lse = layout_attention(q, k, v, layout, scale=0.125)
    return torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out),
                                                       torch.ones_like(lse)))


def _lsh_call(q, k, v, order):
    out, lse = lsh_attention(q, k, v, order, 16, causal=True, scale=0.125)
    return torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out),
                                                       torch.ones_like(lse)))


@pytest.mark.parametrize("kernel", ["block_sparse", "lsh"])
def test_a_transposed_projection_output_is_read_in_place(kernel):
    batch, n, heads, dim = 2, 96, 4, 64
    projected = [torch.randn(batch, n, heads, dim, dtype=torch.bfloat16) for _ in range(3)]
    transposed = [x.transpose(1, 2).requires_grad_() for x in projected]  # (B, H, N, D) views
    contiguous = [x.detach().contiguous().requires_grad_() for x in transposed]
    if kernel == "block_sparse":
        with capture(90):
            tiles = tile_config(torch.bfloat16, dim, torch.device("cpu"))
        layout = build_layout(lambda i, j: (i - j).abs() <= 32, n, n, tiles.block_m,
                              tiles.block_n)

        def call(q, k, v):  # GQA: 2 query heads per kv head, as the library groups them
            return _block_sparse_call(q.view(batch, 2, 2, n, dim), k[:, :2], v[:, :2], layout)
    else:
        order = torch.arange(n).expand(2, batch, heads, n)

        def call(q, k, v):
            return _lsh_call(q, k, v[:, :2], order)

    with capture(90) as launches:
        allocated = {label: peak_memory(lambda xs=xs: call(*xs))
                     for label, xs in (("transposed", transposed), ("contiguous", contiguous))}
    # The launches read the projection's own memory with its strides: nothing was copied.
    first = next(launch for launch in launches if "bad_rows" not in launch.kernel.fn.__name__)
    assert first.args[0].data_ptr() == projected[0].data_ptr()
    assert first.args[0].stride() != first.args[0].contiguous().stride()
    assert allocated["transposed"] == allocated["contiguous"]


def native_check(out, archs, python_path=()):
    """Run the CI subset in a process of its own, without TRITON_INTERPRET (kernels defined
    under the interpreter cannot be compiled), and read its rows back."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, python_path), str(ROOT)])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "attn_zoo.kernels.compile_check", "--subset",
                           "ci", "--archs", *map(str, archs), "--out", str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(out / "compile_check.csv") as rows:
        return [{key: int(value) if value.isdigit() else value for key, value in row.items()}
                for row in csv.DictReader(rows)]


def test_the_check_reports_what_the_compiler_rejects():
    # A bucket block of 8 breaks the kernels' static assertion (blocks of at least 16).
    script = """
from attn_zoo.kernels import bucket, compile_check as check
bucket.CONFIGS[90, "16bit"][64] = bucket.BucketConfig(8, 4, 2)
case = check.Case(90, "routing", "bf16", 64, "plain", group=8)
row = check.compile_launch(check.capture_case(case)[0], case)
print(row.status, "|", row.error)
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, cwd=ROOT, check=True)
    status, error = done.stdout.strip().splitlines()[-1].split(" | ", 1)
    assert status == "error" and "BLOCK_M >= 16" in error


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    return native_check(tmp_path_factory.mktemp("compile"), (90, 80))


def test_the_check_refuses_interpreted_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        check.run("ci", (90,))


def test_every_ci_configuration_compiles_natively_within_shared_memory(ci_rows):
    assert {row["arch"] for row in ci_rows} == {80, 90}
    kernels = {row["kernel"] for row in ci_rows}
    assert kernels == {"forward_kernel", "delta_kernel", "grad_kv_kernel", "grad_q_kernel",
                       "bad_rows_kernel", "bucket_fwd_kernel", "bucket_bwd_dq_kernel",
                       "bucket_bwd_dkdv_kernel", "selection_fwd_kernel",
                       "selection_bwd_kernel"}
    assert {row["precision"] for row in ci_rows} == {"ieee", "bf16", "fp16"}
    assert {row["status"] for row in ci_rows} == {"ok"}
    assert all(row["shared_bytes"] <= row["shared_limit"] for row in ci_rows)
    assert all(isinstance(row["registers"], int) and isinstance(row["spill_stores"], int)
               for row in ci_rows)


def test_no_register_spills_on_sm90_plain_and_few_with_padding(ci_rows):
    sm90 = [row for row in ci_rows if row["arch"] == 90]
    assert {row["flags"].split()[-1] for row in sm90} == {"plain", "pad"}
    for row in sm90:
        goal = check.SPILL_GOAL["plain" if row["flags"].endswith("plain") else "flags"]
        assert row["spill_stores"] <= goal, row


def test_no_register_spills_on_sm80_up_to_head_dim_64(ci_rows):
    sm80 = [row for row in ci_rows if row["arch"] == 80 and row["head_dim"] <= 64]
    assert sm80 and [row for row in sm80 if row["spill_stores"]] == []


@pytest.mark.skipif(not COMPAT_DIR.is_dir(), reason="Triton 3.6 is installed for this check by "
                    "`python3 -m experiments.bootstrap test`")
def test_the_kernels_compile_with_triton_3_6_as_on_the_gpu_machines(tmp_path):
    rows = native_check(tmp_path, (90,), python_path=(COMPAT_DIR,))
    assert "Triton 3.6" in (tmp_path / "compile_check.md").read_text()
    assert len({row["kernel"] for row in rows}) == 10 and {row["status"] for row in rows} == {"ok"}


def test_float32_runs_in_ieee_precision_unless_tf32_is_allowed():
    assert precision(torch.float32) == "ieee"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert precision(torch.float32) == "tf32"
        assert precision(torch.bfloat16) == "16bit"
        with capture(90):
            assert tile_config(torch.float32, 64, torch.device("cpu")) == \
                block_sparse.CONFIGS[90, "tf32"][64]
    finally:
        torch.set_float32_matmul_precision(previous)


def test_tuning_takes_the_first_option_without_spills(monkeypatch):
    # Spills as a function of the candidate only: the forward spills unless it runs 8 warps,
    # the backward unless 2 stages; each kernel takes the first such option in order, the
    # first keys per step keep them all.
    table = selection.CONFIGS[90, "16bit"]
    monkeypatch.setitem(table, 64, table[64])

    def spills(case, kernel, apply):
        apply()
        config = table[64]
        return 0.0 if (config.fwd_warps == 8 if kernel == "fwd" else config.bwd_stages == 2) \
            else 16.0

    monkeypatch.setattr(check, "_try", spills)
    config, total = check.tune_selection(90, "16bit", 64)
    assert total == 0
    assert config == selection.SelectionConfig(64, 8, 2, 4, 2)
    # Nothing meets the goal: the fewest spill bytes per kernel, summed.
    monkeypatch.setattr(check, "_try", lambda case, kernel, apply: 8.0)
    config, total = check.tune_selection(90, "16bit", 64)
    assert total == 2 * 2 * 8.0  # fwd and bwd, each over units 64 and 1
    assert config == selection.SelectionConfig(64, 4, 2, 4, 1)
