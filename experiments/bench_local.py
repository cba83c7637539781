"""Sliding-window attention on CPU: attn_zoo `local` beside SDPA, FlexAttention, local-attention.

    python -m experiments.bench_local
    python -m experiments.bench_local --lengths 1024 4096 --repeats 3 --out /tmp/local_bench

float32, B=1, H=8, D=64, causal, window=256 (query i sees keys i - 256 .. i). Implementations:

* `attn_zoo.local`: the library's `local` variant.
* `sdpa.full`: torch's fused causal `scaled_dot_product_attention` over every key (more work:
  the dense baseline).
* `flex.compiled`: `torch.compile(flex_attention)` with a block mask built by
  `create_block_mask` from the library's own `local` pattern. The mask is built once per length
  outside the timed call, as a model shares it across layers; compilation happens in the
  warm-up. FlexAttention has no CPU backward, so its forward+backward is unavailable.
* `local-attention`: the public package (`pip install local-attention`, the `bench` extra) with
  `window_size=256, causal=True, look_backward=1, exact_windowsize=True`: the same pattern.

Before timing, every implementation's output and gradients are checked against attn_zoo
`local` at a small length, so that all of them do the same work. At each length the
implementations are timed in alternating rounds (medians), so that drifting machine load
hits them alike. Useful GFLOP/s use one count
for all: attn_zoo `local.flops` (forward+backward = 3.5 forwards). Peak memory is the growth
of the forward (under `no_grad`, output included) measured by the profiler's allocation events.
Writes `local_bench.csv`, `ratios.csv` and `local_bench.md` under --out, atomically.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attn_zoo
from experiments.measure import (
    FWD_BWD_FACTOR,
    MIB,
    attention_inputs,
    interleaved_median_times,
    matmul_peak,
    peak_memory,
    print_tables,
    useful_flops,
    write_tables,
)

try:
    from local_attention import LocalAttention as PackageLocalAttention
except ImportError:
    PackageLocalAttention = None

BATCH, HEADS, HEAD_DIM, WINDOW = 1, 8, 64, 256
GOAL_N = 16384
DEVICE = "cpu"

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Impl:
    """One implementation. `build(n)` returns its forward for length n (setup not timed).

    check_n: the length at which its output must equal attn_zoo local's; no_backward / missing:
    why it has no backward, or cannot run at all (None when it can).
    """

    name: str
    build: Callable[[int], Forward]
    check_n: int
    no_backward: str | None = None
    missing: str | None = None


def implementations(local: attn_zoo.Attention) -> list[Impl]:
    awkward_n = 2 * WINDOW + 77  # a partial last window, beyond the first two windows
    compiled_flex = torch.compile(flex_attention)

    def flex(n: int) -> Forward:
        allowed = local.pattern(n, True)
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: allowed(q_idx, kv_idx),
                                 None, None, n, n, device=DEVICE)
        return lambda q, k, v: compiled_flex(q, k, v, block_mask=mask)

    def package(n: int) -> Forward:
        return PackageLocalAttention(window_size=WINDOW, causal=True, look_backward=1,
                                     exact_windowsize=True, autopad=True)

    return [
        Impl("attn_zoo.local", lambda n: lambda q, k, v: local(q, k, v, causal=True), awkward_n),
        # Dense causal attention equals the window only while every key is in it.
        Impl("sdpa.full", lambda n: lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True), WINDOW + 1),
        Impl("flex.compiled", flex, awkward_n,
             no_backward="FlexAttention has no CPU backward"),
        Impl("local-attention", package, awkward_n,
             missing=None if PackageLocalAttention is not None
             else "not installed (pip install local-attention)"),
    ]


def check_equal_work(local: attn_zoo.Attention, impls: list[Impl]) -> None:
    """Assert every runnable implementation matches attn_zoo local: output and gradients."""
    for impl in impls:
        if impl.missing:
            continue
        with_grad = impl.no_backward is None
        inputs = attention_inputs(BATCH, HEADS, impl.check_n, HEAD_DIM, seed=1)
        ours = [x.clone().requires_grad_() for x in inputs]
        theirs = [x.clone().requires_grad_(with_grad) for x in inputs]
        expected = local(*ours, causal=True)
        with torch.set_grad_enabled(with_grad):
            got = impl.build(impl.check_n)(*theirs)
        pairs = {"output": (got, expected)}
        if with_grad:
            grad_out = torch.randn_like(expected)
            grads = zip(torch.autograd.grad(got, theirs, grad_out),
                        torch.autograd.grad(expected, ours, grad_out), strict=True)
            pairs |= {f"d{label}": pair for label, pair in zip("qkv", grads, strict=True)}
        for what, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, w=f"{impl.name} {what}": f"{w}: {m}")
        print(f"  {impl.name:>16} matches attn_zoo.local at N={impl.check_n} "
              f"({', '.join(pairs)})", flush=True)


def measure_length(impls: list[Impl], n: int, local: attn_zoo.Attention, args) -> list[dict]:
    """Rows for every implementation at length n: forward peak memory, then forward and
    forward+backward times measured in alternating rounds across the implementations."""
    q, k, v = attention_inputs(BATCH, HEADS, n, HEAD_DIM)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn_like(q)
    status: dict[str, str] = {}
    peaks: dict[str, int] = {}
    timed: dict[tuple[str, str], Callable[[], object]] = {}
    for impl in impls:
        if impl.missing:
            status[impl.name] = impl.missing
            continue
        forward = impl.build(n)

        def infer(forward=forward) -> Tensor:
            with torch.no_grad():
                return forward(q, k, v)

        def train_step(forward=forward) -> None:
            # autograd.grad, not .backward(): gradients must not accumulate across runs.
            torch.autograd.grad(forward(*inputs), inputs, grad_out)

        try:
            infer()  # compiles (flex) outside any timing or memory measurement
            peaks[impl.name] = peak_memory(infer)
        except Exception as error:  # a failing point becomes a row; the bench goes on
            status[impl.name] = f"{type(error).__name__}: {error}"
            continue
        timed[(impl.name, "fwd")] = infer
        if impl.no_backward is None:
            timed[(impl.name, "fwd_bwd")] = train_step
        status[impl.name] = (f"ok; fwd_bwd unavailable: {impl.no_backward}" if impl.no_backward
                             else "ok")
    seconds = interleaved_median_times(timed, repeats=args.repeats, budget_s=args.budget)
    flops = {mode: useful_flops(local, n, HEAD_DIM, True, batch=BATCH, heads=HEADS,
                                backward=mode == "fwd_bwd") for mode in ("fwd", "fwd_bwd")}
    rows = []
    for impl in impls:
        row: dict = {"impl": impl.name, "N": n, "status": status[impl.name]}
        if impl.name in peaks:
            row["fwd_peak_mib"] = peaks[impl.name] / MIB
        for mode in ("fwd", "fwd_bwd"):
            if (impl.name, mode) in seconds:
                row[f"{mode}_ms"] = seconds[(impl.name, mode)] * 1e3
                row[f"{mode}_gflops"] = flops[mode] / seconds[(impl.name, mode)] / 1e9
        rows.append(row)
    return rows


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per length, the ratios the goals are stated in (>1 speedups mean attn_zoo is faster)."""
    by = table.set_index(["impl", "N"])

    def get(impl: str, column: str, n: int) -> float:
        return by[column].get((impl, n), float("nan"))

    rows = []
    for n in sorted(table["N"].unique()):
        output_mib = BATCH * HEADS * n * HEAD_DIM * 4 / MIB
        rows.append({
            "N": n,
            "local_fwd_speedup_vs_flex": get("flex.compiled", "fwd_ms", n)
            / get("attn_zoo.local", "fwd_ms", n),
            "local_fwd_bwd_speedup_vs_local_attention": get("local-attention", "fwd_bwd_ms", n)
            / get("attn_zoo.local", "fwd_bwd_ms", n),
            "local_fwd_peak_over_output": get("attn_zoo.local", "fwd_peak_mib", n) / output_mib,
            "local_fwd_peak_vs_quarter_N": get("attn_zoo.local", "fwd_peak_mib", n)
            / get("attn_zoo.local", "fwd_peak_mib", n // 4) if n % 4 == 0 else float("nan"),
        })
    return pd.DataFrame(rows)


def goals(ratio_table: pd.DataFrame) -> pd.DataFrame:
    """The goals at N = GOAL_N: measured value, target, met."""
    at = ratio_table.set_index("N")
    checks = [
        ("local fwd at least as fast as FlexAttention", "local_fwd_speedup_vs_flex", ">=", 1.0),
        ("local fwd+bwd >= 2x faster than local-attention",
         "local_fwd_bwd_speedup_vs_local_attention", ">=", 2.0),
        ("local fwd peak growth <= 3x output", "local_fwd_peak_over_output", "<=", 3.0),
        # Linear memory: 4x the length, about 4x the memory (quadratic would be 16x).
        ("local memory linear in N: peak(N)/peak(N/4) <= 5", "local_fwd_peak_vs_quarter_N",
         "<=", 5.0),
    ]
    rows = []
    for goal, column, op, target in checks:
        value = at[column].get(GOAL_N, float("nan"))
        met = value >= target if op == ">=" else value <= target
        rows.append({"goal": goal, "measured": value, "target": f"{op} {target:g}",
                     "met": "n/a" if pd.isna(value) else ("yes" if met else "NO")})
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int,
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per measurement: slow points are timed fewer times")
    parser.add_argument("--out", type=Path, default=Path("results/cpu/local_bench"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Check, measure every implementation at every length, write the tables; return them."""
    setting = environment()
    print(setting, flush=True)
    local = attn_zoo.build("local", window=WINDOW)
    impls = implementations(local)
    check_equal_work(local, impls)
    rows = []
    for n in args.lengths:
        rows += measure_length(impls, n, local, args)
        for row in rows[-len(impls):]:
            print(f"  {row['impl']:>16} N={n:<6} {row['status']}", flush=True)
    columns = ["impl", "N", "fwd_ms", "fwd_bwd_ms", "fwd_gflops", "fwd_bwd_gflops",
               "fwd_peak_mib", "status"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    ratio_table = ratios(table)
    tables = {"local_bench": table, "ratios": ratio_table, "goals": goals(ratio_table)}
    write(args.out, tables, setting)
    return tables


def environment() -> str:
    """The machine, its load when the bench starts (other work skews CPU timings) and its
    measured matmul peak."""
    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at start), {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}; float32 matmul peak "
            f"{matmul_peak(DEVICE) / 1e9:.1f} GFLOP/s (measured)")


def write(out: Path, tables: dict[str, pd.DataFrame], setting: str) -> None:
    header = (f"# attn_zoo local vs SDPA, FlexAttention, local-attention (CPU)\n\n"
              f"float32, B={BATCH}, H={HEADS}, D={HEAD_DIM}, causal, window={WINDOW}. "
              f"{setting}.\nUseful FLOPs: attn_zoo `local.flops` for every row; "
              f"fwd+bwd counts {FWD_BWD_FACTOR} forwards. "
              "Peak: forward memory growth, output included.\n")
    titles = {"local_bench": "Time, throughput, memory", "ratios": "Ratios",
              "goals": f"Goals at N={GOAL_N}"}
    write_tables(out, "local_bench", header,
                 {key: (title, tables[key]) for key, title in titles.items()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_tables(run(args), args.out)


if __name__ == "__main__":
    main()
