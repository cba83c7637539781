"""Every registered variant on CPU, with Reformer, Longformer and BigBird peers in the same run.

    python -m experiments.bench_variants
    python -m experiments.bench_variants --lengths 1024 4096 --variants lsh longformer --no-peers

float32, B=1, H=8, D=64, each variant at its defaults and causal (every variant supports causal
attention; `causal_only` ones could not run otherwise). Peers (the `bench` extra), each timed
beside an attn_zoo partner with the same parameters, projections excluded:

* `reformer.lsh` vs `attn_zoo.lsh` (causal): reformer-pytorch `LSHAttention(bucket_size=64,
  n_hashes=4, causal=True)` called on the shared QK `q` and `v` reshaped to (B*H, N, D), as
  `lsh` reads `q` as the shared QK; its output is viewed back to (B, H, N, D). Both attend within
  a bucket chunk and the previous one per round, without de-duplication; rotations are random
  on every call in both.
* `hf.longformer` vs `attn_zoo.longformer` (bidirectional, window=256): transformers'
  `LongformerSelfAttention` built from a `LongformerConfig(attention_window=[512])` with random
  weights. Timed: what its forward does between the projections when nothing is padded or
  global (the model passes an all-zero additive mask and `is_index_masked` all False, built
  once per length outside the timing as the model does for all layers): `q / sqrt(D)`,
  `_sliding_chunks_query_key_matmul(q, k, 256)`, the same call on the mask that it adds to the
  scores, float32 softmax, `masked_fill` of masked rows, dropout (p=0),
  `_sliding_chunks_matmul_attn_probs_value(probs, v, 256)`. Its (B, N, H, D) layout is a
  transposed view of our inputs and output, so neither side pays for a head reshape.
* `hf.bigbird` vs `attn_zoo.bigbird` (bidirectional, defaults): transformers'
  `BigBirdBlockSparseAttention.bigbird_block_sparse_attention` (block 64, 3 window blocks) on
  q, k, v, with the block masks of an unpadded batch built once per length outside the timing.
  HF always has two global blocks (first and last); `num_random_blocks=1` makes a middle query
  visit 6 blocks as ours does (3 window + 1 global + 2 random). It runs as shipped: in eval mode
  under `no_grad` (its random blocks are then all block 0) and in training mode for
  forward+backward (random blocks drawn with numpy on every call). Version 5 of transformers
  builds the dense (B, H, N, N) attention-probability tensor on every call, with no flag to
  skip it: `hf.bigbird.no_dense` is the same call with that one `torch.zeros` allocation
  redirected to the meta device, so the tensor and its slice and scatter writes carry no data
  (HF's code is not copied or edited); forward only, since meta tensors cannot enter autograd.
  Points whose dense tensor would not fit in available memory are skipped, not attempted.

Equal-work checks before timing: `hf.longformer` output and gradients equal attn_zoo
`longformer`'s at N=1024, and `hf.bigbird.no_dense` output equals `hf.bigbird`'s. LSH and
BigBird draw their random choices differently, so those pairs are compared at equal work size,
not equal outputs: shapes and finiteness are checked, and both sides visit the same number of
keys per query (BigBird: per middle query; HF's second global row block adds 64 keys per query
on average at N=16384).

At each length, all implementations are timed in alternating rounds (medians); a point that
fails, or whose single call exceeds `--budget` seconds, becomes a row with its status (and
longer lengths of that measurement are skipped); the run goes on. Useful GFLOP/s: each variant's
`flops`; a peer counts its partner's (forward+backward = 3.5 forwards). Peak memory is the growth
of the forward under `no_grad`, output included, from the profiler's allocation events.
Writes `variants_bench.csv`, `ratios.csv`, `goals.csv` and `variants_bench.md` under --out,
atomically.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pandas as pd
import torch
from torch import Tensor

import attn_zoo
from experiments.bench_local import environment
from experiments.measure import (
    FWD_BWD_FACTOR,
    MIB,
    attention_inputs,
    interleaved_median_times,
    peak_memory,
    print_tables,
    useful_flops,
    write_tables,
)

try:
    from reformer_pytorch import LSHAttention
except ImportError:
    LSHAttention = None
try:
    from transformers import BigBirdConfig, LongformerConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
        BigBirdModel,
    )
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
except ImportError:
    LongformerSelfAttention = None

BATCH, HEADS, HEAD_DIM = 1, 8, 64
GOAL_N = 16384
BUCKET_SIZE, N_HASHES = 64, 4
LONGFORMER_WINDOW = 256
BIGBIRD_BLOCK, HF_RANDOM_BLOCKS = 64, 1
# A multiple of every peer's granularity (Longformer: 2 * window), and longer than the
# (5 + 2 * random blocks) blocks below which BigBirdModel falls back to full attention.
CHECK_N = 1024
FLOAT32_BYTES = 4
NOT_INSTALLED = "not installed (pip install 'attn-zoo[bench]')"

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Impl:
    """One row family. `build(n)` returns its forward for length n (setup not timed).

    counted: the attn_zoo variant whose `flops` counts its useful work; partner: for a peer, the
    attn_zoo implementation it is compared with; equals: the implementation whose output (and
    gradients, when both have them) it must equal at CHECK_N, None for a shape and finiteness
    check against the partner; dense_bytes: bytes of an N x N tensor it allocates, if any.
    """

    name: str
    causal: bool
    build: Callable[[int], Forward]
    counted: attn_zoo.Attention
    partner: Impl | None = None
    equals: Impl | None = None
    no_backward: str | None = None
    missing: str | None = None
    dense_bytes: Callable[[int], int] | None = None
    over_budget: dict[str, int] = field(default_factory=dict)  # measurement -> first N over

    @property
    def mode(self) -> str:
        return "causal" if self.causal else "bidir"


def variant_impl(attn: attn_zoo.Attention, causal: bool) -> Impl:
    return Impl(f"attn_zoo.{attn.name}", causal,
                lambda n: lambda q, k, v: attn(q, k, v, causal=causal), attn)


def partner_impl(impls: list[Impl], name: str, causal: bool, **params) -> Impl:
    """The attn_zoo implementation a peer is compared with: an existing row with the same
    variant, mode and parameters, or a new one appended to `impls`."""
    attn = attn_zoo.build(name, **params).eval()
    for impl in impls:
        if (impl.partner is None and impl.counted.name == name and impl.causal == causal
                and impl.counted.params == attn.params):
            return impl
    impls.append(variant_impl(attn, causal))
    return impls[-1]


def reformer_forward(n: int) -> Forward:
    module = LSHAttention(bucket_size=BUCKET_SIZE, n_hashes=N_HASHES, causal=True).eval()

    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch, heads, length, dim = q.shape
        out = module(q.reshape(batch * heads, length, dim), v.reshape(batch * heads, length, dim))
        return out[0].view(batch, heads, length, dim)

    return forward


def hf_longformer_forward(n: int) -> Forward:
    config = LongformerConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                              attention_window=[2 * LONGFORMER_WINDOW],
                              attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, layer_id=0).eval()
    attention_mask = torch.zeros(BATCH, n)  # the model's additive mask: 0 = local, no padding
    is_index_masked = attention_mask < 0

    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        query = q.transpose(1, 2) / math.sqrt(HEAD_DIM)  # (B, N, H, D), as HF lays heads out
        scores = layer._sliding_chunks_query_key_matmul(query, k.transpose(1, 2),
                                                        LONGFORMER_WINDOW)
        remove = (attention_mask != 0)[:, :, None, None]
        float_mask = remove.type_as(query).masked_fill(remove, torch.finfo(query.dtype).min)
        scores += layer._sliding_chunks_query_key_matmul(
            float_mask.new_ones(size=float_mask.size()), float_mask, LONGFORMER_WINDOW)
        probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
        probs = torch.masked_fill(probs, is_index_masked[:, :, None, None], 0.0)
        probs = probs.type_as(scores)
        probs = torch.nn.functional.dropout(probs, p=layer.dropout, training=layer.training)
        out = layer._sliding_chunks_matmul_attn_probs_value(probs, v.transpose(1, 2),
                                                            LONGFORMER_WINDOW)
        return out.transpose(1, 2)

    return forward


def hf_bigbird_forward(n: int) -> Forward:
    config = BigBirdConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                           block_size=BIGBIRD_BLOCK, num_random_blocks=HF_RANDOM_BLOCKS,
                           attention_probs_dropout_prob=0.0)
    sparse = BigBirdBlockSparseAttention(config)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(BATCH, n), BIGBIRD_BLOCK)

    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sparse.train(torch.is_grad_enabled())  # as shipped: random blocks only in training
        context, _ = sparse.bigbird_block_sparse_attention(
            q, k, v, band, from_mask, to_mask, blocked, blocked, HEADS, HF_RANDOM_BLOCKS,
            HEAD_DIM, BIGBIRD_BLOCK, BIGBIRD_BLOCK, BATCH, n, n, seed=sparse.seed,
            plan_from_length=None, plan_num_rand_blocks=None)
        return context.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D), a view

    return forward


def hf_bigbird_no_dense_forward(n: int) -> Forward:
    forward = hf_bigbird_forward(n)
    dense_shape = (BATCH, HEADS, n, n)
    zeros = torch.zeros

    def zeros_dense_on_meta(*size, **kwargs) -> Tensor:
        if size == dense_shape:
            kwargs["device"] = "meta"
        return zeros(*size, **kwargs)

    def cut(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with mock.patch.object(torch, "zeros", zeros_dense_on_meta):
            return forward(q, k, v)

    return cut


def dense_probability_bytes(n: int) -> int:
    return BATCH * HEADS * n * n * FLOAT32_BYTES


def implementations(variants: list[str], peers: bool) -> list[Impl]:
    """Every selected variant (causal), then the peers whose partner variant is selected."""
    impls = [variant_impl(attn_zoo.build(name).eval(), True) for name in variants]
    if not peers:
        return impls
    if "lsh" in variants:
        lsh = partner_impl(impls, "lsh", True, bucket_size=BUCKET_SIZE, n_hashes=N_HASHES)
        impls.append(Impl("reformer.lsh", True, reformer_forward, lsh.counted, partner=lsh,
                          missing=None if LSHAttention else NOT_INSTALLED))
    hf_missing = None if LongformerSelfAttention else NOT_INSTALLED
    if "longformer" in variants:
        longformer = partner_impl(impls, "longformer", False, window=LONGFORMER_WINDOW)
        impls.append(Impl("hf.longformer", False, hf_longformer_forward, longformer.counted,
                          partner=longformer, equals=longformer, missing=hf_missing))
    if "bigbird" in variants:
        bigbird = partner_impl(impls, "bigbird", False)
        shipped = Impl("hf.bigbird", False, hf_bigbird_forward, bigbird.counted, partner=bigbird,
                       missing=hf_missing, dense_bytes=dense_probability_bytes)
        impls += [shipped, Impl("hf.bigbird.no_dense", False, hf_bigbird_no_dense_forward,
                                bigbird.counted, partner=bigbird, equals=shipped,
                                no_backward="meta tensors cannot enter autograd",
                                missing=hf_missing)]
    return impls


def check_equal_work(impls: list[Impl]) -> None:
    """Assert each runnable peer equals its reference (output, and gradients when both have a
    backward), or has its partner's output shape and finite output and gradients."""
    for impl in impls:
        if impl.partner is None or impl.missing:
            continue
        with_grad = impl.no_backward is None
        inputs = attention_inputs(BATCH, HEADS, CHECK_N, HEAD_DIM, seed=1)
        theirs = [x.clone().requires_grad_(with_grad) for x in inputs]
        with torch.set_grad_enabled(with_grad):
            got = impl.build(CHECK_N)(*theirs)
        grad_out = torch.randn_like(got)
        grads = (torch.autograd.grad(got, theirs, grad_out, allow_unused=True) if with_grad
                 else ())
        reference = impl.equals or impl.partner
        ours = [x.clone().requires_grad_(with_grad) for x in inputs]
        with torch.set_grad_enabled(with_grad):
            expected = reference.build(CHECK_N)(*ours)
        if impl.equals is None:
            assert got.shape == expected.shape, f"{impl.name} output shape {tuple(got.shape)}"
            assert all(torch.isfinite(x).all() for x in (got, *grads) if x is not None), (
                f"{impl.name}: non-finite output or gradients")
            print(f"  {impl.name:>20} has {reference.name}'s output shape, finite output"
                  f"{' and gradients' if with_grad else ''} at N={CHECK_N} (equal work size; "
                  "random choices differ)", flush=True)
            continue
        pairs = {"output": (got, expected)}
        if with_grad and reference.no_backward is None:
            expected_grads = torch.autograd.grad(expected, ours, grad_out, allow_unused=True)
            pairs |= {f"d{label}": pair for label, pair in zip("qkv", zip(
                grads, expected_grads, strict=True), strict=True)}
        for what, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, w=f"{impl.name} {what}": f"{w}: {m}")
        print(f"  {impl.name:>20} matches {reference.name} ({reference.mode}) at N={CHECK_N} "
              f"({', '.join(pairs)})", flush=True)


