"""Memory that does not depend on machine load: allocation-accurate peaks of `local`."""

from __future__ import annotations

import torch

import attn_zoo
from experiments.measure import peak_memory


def _forward_peak(attn, n: int, grad: bool = False) -> tuple[int, int]:
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=grad) for _ in range(3))
    if grad:
        peak = peak_memory(lambda: attn(q, k, v, causal=True).sum().backward())
    else:
        with torch.no_grad():
            peak = peak_memory(lambda: attn(q, k, v, causal=True))
    return peak, q.numel() * q.element_size()


def test_local_forward_memory_is_linear_and_small():
    attn = attn_zoo.build("local", window=256)
    small, _ = _forward_peak(attn, 4096)
    large, out_bytes = _forward_peak(attn, 16384)
    assert large <= 3 * out_bytes  # the output itself plus at most two outputs' worth
    assert large / small < 4.5  # 4x the length: 4x the memory, not 16x


def test_local_training_memory_is_linear():
    attn = attn_zoo.build("local", window=256)
    small, _ = _forward_peak(attn, 2048, grad=True)
    large, out_bytes = _forward_peak(attn, 8192, grad=True)
    assert large / small < 4.5
    assert large < 12 * out_bytes  # inputs, output, gradients and one chunk: no N x window
