"""The first run on a CUDA machine, in one command: kernel tests, native compile check, benchmark.

    python -m experiments.gpu_first_run                  # ~10 minutes at the default timeouts
    python -m experiments.gpu_first_run --bench-timeout 500 --bench-args "attention=local,full"
    python -m experiments.gpu_first_run --device cpu     # trying it without a GPU

Steps, each a subprocess from the repository root with its own timeout; a step that fails or
times out is recorded and the next one still runs:

1. `tests`: `pytest -q` on the kernel tests (`TEST_FILES`). On CUDA they run natively: the
   tests put their tensors on the GPU when one is visible (and set `TRITON_INTERPRET=1` only
   when none is). On CUDA, `TRITON_INTERPRET` is removed from every step's environment, so a
   value left in the shell cannot send a GPU run, or the compile check, to the interpreter.
2. `compile_check`: `python -m attn_zoo.kernels.compile_check --subset <--compile-subset>
   --archs <this GPU's compute capability and the check's default archs> --out
   <out>/compile_check` (it writes `compile_check.md` there and exits non-zero on a failure).
3. `bench`: `python -m experiments.bench -m bench=gpu_quick out_dir=<out>/gpu_bench
   max_minutes=<3/4 of the step's timeout> <--bench-args>` (Hydra overrides): it stops
   starting lengths in time to write its report; rerun that command to measure the rest (it
   resumes).

Everything goes under `<out>` = `results/<gpu name>/` of the checkout (`config.device_slug`
of the device; `results/cpu/` with `--device cpu`): each step's output in
`first_run/<step>.log`, and `first_run.md`, rewritten after every step, with each step's
status, wall time, log, command and, for a failed step, its last log lines.

Exit code: 0 when every step passed, 1 when one failed, 2 (before running anything) when no
CUDA device is visible and `--device cpu` was not given. With `--device cpu` the tests run in
Triton's interpreter (the GPU hidden from them), the compile check compiles for its default
archs, and the bench runs with `device=cpu`, its Triton kernels in the interpreter.

The tests and the compile check import `attn_zoo.kernels`: install the checkout first
(`pip install --no-deps --no-build-isolation -e .`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.config import device_slug
from experiments.results import environment

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_kernels_block_sparse.py", "tests/test_kernels_bucket.py",
              "tests/test_layout.py")
BENCH_MINUTES_SHARE = 0.75
"""The share of the bench step's timeout it may spend starting lengths (`max_minutes`)."""
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Step:
    """One command of the run: its argv, timeout and environment changes (None: unset)."""

    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """How a step ended: `ok`, `failed (exit N)` or `timed out after T s`."""

    step: Step
    status: str
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def compile_archs(device_arch: int) -> list[int]:
    """This device's compute capability and the compile check's default architectures."""
    try:
        from attn_zoo.kernels.compile_check import ARCHS
    except ImportError:  # the compile check step fails with this error and says so in its log
        return [device_arch]
    return sorted({device_arch, *ARCHS})


