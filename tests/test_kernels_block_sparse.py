"""The block-sparse Triton kernel and the `triton` backend, against dense and torch references.

On a CPU-only machine the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay tiny; with a GPU the same tests run natively on it.
"""

from __future__ import annotations

import pytest
import torch
from attn_zoo.kernels.block_sparse import layout_attention, tile_config
from attn_zoo.kernels.launch import capture
from attn_zoo.kernels.layout import build_layout, cached_layout
from conftest import qkv, variant_id

import attn_zoo
from attn_zoo.registry import get

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_VARIANTS = [name for name in attn_zoo.available() if "triton" in get(name).backends
                   and not get(name).content_based]
CASES = [(name, causal) for name in TRITON_VARIANTS
         for causal in ([True] if get(name).causal_only else [False, True])]
# float32 runs in IEEE precision: only summation order separates it from float64.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def random(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def dense_reference(q, k, v, allowed, scale, key_padding_mask=None, key_bias=None):
    """float64 (out, lse) over q (B, Hkv, G, N, D), k, v (B, Hkv, M, D), allowed (N, M)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhgnd,bhmd->bhgnm", q, k) * scale
    if key_bias is not None:
        scores = scores + key_bias.double()[:, None, None, None, :]
    keep = allowed.to(q.device)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return probs @ v[:, :, None], lse


def grads(outputs, inputs, seed=1):
    """Gradients of a random linear function of (out, lse), rows with lse = -inf left out."""
    out, lse = outputs
    gen = torch.Generator().manual_seed(seed)
    weight_out = torch.randn(out.shape, generator=gen).to(out.device)
    weight_lse = torch.randn(lse.shape, generator=gen).to(out.device)
    reached = lse.isfinite()
    loss = (out.double() * weight_out).sum() + torch.where(reached, lse.double() * weight_lse,
                                                           0.0).sum()
    return torch.autograd.grad(loss, inputs)


def assert_close(got, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize(("pad", "bias"), [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dense_reference(pad, bias, dtype):
    # GQA (2 query heads per kv head), odd lengths, cross lengths (N != M), head_dim 24
    # padded to 32, a window plus a global column: full and partial tiles.
    batch, kv_heads, groups, n, m, dim = 2, 1, 2, 37, 45, 24

    def pattern(i, j):
        return ((i - j).abs() <= 6) | (j < 3)

    layout = build_layout(pattern, n, m, 16, 16, DEVICE)
    q = random(batch, kv_heads, groups, n, dim, dtype=dtype)
    k = random(batch, kv_heads, m, dim, dtype=dtype, seed=1)
    v = random(batch, kv_heads, m, dim, dtype=dtype, seed=2)
    real = (torch.rand(batch, m, generator=torch.Generator().manual_seed(3)) > 0.3).to(DEVICE)
    real = real if pad else None
    key_bias = random(batch, m, seed=4) if bias else None
    inputs = [q, k, v] + ([key_bias] if bias else [])
    scale = 0.3
    out, lse = layout_attention(q, k, v, layout, scale=scale, key_padding_mask=real,
                                      key_bias=key_bias)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    allowed = pattern(torch.arange(n)[:, None], torch.arange(m))
    expected = dense_reference(q, k, v, allowed, scale, real, key_bias)
    assert_close(out, expected[0], dtype)
    torch.testing.assert_close(lse.isinf(), expected[1].isinf())
    assert_close(torch.where(lse.isinf(), 0.0, lse), torch.where(expected[1].isinf(), 0.0,
                                                                  expected[1]), dtype)
    for got, want in zip(grads((out, lse), inputs), grads(expected, inputs), strict=True):
        assert_close(got, want, dtype)


def test_rows_without_keys_are_zero_with_finite_gradients():
    n, dim = 40, 16

    def pattern(i, j):  # rows 0..19 see no key; rows 20.. see keys j <= i - 20
        return j <= i - 20

    layout = build_layout(pattern, n, n, 16, 16, DEVICE)
    q, k, v = random(1, 1, 1, n, dim), random(1, 1, n, dim, seed=1), random(1, 1, n, dim, seed=2)
    real = torch.zeros(1, n, dtype=torch.bool, device=DEVICE)
    real[:, 10:15] = True  # rows 20..29 see padded keys only, rows 30.. see real ones
    out, lse = layout_attention(q, k, v, layout, scale=0.25, key_padding_mask=real)
    empty = torch.arange(n) < 30
    assert torch.all(out[0, 0, 0, empty.to(DEVICE)] == 0)
    assert torch.all(lse[0, 0, 0, empty.to(DEVICE)] == float("-inf"))
    assert torch.isfinite(lse[0, 0, 0, ~empty.to(DEVICE)]).all()
    grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (grad_q, grad_k, grad_v))
    assert torch.all(grad_q[0, 0, 0, empty.to(DEVICE)] == 0)


@pytest.mark.parametrize(("name", "causal"), CASES, ids=[variant_id(case) for case in CASES])
def test_triton_backend_matches_torch_backend(name, causal):
    n = 77
    q, k, v = (x.to(DEVICE).requires_grad_() for x in qkv(batch=1, q_heads=2, kv_heads=1, n=n,
                                                           dim=24, seed=5))
    real = torch.rand(1, n, generator=torch.Generator().manual_seed(6)) > 0.2
    real = real.to(DEVICE)
    outputs = {}
    for backend in ("torch", "triton"):
        attn = attn_zoo.build(name, backend=backend, **get(name).Params.tiny()).to(DEVICE)
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        params = [q, k, v, *attn.parameters()]
        gen = torch.Generator().manual_seed(7)
        weight = torch.randn(out.shape, generator=gen).to(DEVICE)
        outputs[backend] = (out, *torch.autograd.grad((out * weight).sum(), params))
    for got, expected in zip(outputs["triton"], outputs["torch"], strict=True):
        assert_close(got, expected, torch.float32)


def test_full_cross_attention_is_bottom_right_aligned():
    q = random(1, 2, 21, 16)
    k, v = random(1, 1, 50, 16, seed=1), random(1, 1, 50, 16, seed=2)
    expected = attn_zoo.build("full", backend="torch")(q, k, v, causal=True)
    got = attn_zoo.build("full", backend="triton")(q, k, v, causal=True)
    assert_close(got, expected, torch.float32)


def test_compressive_conv_weights_get_gradients():
    params = {**get("compressive").Params.tiny(), "compress": "conv"}
    q, k, v = (x.to(DEVICE) for x in qkv(batch=1, q_heads=1, kv_heads=1, n=50, dim=16))
    grads_by_backend = []
    for backend in ("torch", "triton"):
        attn = attn_zoo.build("compressive", backend=backend, **params).to(DEVICE)
        with torch.no_grad():
            attn.key_conv.copy_(torch.tensor([0.2, 0.9]))
        out = attn(q, k, v, causal=True)
        grads_by_backend.append(torch.autograd.grad(out.square().sum(), list(attn.parameters())))
    for got, expected in zip(*grads_by_backend, strict=True):
        assert_close(got, expected, torch.float32)
        assert got.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_keeps_low_precision_inputs(dtype):
    q, k, v = (x.to(DEVICE, dtype) for x in qkv(batch=1, q_heads=2, kv_heads=2, n=40, dim=32))
    attn = attn_zoo.build("local", backend="triton", window=5)
    out = attn(q, k, v, causal=True)
    expected = attn_zoo.build("local", backend="torch", window=5)(q.double(), k.double(),
                                                                  v.double(), causal=True)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


def test_custom_op_traces_under_torch_compile():
    n, dim = 20, 16
    layout = cached_layout(("test-compile",), lambda i, j: j <= i, n, n, 16, 16, DEVICE)
    q, k, v = random(1, 1, 2, n, dim), random(1, 1, n, dim, seed=1), random(1, 1, n, dim, seed=2)
    key_bias = random(1, n, seed=3)

    def loss(q, k, v, key_bias):
        out, lse = layout_attention(q, k, v, layout, scale=0.5, key_bias=key_bias)
        return out.square().sum() + lse.sum()

    expected = torch.autograd.grad(loss(q, k, v, key_bias), (q, k, v, key_bias))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, key_bias), (q, k, v, key_bias))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    args = (q.detach(), k.detach(), v.detach(), *layout.tensors(), None, key_bias.detach(),
            0.5, 16, 16)
    torch.library.opcheck(torch.ops.attn_zoo.block_sparse_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_variant_on_triton_compiles_with_fullgraph_once_its_layout_is_built():
    attn = attn_zoo.build("local", window=5, backend="triton")
    q, k, v = (x.to(DEVICE).requires_grad_() for x in qkv(batch=1, q_heads=2, kv_heads=1, n=40,
                                                           dim=16))
    expected = attn(q, k, v, causal=True)  # eager: builds and caches the layout
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, causal=True), fullgraph=True,
                             backend="aot_eager")
    got = compiled(q, k, v)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0],
                               torch.autograd.grad(expected.sum(), q)[0])


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    q, k, v = qkv(batch=1, q_heads=1, kv_heads=1, n=8, dim=16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device or "
                                         "TRITON_INTERPRET=1, got tensors on cpu"):
        attn_zoo.build("local", backend="triton")(q, k, v)


def test_triton_backend_rejects_what_the_kernel_cannot_run():
    attn = attn_zoo.build("local", backend="triton")
    q, k, v = (x.to(DEVICE) for x in qkv(batch=1, q_heads=1, kv_heads=1, n=8, dim=16))
    with pytest.raises(TypeError, match="backend 'triton' takes float32, bfloat16 or float16, "
                                        "got torch.float64"):
        attn(q.double(), k.double(), v.double())
    q, k, v = (x.to(DEVICE) for x in qkv(batch=1, q_heads=1, kv_heads=1, n=8, dim=20))
    with pytest.raises(ValueError, match="head_dim a multiple of 8 in 8..128, got 20"):
        attn(q, k, v)


def test_auto_prefers_the_kernel_on_cuda_except_for_full():
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    with capture(90):  # configured as an H100 would be, on any machine
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert attn_zoo.build("local").resolve_backend(cuda, dtype, 64) == "triton"
        assert attn_zoo.build("full").resolve_backend(cuda, bf16, 64) == "torch"
        assert attn_zoo.build("full", backend="triton").resolve_backend(cuda, bf16, 64) == "triton"
        # What the kernels cannot run natively goes to FlexAttention (or torch).
        assert attn_zoo.build("local").resolve_backend(cuda, torch.float64, 64) == "flex"
        assert attn_zoo.build("local").resolve_backend(cuda, bf16, 20) == "flex"
        assert attn_zoo.build("hierarchical").resolve_backend(cuda, bf16, 20) == "torch"
    with capture(75):  # no checked configuration for sm_75
        assert attn_zoo.build("local").resolve_backend(cuda, bf16, 64) == "flex"
    assert attn_zoo.build("local").resolve_backend(cpu, bf16, 64) == "torch"
    assert tile_config(torch.float32, 24, cpu).block_m % 16 == 0


def test_an_architecture_without_a_checked_config_is_refused_by_name():
    q, k, v = qkv(batch=1, q_heads=1, kv_heads=1, n=8, dim=16)
    with capture(75), pytest.raises(ValueError, match="no checked configuration for compute "
                                                      "capability 7.5"):
        attn_zoo.build("local", backend="triton")(q, k, v)


@pytest.mark.parametrize(("name", "causal"), CASES, ids=[variant_id(case) for case in CASES])
@pytest.mark.parametrize("target", ["k", "v"])
def test_triton_backend_keeps_non_finite_keys_to_the_rows_that_see_them(name, causal, target):
    """inf in one key's k, or NaN in its v, changes only the rows whose output depends on
    that key (found by giving its value two finite values); the others stay finite and
    unchanged (the forward kernel's repair pass)."""
    attn = attn_zoo.build(name, backend="triton", **get(name).Params.tiny())
    q, k, v = (x.to(DEVICE) for x in qkv(batch=1, q_heads=2, kv_heads=1, n=40, dim=16))
    other = v.clone()
    other[..., 39, :] += 3.0
    bad_k, bad_v = k.clone(), v.clone()
    if target == "k":
        bad_k[..., 39, :] = float("inf")
    else:
        bad_v[..., 39, :] = float("nan")
    with torch.no_grad():
        base = attn(q, k, v, causal=causal)
        reached = (base - attn(q, k, other, causal=causal)).abs().amax(-1) > 0
        out = attn(q, bad_k, bad_v, causal=causal)
    assert out[~reached].isfinite().all()
    assert_close(out[~reached], base[~reached], torch.float32)




@pytest.mark.parametrize("target", ["k", "v"])
def test_kernel_gradients_keep_non_finite_keys_to_the_rows_that_see_them(target):
    """inf in one key's k, or NaN in its v: dq of the rows that do not see that key, and dk,
    dv and d key_bias of the keys that none of its rows sees, are finite and as with a finite
    value there (the backward kernels' repair launches; partial tiles on both sides)."""
    n, dim, bad = 45, 24, 20

    def pattern(i, j):
        return ((i - j).abs() <= 6) | (j < 3)

    layout = build_layout(pattern, n, n, 16, 16, DEVICE)
    q = random(1, 1, 2, n, dim)
    k, v = random(1, 1, n, dim, seed=1), random(1, 1, n, dim, seed=2)
    key_bias = random(1, n, seed=3)
    bad_k, bad_v = k.detach().clone(), v.detach().clone()
    if target == "k":
        bad_k[..., bad, :] = float("inf")
    else:
        bad_v[..., bad, :] = float("nan")
    results = []
    for k_in, v_in in ((k, v), (bad_k.requires_grad_(), bad_v.requires_grad_())):
        out, _ = layout_attention(q, k_in, v_in, layout, scale=0.3, key_bias=key_bias)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        results.append(torch.autograd.grad((out * weight).sum(), (q, k_in, v_in, key_bias)))
    allowed = pattern(torch.arange(n)[:, None], torch.arange(n)).to(DEVICE)
    reached = allowed[:, bad]
    unseen = ~allowed[reached].any(0)
    assert reached.any() and unseen.any() and (~reached).any()
    (base_q, *base_keys), (grad_q, *grad_keys) = results
    assert grad_q[..., reached, :].isnan().all()
    assert_close(grad_q[..., ~reached, :], base_q[..., ~reached, :], torch.float32)
    for got, expected in zip(grad_keys, base_keys, strict=True):
        assert_close(got[..., unseen, :] if got.dim() > 2 else got[..., unseen],
                     expected[..., unseen, :] if got.dim() > 2 else expected[..., unseen],
                     torch.float32)
