"""The bucket kernels of `lsh` and `routing` (attn_zoo.kernels.bucket) against the torch
backend, itself checked against dense float64 references in tests/variants/: forward and
gradients, odd lengths, one chunk, GQA, padding (a fully padded batch row included), causal
and not, half precision by tolerance, determinism, torch.compile tracing, bad input.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so the shapes stay small; with a GPU the same tests run natively."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build, call, qkv

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def padding(batch: int, n: int, seed: int = 7) -> torch.Tensor:
    """(batch, n) bool, about a quarter padded; the last batch row entirely padded."""
    real = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.25
    real[-1] = False
    return real


def run(attn, q, k, v, causal, mask):
    """Output and the gradients of q, k, v for a fixed random output weight."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = call(attn, q, k, v, causal=causal, key_padding_mask=mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out, *grads


def compare_backends(name, params, *, n, heads, dim, causal, padded, device, dtype=None,
                     tolerance=FLOAT32):
    """Triton backend (inputs in `dtype`) against the torch backend (float32 inputs holding
    the same values): output and gradients."""
    q_heads, kv_heads = heads
    q, k, v = (x.to(device) for x in qkv(2, q_heads, kv_heads, n, dim))
    if dtype is not None:
        q, k, v = (x.to(dtype) for x in (q, k, v))
    mask = padding(2, n).to(device) if padded else None
    expected = run(build(name, backend="torch", **params), q.float(), k.float(), v.float(),
                   causal, mask)
    got = run(build(name, backend="triton", **params), q, k, v, causal, mask)
    for label, x, y in zip(("out", "grad_q", "grad_k", "grad_v"), got, expected, strict=True):
        torch.testing.assert_close(x.float(), y, **tolerance, msg=lambda m, label=label:
                                   f"{name} {params} {label}: {m}")