def default_steps(args: argparse.Namespace, out: Path) -> list[Step]:
    """The three steps of the module docstring, for `args.device`."""
    python = sys.executable
    cuda = args.device == "cuda"
    compile_argv = [python, "-m", "attn_zoo.kernels.compile_check", "--subset",
                    args.compile_subset, "--out", str(out / "compile_check")]
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        compile_argv += ["--archs", *map(str, compile_archs(10 * major + minor))]
    bench_minutes = args.bench_timeout * BENCH_MINUTES_SHARE / 60
    bench_argv = [python, "-m", "experiments.bench", "-m", "bench=gpu_quick",
                  f"out_dir={out / 'gpu_bench'}", f"max_minutes={bench_minutes:.3g}",
                  *([] if cuda else ["device=cpu"]), *shlex.split(args.bench_args)]
    native = {"TRITON_INTERPRET": None}
    # On a CPU the tests run in the interpreter, any GPU hidden from their device choice.
    test_env = native if cuda else {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    bench_env = native if cuda else {"TRITON_INTERPRET": "1"}
    return [Step("tests", [python, "-m", "pytest", "-q", *args.tests], args.tests_timeout,
                 test_env),
            Step("compile_check", compile_argv, args.compile_timeout, native),
            Step("bench", bench_argv, args.bench_timeout, bench_env)]


def run_step(step: Step, log: Path) -> StepResult:
    """Run `step` from the repository root, its stdout and stderr into `log`; on timeout its
    whole process group (compiler workers included) is killed."""
    env = dict(os.environ)
    for name, value in step.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    log.parent.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    with open(log, "w") as handle:
        handle.write(f"$ {shlex.join(step.argv)}\n")
        handle.flush()
        process = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=step.timeout_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            kill_group(process)
            status = f"timed out after {step.timeout_s:g} s"
        except BaseException:  # Ctrl-C: its own session does not get the signal
            kill_group(process)
            raise
    return StepResult(step, status, time.monotonic() - begin, log)


def kill_group(process: subprocess.Popen) -> None:
    """Kill the process group a step leads (it started its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def command(argv: Sequence[str]) -> str:
    """`argv` as a shell line for the summary: this interpreter shown as `python`, paths in the
    checkout relative to it (the steps run from its root)."""
    words = ["python", *argv[1:]] if argv[0] == sys.executable else list(argv)
    return shlex.join(word.replace(f"{ROOT}/", "") for word in words)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_summary(path: Path, results: Sequence[StepResult], pending: Sequence[Step],
                  facts: dict[str, str]) -> None:
    """`first_run.md`: the setting, a table row per step (pending ones too), failed log tails."""
    lines = [f"# First run on {facts['device_name']}", "",
             f"torch {facts['torch_version']}, triton {facts['triton_version'] or 'n/a'}, CUDA "
             f"{facts['cuda_version'] or 'n/a'}, commit {facts['commit']}, started "
             f"{facts['timestamp']}. Command: `python -m experiments.gpu_first_run "
             f"{facts['argv']}`.", "",
             "| step | status | wall s | log | command |", "|---|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result.step.name} | {result.status} | {result.seconds:.1f} | "
                     f"`{result.log.relative_to(path.parent)}` | "
                     f"`{command(result.step.argv)}` |")
    lines += [f"| {step.name} | not run yet | | | `{command(step.argv)}` |"
              for step in pending]
    for result in results:
        if not result.ok:
            lines += ["", f"## {result.step.name}: {result.status}", "", "```",
                      log_tail(result.log), "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; another GPU: set CUDA_VISIBLE_DEVICES) or cpu, to "
                             "try the run without a GPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/<gpu name>)")
    parser.add_argument("--tests", nargs="+", default=list(TEST_FILES),
                        help="test files or node ids for pytest (default: %(default)s)")
    parser.add_argument("--compile-subset", choices=("ci", "full"), default="ci",
                        help="the compile check's matrix (default: %(default)s)")
    parser.add_argument("--bench-args", default="",
                        help='more Hydra overrides for experiments.bench, one string, e.g. '
                             '"attention=local,full mode=fwd"')
    for step, default in (("tests", 180.0), ("compile", 180.0), ("bench", 300.0)):
        parser.add_argument(f"--{step}-timeout", type=float, default=default,
                            help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    for step in ("tests", "compile", "bench"):
        if not getattr(args, f"{step}_timeout") > 0:
            parser.error(f"--{step}-timeout must be > 0, got {getattr(args, f'{step}_timeout')}")
    return args


def run(args: argparse.Namespace, steps: Sequence[Step] | None = None,
        argv: Sequence[str] = ()) -> int:
    """Run `steps` (default: `default_steps`) in order, rewriting first_run.md after each;
    0 when all passed, 1 otherwise, 2 when the CUDA device is missing."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device is visible (torch {torch.__version__}"
              f"{', a CPU-only build' if torch.version.cuda is None else ''}): this script is "
              "for a GPU machine; `--device cpu` tries it on the CPU instead", file=sys.stderr)
        return 2
    # Absolute: the steps run from the repository root, wherever this was started.
    out = (args.out or ROOT / "results" / device_slug(args.device)).resolve()
    steps = list(default_steps(args, out) if steps is None else steps)
    facts = {key: str(value) for key, value in environment(device).items()}
    facts["argv"] = shlex.join(argv)
    summary = out / "first_run.md"
    results: list[StepResult] = []
    for index, step in enumerate(steps):
        print(f"[{index + 1}/{len(steps)}] {step.name}: {shlex.join(step.argv)}", flush=True)
        result = run_step(step, out / "first_run" / f"{step.name}.log")
        results.append(result)
        write_summary(summary, results, steps[index + 1:], facts)
        print(f"    {result.status} in {result.seconds:.1f} s, log {result.log}", flush=True)
    failed = [result.step.name for result in results if not result.ok]
    print(f"summary: {summary}" + (f"; failed: {', '.join(failed)}" if failed else
                                   "; every step passed"), flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_args(argv), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
