"""Set up this checkout's virtual environment and run a job in it (standard library only).

    python3 -m experiments.bootstrap sweep    # the main job: the default sweep and its report
    python3 -m experiments.bootstrap test     # the whole test suite (extra args go to pytest)

The first run creates `.venv/` beside pyproject.toml and installs attn-zoo into it, editable,
with its dev extra and its bench extra (the peers the speed app measures, so that their tests
run), and Triton 3.6 apart in `.venv/triton-3.6/` (the version the GPU machines carry), for
the test that compiles the kernels natively with it too. torch comes first: on a machine
without a CUDA GPU the CPU build (`torch==2.13.0`, from PyTorch's CPU wheel index when that
index is reachable), never the multi-GB CUDA build. Later runs reuse the environment until
pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
CPU_TORCH = "torch==2.13.0"
CPU_INDEX_HOST = "download.pytorch.org"
CPU_INDEX = f"https://{CPU_INDEX_HOST}/whl/cpu"
COMPAT_TRITON = "triton==3.6.0"
COMPAT_DIR = VENV / "triton-3.6"
JOBS = {
    "sweep": ["-m", "experiments.bench", "-m"],
    "test": ["-m", "pytest", "-q"],
}


def has_cuda_gpu() -> bool:
    """True when `nvidia-smi` lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listing.returncode == 0 and "GPU" in listing.stdout


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def torch_install_args() -> list[str]:
    """pip arguments that install the right torch build for this machine."""
    if has_cuda_gpu():
        return ["torch"]
    if reachable(CPU_INDEX_HOST):
        return [CPU_TORCH, "--index-url", CPU_INDEX]
    # Offline mirrors and wheel caches serve the CPU build under the plain pinned name.
    return [CPU_TORCH]


def python_in_venv() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create and fill `.venv` unless it is already set up for this pyproject.toml."""
    torch_args = torch_install_args()
    stamp_text = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + " ".join(torch_args).encode()
    ).hexdigest()
    stamp = VENV / "attn-zoo.stamp"
    python = python_in_venv()
    if python.exists() and stamp.exists() and stamp.read_text() == stamp_text:
        return python
    print(f"[bootstrap] setting up {VENV} ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=not python.exists()).create(VENV)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *torch_args], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev,bench]"], check=True)
    subprocess.run([*pip, "--no-deps", "--upgrade", "--target", str(COMPAT_DIR), COMPAT_TRITON],
                   check=True)
    stamp.write_text(stamp_text)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in JOBS:
        print(f"usage: python3 -m experiments.bootstrap {{{','.join(JOBS)}}} [args...]",
              file=sys.stderr)
        return 2
    job, extra = argv[0], argv[1:]
    python = ensure_venv()
    return subprocess.run([str(python), *JOBS[job], *extra], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
