"""`python -m experiments.parallel`: the traffic table and the gloo wall-clock rows."""

from __future__ import annotations

import pandas as pd

from attn_zoo.parallel import CallShape, planned_traffic
from experiments import parallel
from experiments.results import Table

SHAPE = CallShape(batch=1, q_heads=8, kv_heads=8, head_dim=64, itemsize=4)


def test_even_bounds_leave_the_last_shard_shorter():
    assert parallel.even_bounds(10, 4) == (0, 3, 6, 9, 10)
    assert parallel.even_bounds(8, 2) == (0, 4, 8)


def test_traffic_rows_show_each_scheme_beside_the_ring():
    rows = pd.DataFrame(parallel.traffic_rows(["local", "full", "moba"], [4096], [4], SHAPE))
    by = rows.set_index(["attention", "scheme"])
    # local's own scheme is the gather, a halo: far below what a ring moves for the same call
    halo, ring = by.loc[("local", "gather")], by.loc[("local", "ring")]
    assert halo.forward_mib < ring.forward_mib / 10
    plan = planned_traffic(parallel.attn_zoo.build("local"), (0, 1024, 2048, 3072, 4096), True,
                           SHAPE)
    assert halo.forward_mib == max(t.forward_sent + t.forward_received for t in plan) / (1 << 20)
    assert ("full", "ring") in by.index and ("full", "heads") in by.index
    assert ("moba", "heads") in by.index and ("moba", "ring") in by.index
    markdown = parallel.traffic_markdown(rows)
    assert "### 4 ranks" in markdown and "| local | gather |" in markdown


def test_a_scheme_that_cannot_run_is_a_row():
    rows = parallel.traffic_rows(["moba"], [96], [3],
                                 CallShape(batch=1, q_heads=4, kv_heads=4, head_dim=8,
                                           itemsize=4))
    heads = next(row for row in rows if row["scheme"] == "heads")
    assert heads["status"] == "unsupported" and "world size" in heads["error"]
    assert next(row for row in rows if row["scheme"] == "ring")["status"] == "ok"


def test_timing_points_are_rows_and_failures_too(tmp_path):
    parallel.main(["time", "--attention", "local", "nonexistent", "--seq-len", "64",
                   "--worlds", "2", "--repeats", "1", "--out", str(tmp_path)])
    rows = Table(tmp_path / "timing.csv", parallel.TIMING_COLUMNS,
                 key=("attention", "seq_len", "world")).read().set_index("attention")
    assert rows.loc["local", "status"] == "ok" and rows.loc["local", "train_s"] > 0
    assert rows.loc["local", "threads"] == 1 and rows.loc["local", "world"] == 2
    assert rows.loc["nonexistent", "status"] != "ok"
