"""Context parallelism measured: the bytes each scheme moves, and gloo wall-clock on one host.

    python -m experiments.parallel traffic                       # -> results/parallel/
    python -m experiments.parallel time --attention local full   # -> results/cpu/parallel/

`traffic`: for every registered variant (default parameters, causal, B = 1, H = 8 query and
kv heads, head_dim 64, float32), every length and world size: the bytes one rank sends and
receives in one attention call (one layer), forward and forward + backward, from
`attn_zoo.parallel.planned_traffic` (the tests check it equals what the collectives record),
by the variant's own scheme, beside what ring attention and the all-to-all over heads would
move for the same call. Shards are equal (the last one shorter). Rows go to `traffic.csv`,
the tables to `traffic.md`.

`time`: forward + backward of one call on `world` gloo ranks spawned on this machine (one
torch thread each) against one process, per variant; the median of `--repeats` after a
warm-up, the slowest rank's time. On a small CPU the ranks share cores: a correctness-and-
overhead figure, not a speed-up. Rows go to `timing.csv` (with the environment).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attn_zoo
from attn_zoo.parallel import CallShape, planned_traffic
from attn_zoo.registry import get
from experiments.measure import markdown_table, write_atomic
from experiments.results import (
    ENVIRONMENT_COLUMNS,
    STATUS_COLUMNS,
    Table,
    environment,
    error_row,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
"""A collective waiting longer than this fails the run (or test) instead of hanging it."""
MIB = 1 << 20
SCHEMES = ("own", "ring", "heads")
"""The columns of the traffic table: the variant's scheme, and the two general ones."""


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """fn(*args) on each of `world` processes spawned in one gloo group on this machine (one
    torch thread each); returns their results in rank order (torch.save-able), or raises the
    first rank's error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, port, folder, fn, args), nprocs=world)
        return [torch.load(os.path.join(folder, f"{rank}.pt"), weights_only=False)
                for rank in range(world)]


def _rank_main(rank: int, world: int, port: int, folder: str, fn: Callable[..., Any],
               args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.save(fn(*args), os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- traffic --------------------------------------------------------------------------------

TRAFFIC_COLUMNS = {"attention": str, "scheme": str, "seq_len": int, "world": int,
                   "forward_mib": float, "train_mib": float} | STATUS_COLUMNS


def even_bounds(n: int, world: int) -> tuple[int, ...]:
    """Shards of ceil(n / world) positions, the last one shorter."""
    size = -(-n // world)
    return tuple(min(n, rank * size) for rank in range(world + 1))


def traffic_rows(names: Sequence[str], lengths: Sequence[int], worlds: Sequence[int],
                 shape: CallShape) -> list[dict[str, Any]]:
    """One row per (variant, scheme, length, world): the most any rank sends + receives, in
    MiB, forward and forward + backward (`train_mib`); a plan that fails is a row with its
    status and error."""
    rows = []
    for name in names:
        attn = attn_zoo.build(name)
        for n in lengths:
            for world in worlds:
                for scheme in SCHEMES:
                    row = {"attention": name, "scheme": attn.parallel if scheme == "own"
                           else scheme, "seq_len": n, "world": world}
                    if scheme != "own" and scheme == attn.parallel:
                        continue
                    try:
                        plan = planned_traffic(attn, even_bounds(n, world), True, shape,
                                               None if scheme == "own" else scheme)
                    except (ValueError, MemoryError) as error:
                        rows.append(row | error_row(error))
                        continue
                    forward = max(t.forward_sent + t.forward_received for t in plan)
                    train = max(sum(t) for t in plan)
                    rows.append(row | {"forward_mib": forward / MIB, "train_mib": train / MIB,
                                       "status": "ok", "error": ""})
    return rows


def traffic_markdown(rows: pd.DataFrame) -> str:
    """Per world size, a table of each variant's forward MiB per rank by length: its own
    scheme, and ring attention's for the same call."""
    ok = rows[rows.status == "ok"]
    parts = []
    for world, at_world in ok.groupby("world"):
        own = at_world[at_world.scheme == at_world.attention.map(lambda name: get(name).parallel)]
        ring = at_world[at_world.scheme == "ring"].set_index(["attention", "seq_len"])
        table = {}
        for row in own.itertuples():
            key = (row.attention, row.seq_len)
            line = table.setdefault(row.attention, {"variant": row.attention,
                                                    "scheme": row.scheme})
            ring_mib = ring.forward_mib.get(key, row.forward_mib)
            line[f"N={row.seq_len}"] = f"{row.forward_mib:.3g} ({ring_mib:.3g})"
        parts += [f"### {world} ranks: forward MiB per rank, own scheme (ring)\n",
                  markdown_table(pd.DataFrame(list(table.values())))]
    return "\n".join(parts)


