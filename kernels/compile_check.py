"""Native compile check: every kernel configuration the dispatcher can choose, built for real
GPU targets by Triton's compiler and its bundled ptxas, on a machine without a GPU.

    python -m attn_zoo.kernels.compile_check                   # the whole matrix
    python -m attn_zoo.kernels.compile_check --subset ci       # the CI subset
    python -m attn_zoo.kernels.compile_check --archs 90 --out /tmp/check
    python -m attn_zoo.kernels.compile_check --tune            # re-derive the config tables

A case is one call of a public kernel entry point (`layout_attention`, `lsh_attention`,
`routing_attention`, `selection_attention`), forward and backward, on small CPU tensors inside
`launch.capture(arch)`: the launchers choose the configuration a GPU of that architecture gets
and record every kernel launch with its real arguments. Each distinct launch (kernel, signature,
specialization, constants, warps, stages) is compiled for `GPUTarget("cuda", arch, 32)` through
Triton's own argument binder, so what is compiled is what a GPU would compile. Per launch:
compiled or the compiler's error, shared memory against the per-block limit of the architecture
family (`SHARED_LIMITS`), and registers and spill bytes from the ptxas log of that very compile.

Matrix (`--subset full`): architectures 80, 90 and 100 (where the installed Triton builds for
it) x precision (float32 IEEE, float32 TF32, bfloat16, float16) x head dim (16, 32, 64, 128) x
flags: block-sparse plain, key padding, key bias, padding + bias with its gradient; bucket
kernels lsh and routing, causal and not, with and without padding, at their largest block (and,
plain, at buckets of 16 and 32); the selection kernel (causal) at units 64 and 16 (blocks) and 1
and 4 (gathered), with and without padding; plus head dim 72 (padded to 128, strides not
multiples of 16: another specialization), plain. The CI subset: the block-sparse and bucket
kernels (bucket kernels as lsh causal and routing) x float32 (IEEE), bfloat16, float16 x head
dims 64 and 128 x plain and padded on sm_90, plain on sm_80; the selection kernel at units 64
and 1 x float32 (IEEE), bfloat16 x head dims 64 and 128, plain, on sm_90 and sm_80. Rows go to
`<out>/compile_check.csv` and `<out>/compile_check.md` (the full matrix adds every static
variant's layout statistics); the exit code is 1 when a launch fails to compile or overflows
shared memory. Compiler processes: `--jobs` (default: the CPU count). Kernels defined under
TRITON_INTERPRET=1 cannot be compiled: run it without.

`--tune` searches the launchers' configuration tables (`block_sparse.CONFIGS`,
`bucket.CONFIGS`, `selection.CONFIGS`; `--kernels` picks some) for each of `--archs` and
prints them: see `tune_block_sparse`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import triton
from attn_zoo.kernels.launch import Launch, capture

ARCHS = (80, 90, 100)
SHARED_LIMITS = {80: 101376, 90: 232448, 100: 232448}
"""Dynamic shared memory per block, bytes: sm_80 configs also serve sm_86/89 (99 KB; the A100
itself has 163 KB); sm_90 and sm_100: 227 KB."""

DTYPES = {"ieee": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
CI_PRECISIONS = ("ieee", "bf16", "fp16")
"""The dtypes of the CI subset (TF32 float32 is in the full matrix)."""
KINDS = {"ieee": "ieee", "tf32": "tf32", "bf16": "16bit", "fp16": "16bit"}
"""The launchers' precision kind (a key of their configuration tables) of each precision."""
UNALIGNED_DIM = 72
"""A head dim whose strides are not multiples of 16 (padded to 128): another specialization."""
HEAD_DIMS = (16, 32, 64, 128, UNALIGNED_DIM)
BLOCK_SPARSE_FLAGS = ("plain", "pad", "bias", "pad+bias+grad")
BUCKET_FLAGS = ("plain", "pad")
BUCKET_MODES = ("lsh", "lsh-causal", "routing", "routing-causal")
SELECTION_UNITS = (64, 16, 1, 4)
"""Units of the selection kernel's cases: blocks (64: MoBA, NSA; 16) and gathered (1: top-k; 4)."""
CI_SELECTION = (("ieee", "bf16"), (64, 1))
"""Precisions and units of the selection kernel in the CI subset."""
OUT = Path("results/compile")