# (n, bucket_size, n_hashes, causal, padded, (q_heads, kv_heads), head_dim)
LSH_CASES = [
    (75, 16, 2, False, True, (2, 1), 24),  # odd N, a short last chunk, GQA
    (45, 16, 3, True, True, (2, 2), 16),
    (150, 64, 2, False, True, (2, 1), 32),  # chunks of 64 and 22 positions
    (64, 32, 1, False, False, (1, 1), 16),  # two chunks: each looks back to the other
    (33, 8, 2, True, True, (2, 1), 16),  # chunks narrower than a 16-row tile
    (50, 64, 2, True, False, (2, 1), 16),  # one chunk: no look-back
    (1, 16, 2, True, True, (2, 1), 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,bucket_size,n_hashes,causal,padded,heads,dim", LSH_CASES)
def test_lsh_kernel_matches_torch_backend(device, n, bucket_size, n_hashes, causal, padded,
                                          heads, dim):
    compare_backends("lsh", dict(bucket_size=bucket_size, n_hashes=n_hashes, seed=3), n=n,
                     heads=heads, dim=dim, causal=causal, padded=padded, device=device)


# (n, n_clusters, window, causal, padded, (q_heads, kv_heads), head_dim)
ROUTING_CASES = [
    (97, 4, None, True, True, (2, 1), 24),  # window 25: a padded 32-row tile
    (97, 3, 40, False, True, (2, 2), 16),
    (70, 2, 70, True, False, (2, 1), 16),  # two 64-row blocks per cluster: block skipping
    (1, 2, None, True, True, (2, 1), 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,n_clusters,window,causal,padded,heads,dim", ROUTING_CASES)
def test_routing_kernel_matches_torch_backend(device, n, n_clusters, window, causal, padded,
                                              heads, dim):
    compare_backends("routing", dict(n_clusters=n_clusters, window=window), n=n, heads=heads,
                     dim=dim, causal=causal, padded=padded, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,params", [("lsh", dict(bucket_size=16, n_hashes=2)),
                                         ("routing", dict(n_clusters=3))])
def test_bfloat16_inputs_match_float32_torch_backend(device, name, params):
    compare_backends(name, params, n=45, heads=(2, 1), dim=16, causal=True, padded=True,
                     device=device, dtype=torch.bfloat16, tolerance=dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("device", DEVICES)
def test_lsh_hashing_follows_seed_and_rng_like_torch_backend(device):
    q, k, v = (x.to(device) for x in qkv(1, 2, 1, 40, 16))
    outs = {}
    for backend in ("torch", "triton"):
        for seed in (None, 3, 4):
            attn = build("lsh", bucket_size=16, n_hashes=2, seed=seed, backend=backend)
            outs[backend, seed] = call(attn, q, k, v, causal=True)  # call fixes the torch RNG
    for seed in (None, 3, 4):
        torch.testing.assert_close(outs["triton", seed], outs["torch", seed], **FLOAT32)
    assert not torch.allclose(outs["triton", 3], outs["triton", 4])


def half_inputs(n, heads, dim, device, seed=0):
    """q, the shared-QK keys k and v, rounded to bfloat16 values, in float32."""
    q, _, v = (x.to(device).bfloat16().float() for x in qkv(2, *heads, n, dim, seed=seed))
    return q, F.normalize(q, dim=-1).bfloat16().float(), v


def kernel_results(kernel, q, k, v, index, **options):
    """out, lse and the gradients of q, k, v (from weighted out and lse) of a kernel call."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = kernel(q, k, v, index, **options)
    gen = torch.Generator().manual_seed(9)
    loss = ((out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
            + (lse.masked_fill(lse == float("-inf"), 0.0)
               * torch.randn(lse.shape, generator=gen).to(lse.device)).sum())
    return out, lse, *torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["lsh", "routing"])
def test_half_precision_kernels_match_float32(device, dtype, layout):
    from attn_zoo.kernels.bucket import lsh_attention, routing_attention

    n, heads, dim = 37, (1, 1), 24
    q, k, v = half_inputs(n, heads, dim, device)
    gen = torch.Generator().manual_seed(1)
    if layout == "lsh":
        kernel, options = lsh_attention, dict(bucket_size=16)
        index = torch.stack([torch.randperm(n, generator=gen) for _ in range(2 * 2)])
        index = index.view(2, 2, 1, n).to(device)
    else:
        kernel, options = routing_attention, {}
        index = torch.stack([torch.randperm(n, generator=gen)[:24].view(3, 8).sort(-1).values
                             for _ in range(2)]).view(2, 1, 3, 8).to(device)
    options.update(causal=True, scale=dim ** -0.5, key_padding_mask=padding(2, n).to(device))
    expected = kernel_results(kernel, q, k, v, index, **options)
    got = kernel_results(kernel, q.to(dtype), k.to(dtype), v.to(dtype), index, **options)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for label, x, y in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), got, expected,
                           strict=True):
        assert (x.float().isinf() == y.isinf()).all(), label
        finite = y.isfinite()
        torch.testing.assert_close(x.float()[finite], y[finite], rtol=2e-2,
                                   atol=2e-2 * y[finite].abs().max().item(),
                                   msg=lambda m, label=label: f"{layout} {label}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_lsh_backward_is_deterministic(device):
    q, k, v = (x.to(device) for x in qkv(1, 2, 1, 40, 16))
    attn = build("lsh", bucket_size=16, n_hashes=2, seed=0, backend="triton")
    first, second = (run(attn, q, k, v, True, None) for _ in range(2))
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_trace_under_torch_compile(device):
    from attn_zoo.kernels.bucket import lsh_attention

    n, dim = 21, 16
    q, _, v = (x.to(device) for x in qkv(1, 2, 1, n, dim))
    order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(r))
                         for r in range(2)]).view(2, 1, 1, n).expand(2, 1, 2, n).to(device)

    def attend(q, v):
        out, lse = lsh_attention(q, F.normalize(q, dim=-1), v, order, 8, causal=True,
                                 scale=dim ** -0.5)
        return out.sum() + lse.sum()

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (attend, compiled):
        q_, v_ = q.clone().requires_grad_(), v.clone().requires_grad_()
        loss = fn(q_, v_)
        results.append((loss, *torch.autograd.grad(loss, (q_, v_))))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, **FLOAT32)


def test_kernel_input_errors():
    from attn_zoo.kernels.bucket import lsh_attention, routing_attention

    q, _, v = qkv(1, 2, 1, 10, 16)
    order = torch.arange(10).expand(1, 1, 2, 10)
    options = dict(causal=False, scale=0.25)
    with pytest.raises(TypeError, match="q must be float32, bfloat16 or float16"):
        lsh_attention(q.double(), q.double(), v.double(), order, 4, **options)
    with pytest.raises(ValueError, match="head_dim must be in 1..128"):
        wide = torch.zeros(1, 2, 10, 136)
        lsh_attention(wide, wide, torch.zeros(1, 1, 10, 136), order, 4, **options)
    with pytest.raises(ValueError, match="order must have shape"):
        lsh_attention(q, q, v, order[0], 4, **options)
    with pytest.raises(TypeError, match="order must be an int32 or int64"):
        lsh_attention(q, q, v, order.float(), 4, **options)
    with pytest.raises(ValueError, match="v must have shape"):
        lsh_attention(q, q, torch.zeros(1, 3, 10, 16), order, 4, **options)
    with pytest.raises(ValueError, match="members must have shape"):
        routing_attention(q, q, v, order[0], **options)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        lsh_attention(q, q, v, order, 4, key_padding_mask=torch.ones(1, 10), **options)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        build("lsh", backend="triton")(q.double(), v.double(), v.double())