# -- wall-clock -----------------------------------------------------------------------------

TIMING_COLUMNS = {"attention": str, "seq_len": int, "world": int, "train_s": float,
                  "repeats": int} | STATUS_COLUMNS | ENVIRONMENT_COLUMNS


def _time_rank(name: str, n: int, repeats: int) -> float:
    """The median forward + backward seconds of this rank's shard of one causal call."""
    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = even_bounds(n, world)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=generator) for _ in range(3))
    attn = attn_zoo.build(name)
    shard = [x[:, :, bounds[rank]:bounds[rank + 1]].clone().requires_grad_() for x in (q, k, v)]
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        attn_zoo.context_parallel(attn, *shard, causal=True).sum().backward()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def timing_row(name: str, n: int, world: int, repeats: int) -> dict[str, Any]:
    """One point: the slowest rank's median seconds, or the failure, with the environment
    (the ranks' one torch thread)."""
    row = {"attention": name, "seq_len": n, "world": world, "repeats": repeats}
    row |= environment(torch.device("cpu")) | {"threads": 1}
    try:
        seconds = max(run_ranks(world, _time_rank, name, n, repeats))
    except Exception as error:  # a failing point is a row; the others still run
        return row | error_row(error)
    return row | {"train_s": seconds, "status": "ok", "error": ""}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    traffic = commands.add_parser("traffic", help="bytes per rank per call, by scheme")
    traffic.add_argument("--attention", nargs="+", default=attn_zoo.available())
    traffic.add_argument("--seq-len", nargs="+", type=int,
                         default=[1 << 14, 1 << 16, 1 << 18, 1 << 20])
    traffic.add_argument("--worlds", nargs="+", type=int, default=[2, 4, 8])
    traffic.add_argument("--out", default=str(ROOT / "results" / "parallel"))
    timing = commands.add_parser("time", help="gloo wall-clock against one process")
    timing.add_argument("--attention", nargs="+", default=["local", "full"])
    timing.add_argument("--seq-len", type=int, default=1 << 14)
    timing.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    timing.add_argument("--repeats", type=int, default=3)
    timing.add_argument("--out", default=str(ROOT / "results" / "cpu" / "parallel"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "traffic":
        rows = traffic_rows(args.attention, args.seq_len, args.worlds,
                            CallShape(batch=1, q_heads=8, kv_heads=8, head_dim=64, itemsize=4))
        table = Table(out / "traffic.csv", TRAFFIC_COLUMNS,
                      key=("attention", "scheme", "seq_len", "world"))
        table.append(rows)
        write_atomic(out / "traffic.md", traffic_markdown(table.latest()))
        print(traffic_markdown(table.latest()))
    else:
        table = Table(out / "timing.csv", TIMING_COLUMNS, key=("attention", "seq_len", "world"))
        for name in args.attention:
            for world in args.worlds:
                row = timing_row(name, args.seq_len, world, args.repeats)
                table.append([row])
                print(" ".join(f"{key}={row.get(key)}" for key in list(TIMING_COLUMNS)[:7]),
                      flush=True)


if __name__ == "__main__":
    main()