@dataclass(frozen=True)
class Case:
    """One call of a kernel entry point, forward and backward, as a GPU of `arch` runs it."""

    arch: int
    family: str  # "block_sparse", the bucket mode (e.g. "lsh-causal") or "selection"
    precision: str  # a key of DTYPES
    head_dim: int
    flags: str
    group: int = 64  # bucket kernels: the bucket or cluster size (their block); selection: unit


@dataclass
class Row:
    """What compiling one launch of a case gave."""

    arch: int
    kernel: str
    precision: str
    head_dim: int
    flags: str
    tiles: str
    warps: int
    stages: int
    status: str  # "ok", "error" or "shared memory overflow"
    shared_bytes: int | None
    shared_limit: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    seconds: float
    error: str = ""


def cases(subset: str, archs: Sequence[int]) -> list[Case]:
    """The cases of `subset` ("ci" or "full") on `archs`."""
    if subset == "ci":
        found = []
        for arch in archs:
            flags = (("plain", "pad") if arch == 90 else ("plain",))
            for precision in CI_PRECISIONS:
                for dim in (64, 128):
                    found += [Case(arch, "block_sparse", precision, dim, flag) for flag in flags]
                    found += [Case(arch, mode, precision, dim, flag)
                              for mode in ("lsh-causal", "routing") for flag in flags]
            found += [Case(arch, "selection", precision, dim, "plain", unit)
                      for precision in CI_SELECTION[0] for dim in (64, 128)
                      for unit in CI_SELECTION[1]]
        return found
    found = []
    for arch in archs:
        for precision in DTYPES:
            for dim in HEAD_DIMS:
                aligned = dim != UNALIGNED_DIM
                found += [Case(arch, "block_sparse", precision, dim, flag)
                          for flag in (BLOCK_SPARSE_FLAGS if aligned else ("plain",))]
                found += [Case(arch, mode, precision, dim, flag)
                          for mode in (BUCKET_MODES if aligned else ("lsh-causal", "routing"))
                          for flag in (BUCKET_FLAGS if aligned else ("plain",))]
                found += [Case(arch, mode, precision, dim, "plain", group)
                          for mode in ("lsh-causal", "routing") for group in (16, 32)
                          if aligned]
                found += [Case(arch, "selection", precision, dim, flag, unit)
                          for unit in (SELECTION_UNITS if aligned else (64, 1))
                          for flag in (BUCKET_FLAGS if aligned else ("plain",))]
    return found


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def capture_case(case: Case) -> list[Launch]:
    """The launches of `case`'s forward and backward call, as its architecture runs them."""
    from attn_zoo.kernels.block_sparse import layout_attention, tile_config
    from attn_zoo.kernels.bucket import lsh_attention, routing_attention
    from attn_zoo.kernels.layout import build_layout
    from attn_zoo.kernels.selection import selection_attention

    dtype, dim, n = DTYPES[case.precision], case.head_dim, 200
    pad = torch.ones(1, n, dtype=torch.bool) if "pad" in case.flags else None
    with _matmul_precision(case.precision), capture(case.arch) as launches:
        if case.family == "block_sparse":
            tiles = tile_config(dtype, dim, torch.device("cuda"))
            layout = build_layout(lambda i, j: (i - j).abs() <= 64, n, n, tiles.block_m,
                                  tiles.block_n)
            q = torch.zeros(1, 2, 2, n, dim, dtype=dtype, requires_grad=True)
            k, v = (torch.zeros(1, 2, n, dim, dtype=dtype, requires_grad=True) for _ in "kv")
            bias = (torch.zeros(1, n, requires_grad="grad" in case.flags)
                    if "bias" in case.flags else None)
            out, lse = layout_attention(q, k, v, layout, scale=dim**-0.5,
                                              key_padding_mask=pad, key_bias=bias)
            inputs = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
        elif case.family == "selection":  # 2 selection heads of 2 query heads, one kv head
            q = torch.zeros(1, 2, 2, n, dim, dtype=dtype, requires_grad=True)
            k, v = (torch.zeros(1, 1, n, dim, dtype=dtype, requires_grad=True) for _ in "kv")
            index = torch.arange(4).expand(1, 2, n, 4)
            out, lse = selection_attention(q, k, v, index, unit=case.group, scale=dim**-0.5,
                                           causal=True, key_padding_mask=pad)
            inputs = [q, k, v]
        else:
            q, k = (torch.zeros(1, 2, n, dim, dtype=dtype, requires_grad=True) for _ in "qk")
            v = torch.zeros(1, 1, n, dim, dtype=dtype, requires_grad=True)
            options = dict(causal=case.family.endswith("causal"), scale=dim**-0.5,
                           key_padding_mask=pad)
            if case.family.startswith("lsh"):
                order = torch.arange(n).expand(2, 1, 2, n)
                out, lse = lsh_attention(q, k, v, order, case.group, **options)
            else:
                members = torch.arange(4 * case.group).view(1, 1, 4, case.group).expand(
                    1, 2, 4, case.group) % n
                out, lse = routing_attention(q, k, v, members, **options)
            inputs = [q, k, v]
        torch.autograd.grad((out, lse), inputs, (torch.ones_like(out), torch.ones_like(lse)))
    return launches


