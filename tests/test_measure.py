"""The measuring primitives of experiments/measure.py measure what they claim."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch

import attn_zoo
from experiments import measure

MIB = 1 << 20


def allocate(mib: int):
    """A callable that allocates (and returns) a float32 tensor of `mib` MiB."""
    return lambda: torch.empty(mib * MIB // 4)


def test_cpu_peak_memory_tells_sizes_apart():
    small = measure.peak_memory(allocate(4))
    large = measure.peak_memory(allocate(16))
    assert small >= 4 * MIB
    assert large / small == pytest.approx(4, rel=0.02)


def test_cpu_peak_memory_ignores_memory_live_before_the_call():
    earlier = torch.ones(64 * MIB // 4)
    measure.peak_memory(allocate(32))  # an earlier, larger measurement
    assert measure.peak_memory(allocate(4)) == pytest.approx(4 * MIB, rel=0.02)
    del earlier


def test_cpu_peak_memory_counts_freed_temporaries():
    def temporary_then_result():
        scratch = torch.ones(16 * MIB // 4)
        result = torch.empty(4 * MIB // 4)
        del scratch
        return result

    assert measure.peak_memory(temporary_then_result) == pytest.approx(20 * MIB, rel=0.02)


def test_cpu_peak_memory_of_freeing_is_zero():
    earlier = [torch.ones(4 * MIB // 4)]
    assert measure.peak_memory(lambda: earlier.clear()) == 0


def test_median_time_runs_warmup_then_repeats():
    calls = []
    seconds = measure.median_time(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and seconds >= 0


def test_median_time_budget_cuts_repeats_of_slow_calls():
    calls = []

    def slow():
        calls.append(1)
        busy_until = time.perf_counter() + 0.02
        while time.perf_counter() < busy_until:
            pass

    seconds = measure.median_time(slow, warmup=1, repeats=50, budget_s=0.05)
    assert 2 <= len(calls) <= 4 and seconds >= 0.02


def test_median_time_rejects_budget_without_warmup():
    with pytest.raises(ValueError, match="warmup"):
        measure.median_time(lambda: None, warmup=0, budget_s=1.0)


def test_useful_flops_uses_the_library_formula_and_the_backward_factor():
    full = attn_zoo.build("full")
    forward = measure.useful_flops(full, 128, 64, True, batch=2, heads=3)
    assert forward == full.flops(128, 64, True) * 6 == 4 * 64 * (128 * 129 // 2) * 6
    both = measure.useful_flops(full, 128, 64, True, batch=2, heads=3, backward=True)
    assert both == 3.5 * forward


def test_matmul_peak_is_positive():
    assert measure.matmul_peak("cpu", size=128, repeats=2) > 0


def test_tables_and_atomic_write(tmp_path):
    frame = pd.DataFrame({"impl": ["a", "b"], "ms": [1234.56, float("nan")], "n": [1, 2]})
    assert "n/a" in measure.text_table(frame)
    assert measure.markdown_table(frame).splitlines()[2] == "| a | 1235 | 1 |"
    assert measure.format_number(0.012345) == "0.0123"
    target = tmp_path / "sub" / "table.md"
    measure.write_atomic(target, "one")
    measure.write_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]
