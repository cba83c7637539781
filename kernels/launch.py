"""Kernel launches, their target architecture, and a compile-only mode that records them.

Every launcher in `attn_zoo.kernels` starts its kernels through `launch` and picks its
configuration for `target_arch(device)`, from a table keyed by architecture family
(`ARCH_FAMILIES`), matmul precision (`PRECISIONS`) and padded head dim. Inside
`capture(arch)`, launchers called on CPU tensors choose the configuration a CUDA device of
compute capability `arch` would get, and `launch` records each kernel with the exact
arguments of that real launch instead of running it: the native compile check
(`attn_zoo.kernels.compile_check`) compiles what a GPU would.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import triton


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the jitted kernel, its grid and its arguments."""

    kernel: Any  # triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


_capturing: list[tuple[int, list[Launch]]] = []  # the innermost capture last


@contextmanager
def capture(arch: int) -> Iterator[list[Launch]]:
    """Record launches instead of running them, configured for compute capability `arch`
    (80 = A100, 90 = H100/H200); yields the list the launches are appended to. The outputs
    of captured calls are allocated but never written."""
    launches: list[Launch] = []
    _capturing.append((arch, launches))
    try:
        yield launches
    finally:
        _capturing.pop()


def target_arch(device: torch.device) -> int | None:
    """Compute capability the launch is compiled for (e.g. 90), or None in the interpreter."""
    if _capturing:
        return _capturing[-1][0]
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return _cuda_arch(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_arch(index: int) -> int:
    """Compute capability of CUDA device `index`, read once per process."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, or its record inside `capture`."""
    if _capturing:
        _capturing[-1][1].append(Launch(kernel, tuple(grid), args, kwargs))
    else:
        kernel[grid](*args, **kwargs)


ARCH_FAMILIES = {80: (80, 90), 90: (90, 100), 100: (100, 120)}
"""Compute capabilities [low, high) each family's kernel configurations serve. The sm_80
configs fit the smallest shared memory of their family (sm_86/89: 99 KB); sm_120 (consumer
Blackwell) and anything before sm_80 have no checked configuration."""

PRECISIONS = ("ieee", "tf32", "16bit")
"""float32 in IEEE precision, float32 on TF32 tensor cores, bfloat16/float16."""


def arch_family(arch: int) -> int:
    """The family (a key of `ARCH_FAMILIES`) serving compute capability `arch`, e.g. 86 -> 80;
    a ValueError for an architecture without checked kernel configurations."""
    for family, (low, high) in ARCH_FAMILIES.items():
        if low <= arch < high:
            return family
    raise ValueError(f"attn_zoo's Triton kernels have no checked configuration for compute "
                     f"capability {arch // 10}.{arch % 10}; checked: sm_80 to sm_89, sm_90 to "
                     f"sm_99, sm_100 to sm_119")


def precision(dtype: torch.dtype) -> str:
    """The kernels' matmul precision for `dtype`: float32 runs in IEEE precision unless
    `torch.set_float32_matmul_precision("high")` (or "medium") allows TF32, as it does for
    torch's own float32 matmuls."""
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def padded_dim(head_dim: int) -> int:
    """The power-of-two tile width (>= 16) holding `head_dim`."""
    return max(16, triton.next_power_of_2(head_dim))


def inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous: kernels read every other stride in place."""
    return x if x.stride(-1) == 1 else x.contiguous()