def available_memory() -> int:
    """Bytes the kernel reports as available to new allocations (MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def first_line(error: Exception) -> str:
    """The error's type and the first line of its message (HF's messages run long)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def seconds_of(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def inference(forward: Forward, q: Tensor, k: Tensor, v: Tensor) -> Callable[[], Tensor]:
    """`forward(q, k, v)` under `no_grad`, as a callable without arguments."""

    def infer() -> Tensor:
        with torch.no_grad():
            return forward(q, k, v)

    return infer


def training_step(forward: Forward, inputs: list[Tensor], grad_out: Tensor) -> Callable[[], None]:
    """The gradients of `inputs` for `grad_out` through `forward`, as a callable."""

    def step() -> None:
        # autograd.grad, not .backward(): gradients must not accumulate across runs; shared-QK
        # variants leave k unused.
        torch.autograd.grad(forward(*inputs), inputs, grad_out, allow_unused=True)

    return step


def measure_length(impls: list[Impl], n: int, args: argparse.Namespace) -> list[dict]:
    """Rows for every implementation at length n: forward peak memory, then forward and
    forward+backward times measured in alternating rounds across the implementations."""
    q, k, v = attention_inputs(BATCH, HEADS, n, HEAD_DIM)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn_like(q)
    status: dict[int, str] = {}
    peaks: dict[int, int] = {}
    timed: dict[tuple[int, str], Callable[[], object]] = {}
    for index, impl in enumerate(impls):
        if impl.missing:
            status[index] = impl.missing
            continue
        if "fwd" in impl.over_budget:
            status[index] = f"skipped: fwd over budget at N={impl.over_budget['fwd']}"
            continue
        if impl.dense_bytes and impl.dense_bytes(n) > 0.8 * (free := available_memory()):
            # Attempting it could bring the kernel's OOM killer down on the whole run.
            status[index] = (f"skipped: its dense N x N tensor needs "
                             f"{impl.dense_bytes(n) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                             "available")
            continue
        try:
            forward = impl.build(n)
            fwd = inference(forward, q, k, v)
            first = seconds_of(fwd)
            if first > args.budget:
                impl.over_budget["fwd"] = n
                status[index] = f"over budget: one fwd took {first:.0f} s > {args.budget:g} s"
                continue
            peaks[index] = peak_memory(fwd)
        except Exception as error:  # a failing point becomes a row; the bench goes on
            status[index] = first_line(error)
            continue
        timed[(index, "fwd")] = fwd
        notes = []
        if impl.no_backward:
            notes.append(f"fwd_bwd unavailable: {impl.no_backward}")
        elif "fwd_bwd" in impl.over_budget:
            notes.append(f"fwd_bwd skipped: over budget at N={impl.over_budget['fwd_bwd']}")
        else:
            step = training_step(forward, inputs, grad_out)
            try:
                first = seconds_of(step)
            except Exception as error:
                notes.append(f"fwd_bwd failed: {first_line(error)}")
            else:
                if first > args.budget:
                    impl.over_budget["fwd_bwd"] = n
                    notes.append(f"fwd_bwd over budget: one took {first:.0f} s > "
                                 f"{args.budget:g} s")
                else:
                    timed[(index, "fwd_bwd")] = step
        status[index] = "; ".join(["ok", *notes])
    seconds = interleaved_median_times(timed, repeats=args.repeats, budget_s=args.budget)
    rows = []
    for index, impl in enumerate(impls):
        row: dict = {"impl": impl.name, "mode": impl.mode, "N": n, "status": status[index]}
        if index in peaks:
            row["fwd_peak_mib"] = peaks[index] / MIB
        for what in ("fwd", "fwd_bwd"):
            if (index, what) in seconds:
                flops = useful_flops(impl.counted, n, HEAD_DIM, impl.causal, batch=BATCH,
                                     heads=HEADS, backward=what == "fwd_bwd")
                row[f"{what}_ms"] = seconds[(index, what)] * 1e3
                row[f"{what}_gflops"] = flops / seconds[(index, what)] / 1e9
        rows.append(row)
    return rows


BOTH = ("fwd", "fwd_bwd")
PAIRS = [  # (label, attn_zoo impl, mode, peer, timings compared)
    ("lsh", "attn_zoo.lsh", "causal", "reformer.lsh", BOTH),
    ("longformer", "attn_zoo.longformer", "bidir", "hf.longformer", BOTH),
    ("bigbird", "attn_zoo.bigbird", "bidir", "hf.bigbird", BOTH),
    ("bigbird_no_dense", "attn_zoo.bigbird", "bidir", "hf.bigbird.no_dense", ("fwd",)),
]


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per length and pair: the peer's time over ours (>1: attn_zoo is faster) and our forward
    peak memory over the peer's (<1: attn_zoo needs less)."""
    by = table.set_index(["impl", "mode", "N"])

    def get(impl: str, mode: str, column: str, n: int) -> float:
        return by[column].get((impl, mode, n), float("nan")) if column in by else float("nan")

    rows = []
    for n in sorted(table["N"].unique()):
        row: dict = {"N": n}
        for label, ours, mode, peer, timings in PAIRS:
            for what in timings:
                row[f"{label}_{what}_speedup"] = (get(peer, mode, f"{what}_ms", n)
                                                  / get(ours, mode, f"{what}_ms", n))
            row[f"{label}_fwd_peak_ratio"] = (get(ours, mode, "fwd_peak_mib", n)
                                              / get(peer, mode, "fwd_peak_mib", n))
        rows.append(row)
    return pd.DataFrame(rows)


GOALS = [  # (goal, ratio column, operator, target)
    ("lsh fwd >= 2x faster than reformer-pytorch", "lsh_fwd_speedup", ">=", 2.0),
    ("lsh fwd peak <= reformer-pytorch's", "lsh_fwd_peak_ratio", "<=", 1.0),
    ("longformer fwd >= 2x faster than HF Longformer", "longformer_fwd_speedup", ">=", 2.0),
    ("longformer fwd peak <= HF Longformer's", "longformer_fwd_peak_ratio", "<=", 1.0),
    ("bigbird fwd at least as fast as HF BigBird without its dense step",
     "bigbird_no_dense_fwd_speedup", ">=", 1.0),
    ("bigbird fwd peak < HF BigBird's without its dense step", "bigbird_no_dense_fwd_peak_ratio",
     "<", 1.0),
]
COMPARE = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def goals(ratio_table: pd.DataFrame, goal_n: int = GOAL_N) -> pd.DataFrame:
    """The goals at N = goal_n: measured value, target, met (n/a when not measured)."""
    at = ratio_table.set_index("N")
    rows = []
    for goal, column, op, target in GOALS:
        value = at[column].get(goal_n, float("nan")) if column in at else float("nan")
        met = "n/a" if pd.isna(value) else ("yes" if COMPARE[op](value, target) else "NO")
        rows.append({"goal": goal, "measured": value, "target": f"{op} {target:g}", "met": met})
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int,
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="registered variants to measure (default: all)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="time reformer-pytorch and transformers peers beside their partners")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per measurement: slow points are timed fewer times, and a "
                             "point whose single call exceeds it is not timed")
    parser.add_argument("--out", type=Path, default=Path("results/cpu/variants_bench"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Check, measure every implementation at every length, write the tables; return them."""
    variants = args.variants or attn_zoo.available()
    unknown = sorted(set(variants) - set(attn_zoo.available()))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; available: {attn_zoo.available()}")
    setting = environment()
    print(setting, flush=True)
    impls = implementations(variants, args.peers)
    check_equal_work(impls)
    rows = []
    for n in sorted(args.lengths):
        rows += measure_length(impls, n, args)
        for row in rows[-len(impls):]:
            print(f"  {row['impl']:>22} {row['mode']:>6} N={n:<6} {row['status']}", flush=True)
    columns = ["impl", "mode", "N", "fwd_ms", "fwd_bwd_ms", "fwd_gflops", "fwd_bwd_gflops",
               "fwd_peak_mib", "status"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    ratio_table = ratios(table)
    tables = {"variants_bench": table, "ratios": ratio_table, "goals": goals(ratio_table)}
    write(args.out, tables, setting)
    return tables


def write(out: Path, tables: dict[str, pd.DataFrame], setting: str) -> None:
    header = (f"# attn_zoo variants and peers (CPU)\n\n"
              f"float32, B={BATCH}, H={HEADS}, D={HEAD_DIM}; variants at their defaults, "
              f"causal; peers in their partner's mode. {setting}.\nUseful FLOPs: each "
              f"variant's `flops` (a peer counts its partner's); fwd+bwd counts "
              f"{FWD_BWD_FACTOR} forwards. Peak: forward memory growth, output included. "
              "Peers and what is timed: `experiments/bench_variants.py`.\n")
    titles = {"variants_bench": "Time, throughput, memory",
              "ratios": "Ratios (speedup: peer time / ours; peak ratio: ours / peer)",
              "goals": f"Goals at N={GOAL_N}"}
    write_tables(out, "variants_bench", header,
                 {key: (title, tables[key]) for key, title in titles.items()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_tables(run(args), args.out)


if __name__ == "__main__":
    main()