def _compile_parts(launch: Launch, arch: int):
    """(source, target, options) that Triton's launcher would compile for `launch` on `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def launch_key(launch: Launch, arch: int) -> str:
    """Identifies what compiling `launch` for `arch` builds: equal keys, equal binaries."""
    source, _, options = _compile_parts(launch, arch)
    return f"{arch}|{source.hash()}|{options.hash()}"


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


@contextlib.contextmanager
def _compiling() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Fresh compiles whose ptxas log (printed) and compiler diagnostics (file descriptor 2)
    are caught: yields (log, diagnostics), the latter filled when the block ends."""
    from triton import knobs

    settings = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
    # A cached binary would skip ptxas, and its log with it.
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log, diagnostics = io.StringIO(), io.StringIO()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile("w+") as errors, contextlib.redirect_stdout(log):
            os.dup2(errors.fileno(), 2)
            try:
                yield log, diagnostics
            finally:
                os.dup2(saved, 2)
                errors.seek(0)
                diagnostics.write(errors.read())
    finally:
        os.close(saved)
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = settings


def compile_launch(launch: Launch, case: Case) -> Row:
    """Compile `launch` natively for `case.arch` and read its resources."""
    source, target, options = _compile_parts(launch, case.arch)
    constants = launch.kwargs
    tiles = "x".join(str(constants[key]) for key in ("BLOCK_M", "BLOCK_G", "BLOCK_N")
                     if key in constants)
    steps = [f"{key.lower()} {constants[key]}" for key in ("SUB_M", "SUB_N") if key in constants]
    flags = f"{case.family} {case.flags}"
    if case.family == "block_sparse":
        flags = case.flags
    elif case.family == "selection":
        flags = f"selection unit {case.group} {case.flags}"
    row = Row(case.arch, launch.kernel.fn.__name__.strip("_"), case.precision, case.head_dim,
              flags, " ".join([tiles, *steps]), options.num_warps, options.num_stages, "ok",
              None, SHARED_LIMITS[case.arch], None, None, None, 0.0)
    start = time.perf_counter()
    try:
        with _compiling() as (log, diagnostics):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as error:  # the compiler's own error is the result
        lines = [line for line in diagnostics.getvalue().splitlines() if "error" in line.lower()]
        row.status = "error"
        message = " ".join(str(error).split())  # one line; the end says what failed
        row.error = " / ".join([*lines[:2], f"{type(error).__name__}: ...{message[-240:]}"])
        return row
    finally:
        row.seconds = round(time.perf_counter() - start, 2)
    row.shared_bytes = int(compiled.metadata.shared)
    if row.shared_bytes > row.shared_limit:
        row.status = "shared memory overflow"
    text = log.getvalue()
    registers, spills = _PTXAS["registers"].search(text), _PTXAS["spills"].search(text)
    row.registers = int(registers.group(1)) if registers else None
    if spills:
        row.spill_stores, row.spill_loads = int(spills.group(1)), int(spills.group(2))
    return row


