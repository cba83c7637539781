"""Every registered attention variant, default parameters, at a few sequence lengths.

    python -m experiments.demo
    python -m experiments.demo --lengths 256 1024 --heads 4 --device cuda

Prints, per variant and length: forward and forward+backward milliseconds (medians after
warm-up), forward peak memory growth in MiB and useful GFLOP/s (the variant's own `flops`;
forward+backward counts 3.5 forwards), beside the device's measured matmul peak. A point that
fails is a row with its error, and the demo goes on.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

import attn_zoo
from attn_zoo.registry import get
from experiments.measure import (
    MIB,
    attention_inputs,
    matmul_peak,
    measure_attention,
    text_table,
    useful_flops,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=attn_zoo.available(),
                        choices=attn_zoo.available(), help="default: every registered one")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                        help="causal attention (causal-only variants always are)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds per measurement: slow points are timed fewer times")
    return parser.parse_args(argv)


def measure_point(name: str, n: int, inputs, args: argparse.Namespace) -> dict:
    """One row: the costs of variant `name` at length n, or its error."""
    row: dict = {"variant": name, "N": n}
    try:
        attn = attn_zoo.build(name).to(args.device)
        causal = args.causal or get(name).causal_only
        # Variants that draw randomness (LSH rotations) repeat themselves run to run.
        torch.manual_seed(0)
        cost = measure_attention(
            lambda q, k, v: attn(q, k, v, causal=causal), *inputs,
            warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
        )
    except Exception as error:  # a failing point becomes a row; the demo goes on
        return row | {"status": f"{type(error).__name__}: {error}"}
    flops = {backward: useful_flops(attn, n, args.head_dim, causal, batch=args.batch,
                                    heads=args.heads, backward=backward)
             for backward in (False, True)}
    return row | {
        "causal": causal,
        "fwd_ms": cost.fwd_s * 1e3,
        "fwd_bwd_ms": cost.fwd_bwd_s * 1e3,
        "fwd_peak_mib": cost.fwd_peak_bytes / MIB,
        "fwd_gflops": flops[False] / cost.fwd_s / 1e9,
        "fwd_bwd_gflops": flops[True] / cost.fwd_bwd_s / 1e9,
        "status": "ok",
    }


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Measure every requested variant at every length; print rows as they come."""
    rows = []
    for n in args.lengths:
        inputs = attention_inputs(args.batch, args.heads, n, args.head_dim,
                                  dtype=DTYPES[args.dtype], device=args.device)
        for name in args.variants:
            rows.append(measure_point(name, n, inputs, args))
            print(f"  {name:>16} N={n:<7} {rows[-1]['status']}", flush=True)
    columns = ["variant", "N", "causal", "fwd_ms", "fwd_bwd_ms", "fwd_peak_mib", "fwd_gflops",
               "fwd_bwd_gflops", "status"]
    return pd.DataFrame(rows).reindex(columns=columns)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    peak = matmul_peak(args.device, dtype=DTYPES[args.dtype])
    print(f"attn_zoo demo on {args.device} ({torch.get_num_threads()} threads, torch "
          f"{torch.__version__}), {args.dtype}, B={args.batch} H={args.heads} "
          f"D={args.head_dim}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    table = run(args).sort_values(["variant", "N"], kind="stable")
    print()
    print(text_table(table))


if __name__ == "__main__":
    main()
