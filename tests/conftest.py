"""Shared helpers: registry-wide cases and random inputs."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in its interpreter; triton reads the switch when a kernel
# is defined, so it is set before anything imports attn_zoo.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import attn_zoo  # noqa: E402
from attn_zoo.reference import dense_mask, reference_attention  # noqa: E402
from attn_zoo.registry import get  # noqa: E402


def causal_modes(name: str) -> list[bool]:
    return [True] if get(name).causal_only else [False, True]


def pytest_configure(config) -> None:
    # Test tensors are small: syncing threads costs more than the work, most on a busy machine.
    torch.set_num_threads(1)


VARIANT_MODES = [(name, causal) for name in attn_zoo.available() for causal in causal_modes(name)]
STATIC_VARIANTS = [name for name in attn_zoo.available() if get(name).static_pattern]


def variant_id(case: tuple[str, bool]) -> str:
    return f"{case[0]}-{'causal' if case[1] else 'bidir'}"


@pytest.fixture(params=VARIANT_MODES, ids=[variant_id(c) for c in VARIANT_MODES])
def variant(request) -> tuple[str, bool]:
    """(name, causal) for every registered variant and every mode it supports."""
    return request.param


def qkv(batch=2, q_heads=4, kv_heads=2, n=33, dim=24, dtype=torch.float32, seed=0,
        requires_grad=False):
    """Random q (B, Hq, N, D), k and v (B, Hkv, N, D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(requires_grad)
            for s in shapes]


def build(name: str, **params):
    """A variant in evaluation mode: stateful variants (routing) hold still between calls."""
    return attn_zoo.build(name, **params).eval()


def call(attn, q, k, v, **kwargs):
    """Call with a fixed torch seed, so variants that draw randomness repeat themselves."""
    torch.manual_seed(1234)
    return attn(q, k, v, **kwargs)


def check_against_reference(attn, n: int, causal: bool, kv_heads: int = 2) -> None:
    """Forward and gradients of `attn` equal the dense float64 reference of its pattern."""
    q, k, v = qkv(q_heads=4, kv_heads=kv_heads, n=n, dtype=torch.float64, seed=n,
                  requires_grad=True)
    real = torch.rand(2, n, generator=torch.Generator().manual_seed(n + 1)) > 0.25
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    allowed = dense_mask(attn.pattern(n, causal), n)
    expected = reference_attention(q, k, v, allowed, key_padding_mask=real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