def arch_supported(arch: int) -> bool:
    """Whether the installed Triton compiles for `arch` (probed with a tiny kernel)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def probe(x):
        tl.store(x, 1.0)

    try:
        with _compiling():
            triton.compile(ASTSource(probe, {"x": "*fp32"}, {}, {}),
                           target=GPUTarget("cuda", arch, 32))
    except Exception:  # any failure to build for the arch means it is not supported here
        return False
    return True


def _pool(jobs: int) -> ProcessPoolExecutor:
    """Compiler processes, spawned: a forked child of a process whose torch thread pool has
    started can hang in it."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _compile_task(task: tuple[Case, int]) -> Row:
    case, index = task
    return compile_launch(capture_case(case)[index], case)


def run(subset: str, archs: Sequence[int], jobs: int = 2) -> list[Row]:
    """Compile every distinct launch of `subset` on the supported `archs`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check compiles the kernels natively: run it without "
                           "TRITON_INTERPRET=1 (got TRITON_INTERPRET=1)")
    tasks, seen = [], set()
    for case in cases(subset, [arch for arch in archs if arch_supported(arch)]):
        for index, launch in enumerate(capture_case(case)):
            key = launch_key(launch, case.arch)
            if key not in seen:
                seen.add(key)
                tasks.append((case, index))
    if jobs <= 1:
        return [_compile_task(task) for task in tasks]
    with _pool(jobs) as pool:
        return list(pool.map(_compile_task, tasks))


def failures(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row.status != "ok"]


LAYOUT_LENGTHS = (4096, 8192)


def layout_rows(lengths: Sequence[int] = LAYOUT_LENGTHS) -> list[dict]:
    """Tile statistics of every static variant's causal pattern (exact part for hierarchical
    and compressive) at default parameters, at the sm_90 bfloat16 head-dim-128 tiles."""
    from attn_zoo.kernels.block_sparse import tile_config
    from attn_zoo.kernels.layout import build_layout

    import attn_zoo
    from attn_zoo.registry import get

    with capture(90):
        tiles = tile_config(torch.bfloat16, 128, torch.device("cpu"))
    found = []
    for name in attn_zoo.available():
        if "triton" not in get(name).backends or get(name).content_based:
            continue
        attn = attn_zoo.build(name)
        pattern = attn.pattern if type(attn).static_pattern else attn.exact_pattern
        for n in lengths:
            layout = build_layout(pattern(n, True), n, n, tiles.block_m, tiles.block_n)
            found.append({"variant": name, **layout.stats()})
    return found


def write(rows: Sequence[Row], out: Path, subset: str, archs: Sequence[int],
          layouts: Sequence[dict] = ()) -> Path:
    """`out`/compile_check.csv and .md, each written whole (temporary file, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    names = [field.name for field in fields(Row)]
    text = io.StringIO()
    writer = csv.DictWriter(text, names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    _write_whole(out / "compile_check.csv", text.getvalue())
    _write_whole(out / "compile_check.md", report(rows, subset, archs, layouts))
    return out / "compile_check.md"


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def report(rows: Sequence[Row], subset: str, archs: Sequence[int],
           layouts: Sequence[dict] = ()) -> str:
    """Markdown: a summary per architecture, failures, layout statistics, then every row."""
    lines = [
        "# Native compile check of attn_zoo's Triton kernels", "",
        f"`python -m attn_zoo.kernels.compile_check --subset {subset}` with Triton "
        f"{triton.__version__}, torch {torch.__version__}; architectures asked: "
        f"{', '.join(f'sm_{arch}' for arch in archs)}. One row per distinct compiled launch "
        "(kernel, signature, specialization, constants, warps, stages); spills and registers "
        "from the ptxas log of that compile (bytes per thread).", "",
        "| arch | launches | compiled | errors | shared memory overflows | with spills | "
        "max spill stores | max registers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in sorted({row.arch for row in rows}):
        mine = [row for row in rows if row.arch == arch]
        ok = [row for row in mine if row.status == "ok"]
        spilled = [row for row in ok if row.spill_stores]
        lines.append(
            f"| sm_{arch} | {len(mine)} | {len(ok)} | "
            f"{sum(row.status == 'error' for row in mine)} | "
            f"{sum(row.status == 'shared memory overflow' for row in mine)} | {len(spilled)} | "
            f"{max((row.spill_stores or 0 for row in ok), default=0)} | "
            f"{max((row.registers or 0 for row in ok), default=0)} |")
    missing = sorted(set(archs) - {row.arch for row in rows})
    if missing:
        lines += ["", "Not built by this Triton: " + ", ".join(f"sm_{a}" for a in missing) + "."]
    bad = failures(rows)
    lines += ["", "## Failures", ""]
    lines += [f"- sm_{r.arch} {r.kernel} {r.precision} d={r.head_dim} {r.flags}: {r.status} "
              f"{r.error}" for r in bad] or ["None."]
    if layouts:
        lines += ["", "## Tile layouts (causal, default parameters, 128 x 64 tiles)", "",
                  "A kernel's work is its visited tiles; `density` = visited / dense tiles "
                  "(1 - density: the tile sparsity), `pair fill` = allowed pairs / pairs of "
                  "the visited tiles (how full the visited tiles are).", "",
                  "| variant | N | visited tiles | dense tiles | density | allowed pairs | "
                  "pair fill |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['n']} | {r['visited_tiles']} | {r['dense_tiles']} | "
                  f"{r['density']:.3f} | {r['pairs']} | {r['pair_fill']:.3f} |"
                  for r in layouts]
    lines += ["", "## Every launch", "",
              "| arch | kernel | precision | head dim | flags | tiles | warps | stages | status "
              "| shared KB (limit) | registers | spill stores / loads | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.arch, r.kernel, r.precision, r.head_dim, r.flags)):
        shared = "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}"
        spills = "-" if r.spill_stores is None else f"{r.spill_stores} / {r.spill_loads}"
        lines.append(f"| sm_{r.arch} | {r.kernel} | {r.precision} | {r.head_dim} | {r.flags} | "
                     f"{r.tiles} | {r.warps} | {r.stages} | {r.status} | {shared} "
                     f"({r.shared_limit / 1024:.0f}) | {r.registers or '-'} | {spills} | "
                     f"{r.seconds} |")
    return "\n".join(lines) + "\n"


# -- tuning: the configuration tables of the launchers ------------------------------------

_BLOCKS = {"16bit": [(128, 64), (128, 32), (64, 64), (64, 32), (32, 32)],
           "tf32": [(64, 64), (64, 32), (32, 32), (32, 16), (16, 16)],
           "ieee": [(32, 32), (32, 16), (16, 32), (16, 16)]}
_BUCKET_BLOCKS = {"16bit": (64, 32), "tf32": (64, 32, 16), "ieee": (32, 16)}
_TUNE_PRECISION = {"16bit": "bf16", "tf32": "tf32", "ieee": "ieee"}
SPILL_GOAL = {"plain": 0, "flags": 64}
"""Spill bytes per thread allowed on the plain path and with padding and key bias."""


def _spills(row: Row) -> float:
    """Spill bytes of a compiled row; infinite when it failed or overflowed shared memory."""
    return row.spill_stores or 0 if row.status == "ok" else float("inf")


def _try(case: Case, kernel: str, apply) -> float:
    """Spill bytes of `kernel` in `case` after `apply()` sets the config; the flagged case
    (padding and key bias with its gradient) counts only above its goal."""
    apply()
    total = 0.0
    for flags, goal in (("plain", 0), ("pad+bias+grad" if case.family == "block_sparse"
                                        else "pad", SPILL_GOAL["flags"])):
        flagged = Case(case.arch, case.family, case.precision, case.head_dim, flags, case.group)
        launch = next(item for item in capture_case(flagged) if kernel in item.kernel.fn.__name__)
        spills = _spills(compile_launch(launch, flagged))
        total += spills if goal == 0 else max(0.0, spills - goal)
        if total:
            break
    return total


def _first_without_spills(config, options: list[dict], spills_of) -> tuple[float, Any]:
    """(spills, config) of the first of `options` (field values replacing `config`'s) for which
    `spills_of(candidate)` is 0, else of the candidate spilling the fewest bytes."""
    tried = []
    for option in options:
        candidate = replace(config, **option)
        spills = spills_of(candidate)
        tried.append((spills, candidate))
        if spills == 0:
            break
    return min(tried, key=lambda item: item[0])


def tune_block_sparse(arch: int, kind: str, dim: int):
    """The block-sparse `TileConfig` for (arch family, precision kind, padded head dim): the
    first tiles in `_BLOCKS` order whose three kernels meet `SPILL_GOAL`, each kernel taking
    the first warps/stages/step that does; else the tiles with the fewest spill bytes."""
    from attn_zoo.kernels import block_sparse

    table = block_sparse.CONFIGS[arch, kind]
    case = Case(arch, "block_sparse", _TUNE_PRECISION[kind], dim, "plain")
    warps = (4, 8) if dim <= 64 else (8, 4)
    best = None
    for block_m, block_n in _BLOCKS[kind]:
        config = block_sparse.TileConfig(block_m, block_n, 4, 2, 16, 4, 1, 16, 4, 1)
        total = 0.0
        for kernel, options in (
            ("forward", [dict(fwd_warps=w, fwd_stages=s) for w in warps for s in (3, 2)]),
            ("grad_kv", [dict(sub_m=m, kv_warps=w, kv_stages=s) for m in (64, 32, 16)
                         if m <= block_m for w in warps for s in (1, 2)]),
            ("grad_q", [dict(sub_n=n, q_warps=w, q_stages=s) for n in (64, 32, 16)
                        if n <= block_n for w in warps for s in (1, 2)]),
        ):
            spills, config = _first_without_spills(
                config, options,
                lambda c, k=kernel: _try(case, k, lambda: table.__setitem__(dim, c)))
            total += spills
        if best is None or total < best[0]:
            best = (total, config)
        if total == 0:
            break
    table[dim] = best[1]
    return best[1], best[0]


def tune_bucket(arch: int, kind: str, dim: int):
    """The bucket kernels' `BucketConfig`, chosen as `tune_block_sparse` chooses, over the
    lsh (causal) and routing launches."""
    from attn_zoo.kernels import bucket

    table = bucket.CONFIGS[arch, kind]
    warps = (4, 8) if dim <= 64 else (8, 4)
    best = None
    for block in _BUCKET_BLOCKS[kind]:
        for w in warps:
            for stages in (2, 1):
                candidate = bucket.BucketConfig(block, w, stages)
                total = 0.0
                for mode in ("lsh-causal", "routing"):
                    case = Case(arch, mode, _TUNE_PRECISION[kind], dim, "plain")
                    for kernel in ("fwd", "dq", "dkdv"):
                        total += _try(case, kernel,
                                      lambda c=candidate: table.__setitem__(dim, c))
                if best is None or total < best[0]:
                    best = (total, candidate)
                if total == 0:
                    table[dim] = candidate
                    return candidate, 0.0
    table[dim] = best[1]
    return best[1], best[0]


def tune_selection(arch: int, kind: str, dim: int):
    """The selection kernel's `SelectionConfig`: the first keys per step in `_BUCKET_BLOCKS`
    order whose forward and backward kernels meet `SPILL_GOAL` at units 64 and 1, each kernel
    taking the first warps and stages that do; else the fewest spill bytes."""
    from attn_zoo.kernels import selection

    table = selection.CONFIGS[arch, kind]
    unit_cases = [Case(arch, "selection", _TUNE_PRECISION[kind], dim, "plain", unit)
                  for unit in (64, 1)]
    warps = (4, 8) if dim <= 64 else (8, 4)
    best = None
    for block_n in _BUCKET_BLOCKS[kind]:
        config = selection.SelectionConfig(block_n, 4, 2, 4, 1)
        total = 0.0
        for kernel, options in (
            ("fwd", [dict(fwd_warps=w, fwd_stages=s) for w in warps for s in (2, 1)]),
            ("bwd", [dict(bwd_warps=w, bwd_stages=s) for w in warps for s in (1, 2)]),
        ):
            spills, config = _first_without_spills(
                config, options, lambda c, k=kernel: sum(
                    _try(case, k, lambda: table.__setitem__(dim, c)) for case in unit_cases))
            total += spills
        if best is None or total < best[0]:
            best = (total, config)
        if total == 0:
            break
    table[dim] = best[1]
    return best[1], best[0]


_TUNERS = {"block_sparse": tune_block_sparse, "bucket": tune_bucket,
           "selection": tune_selection}


def _tune_task(task: tuple[str, int, str, int]):
    family, arch, kind, dim = task
    return task, *_TUNERS[family](arch, kind, dim)


def tune(archs: Sequence[int], jobs: int, families: Sequence[str] = tuple(_TUNERS)) -> str:
    """Tune every (family, arch, precision kind, padded head dim); the tables as Python."""
    tasks = [(family, arch, kind, dim) for family in families
             for arch in archs for kind in ("16bit", "tf32", "ieee") for dim in (16, 32, 64, 128)]
    with _pool(jobs) as pool:
        results = list(pool.map(_tune_task, tasks))
    return "\n".join(f"{task}: {config}  # spill bytes over the goal: {spills:g}"
                      for task, config, spills in results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("full", "ci"), default="full",
                        help="default: %(default)s")
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCHS),
                        help="compute capabilities, e.g. 80 90; default: %(default)s")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes; default: the CPU count")
    parser.add_argument("--out", type=Path, default=OUT, help="default: %(default)s")
    parser.add_argument("--tune", action="store_true",
                        help="search the launchers' configuration tables and print them")
    parser.add_argument("--kernels", nargs="+", choices=tuple(_TUNERS), default=list(_TUNERS),
                        help="with --tune: the tables to search; default: all")
    args = parser.parse_args(argv)
    unknown = [arch for arch in args.archs if arch not in SHARED_LIMITS]
    if unknown:
        parser.error(f"--archs must be among {sorted(SHARED_LIMITS)}, got {unknown}")
    if args.tune:
        print(tune(args.archs, args.jobs, args.kernels))
        return 0
    start = time.perf_counter()
    rows = run(args.subset, args.archs, args.jobs)
    layouts = layout_rows() if args.subset == "full" else []
    path = write(rows, args.out, args.subset, args.archs, layouts)
    bad = failures(rows)
    print(f"{len(rows)} launches compiled in {time.perf_counter() - start:.0f} s, "
          f"{len(bad)} failed; report: {path}")
    for row in bad:
        print(f"  sm_{row.arch} {row.kernel} {row.precision} d={row.head_dim} {row.flags}: "
              f"{row.status} {row.error}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
