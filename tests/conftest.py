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


def padding_mask(batch: int, n: int, seed: int) -> torch.Tensor:
    """(batch, n) bool: random real keys in row 0 with a padded stretch covering whole blocks
    and groups, every key real in row 1, none in the last row."""
    real = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    real[0, 20:45] = False
    real[1] = True
    real[-1] = False
    return real


def check_gradients(out, expected, inputs) -> None:
    """Gradients of `out` and `expected` for one random output gradient agree to 1e-10
    (float64); an input that one of them does not reach counts as a zero gradient."""
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for got, want, x in zip(grads, expected_grads, inputs, strict=True):
        # a conv tap that no query reaches gets no gradient at all from the engine
        got = torch.zeros_like(x) if got is None else got
        want = torch.zeros_like(x) if want is None else want
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def padding(batch: int, n: int, seed: int) -> torch.Tensor:
    """(batch, n) bool, about a quarter padded; the last batch row entirely padded."""
    real = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.25
    real[-1] = False
    return real


def check_shared_qk_gradients(out, expected, q, k, v):
    """Shared-QK variants (lsh, routing): gradients of out and expected for a random output
    gradient agree for q and v; k, which they ignore, gets zero."""
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, v), grad)
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[2], want[1], atol=1e-10, rtol=1e-10)
    assert torch.equal(got[1], torch.zeros_like(k))


def params_id(params: dict) -> str:
    """A test id of a variant's parameters: `bucket_size8-n_hashes3`."""
    return "-".join(f"{key}{value}" for key, value in params.items())


def case_id(case: tuple[str, dict]) -> str:
    """A test id of (variant, parameters): `local-window4`."""
    return case[0] + "-" + params_id(case[1])


def check_static_pattern(attn, n: int) -> None:
    """At length n, bidirectional with GQA and causal: forward and gradients equal the dense
    float64 reference of `attn.pattern`, and `scored_pairs` counts the pattern's pairs."""
    for causal, kv_heads in ((False, 2), (True, 1)):
        check_against_reference(attn, n, causal, kv_heads)
        assert attn.scored_pairs(n, causal) == int(dense_mask(attn.pattern(n, causal), n).sum())


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


def check_memory_is_linear(attn, causal: bool = True, backward: bool = False) -> None:
    """Peak memory of a call (with its backward when `backward`) at N = 1024 and 4096 (B = 1,
    8 heads, D = 32): 4x the length costs about 4x the memory, never an N x N score matrix."""
    from experiments.measure import peak_memory

    def peak(n: int) -> tuple[int, int]:
        q, k, v = (torch.randn(1, 8, n, 32, requires_grad=backward) for _ in range(3))
        if backward:
            return (peak_memory(lambda: attn(q, k, v, causal=causal).sum().backward()),
                    q.numel() * q.element_size())
        with torch.no_grad():
            return peak_memory(lambda: attn(q, k, v, causal=causal)), q.numel() * q.element_size()

    small, _ = peak(1024)
    large, out_bytes = peak(4096)
    assert large / small < 4.5  # 4x the length: 4x the memory, not 16x
    assert large < (40 if backward else 20) * out_bytes  # an N x N matrix alone would be 128x
