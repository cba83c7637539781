"""Running a function on every rank of a gloo process group spawned on this machine."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60
"""A collective waiting longer than this fails the test instead of hanging it."""


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """fn(*args) on each of `world` spawned processes in one gloo group (one torch thread
    each); returns their results in rank order (torch.save-able), or raises the first
    rank's error."""
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
