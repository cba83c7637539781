"""The selection kernel (attn_zoo.kernels.selection) against a dense float64 reference of its
rule: forward, lse and the gradients of q, k and v, for gathered units (unit 1, unit 3) and
block units (16, 32), shared selections (G > 1), GQA, causal and not, cross lengths, key
padding, empty slots, rows without keys, N not a multiple of the unit, three dtypes, int32
and int64 index; against the torch op (attn_zoo.selection); a `torch.compile(fullgraph=True)`
trace; bad input.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so the shapes stay small; with a GPU the same tests run natively."""

from __future__ import annotations

import pytest
import torch
from attn_zoo.kernels.selection import selection_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 runs in IEEE precision: only summation order separates it from float64.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def random(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def random_index(batch, heads, n, slots, units, empty=0.25, seed=3):
    """(B, H, N, S) int64: distinct units per row, about `empty` of the slots -1."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(units, generator=gen)[:slots]
                        for _ in range(batch * heads * n)])
    rows[torch.rand(rows.shape, generator=gen) < empty] = -1
    return rows.view(batch, heads, n, slots).to(DEVICE)


def reference(q, k, v, index, unit, scale, causal, key_padding_mask):
    """float64 (out, lse) of the rule: query i of selection head h sees key j when j's unit
    j // unit is listed in its row, j <= i + M - N (causal) and j is a real key."""
    n, m = q.shape[3], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    j = torch.arange(m, device=q.device)
    listed = ((index[..., None] == (j // unit)) & (index[..., None] >= 0)).any(-2)  # B H N M
    keep = listed[:, :, None]
    if causal:
        keep = keep & (j <= torch.arange(n, device=q.device)[:, None] + m - n)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, None, :]
    scores = torch.einsum("bhgnd,bhmd->bhgnm", q, k) * scale
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
    loss = (out.double() * weight_out).sum() + torch.where(lse.isfinite(),
                                                           lse.double() * weight_lse, 0.0).sum()
    return torch.autograd.grad(loss, inputs)


def check(batch, heads, kv_heads, groups, n, m, dim, unit, slots, causal, pad,
          dtype=torch.float32, index_dtype=torch.int64):
    q = random(batch, heads, groups, n, dim, dtype=dtype)
    k = random(batch, kv_heads, m, dim, dtype=dtype, seed=1)
    v = random(batch, kv_heads, m, dim, dtype=dtype, seed=2)
    index = random_index(batch, heads, n, slots, -(-m // unit)).to(index_dtype)
    real = None
    if pad:
        real = (torch.rand(batch, m, generator=torch.Generator().manual_seed(4)) > 0.3)
        real[-1] = False  # a batch row of padding only: every row of it sees no key
        real = real.to(DEVICE)
    scale = dim ** -0.5
    out, lse = selection_attention(q, k, v, index, unit=unit, scale=scale, causal=causal,
                                   key_padding_mask=real)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    expected = reference(q, k, v, index, unit, scale, causal, real)
    tol = dict(atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    torch.testing.assert_close(out.double(), expected[0], **tol)
    assert torch.equal(lse.isinf(), expected[1].isinf())
    assert expected[1].isinf().any() and expected[1].isfinite().any()  # both kinds of row
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0.0),
                               expected[1].nan_to_num(neginf=0.0), **tol)
    assert torch.all(out[lse.isinf()] == 0)
    for label, got, want in zip("qkv", grads((out, lse), (q, k, v)),
                                grads(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(got.double(), want.double(), **tol,
                                   msg=lambda text, label=label: f"grad {label}: {text}")


# (batch, heads, kv_heads, groups, n, m, dim, unit, slots, causal, pad). The interpreter steps
# through 16 keys at a time: 20 and 18 gathered entries take two steps, a unit of 32 keys two.
CASES = [
    pytest.param(1, 2, 2, 1, 21, 21, 16, 1, 20, True, False, id="unit1-G1-causal"),
    pytest.param(2, 2, 1, 3, 19, 19, 24, 1, 5, False, True, id="unit1-G3-gqa-pad"),
    pytest.param(1, 2, 1, 2, 26, 20, 16, 3, 6, True, False, id="unit3-cross-causal"),
    pytest.param(2, 2, 1, 2, 40, 40, 16, 16, 2, True, True, id="unit16-G2-gqa-causal-pad"),
    pytest.param(1, 1, 1, 1, 37, 37, 8, 16, 2, False, False, id="unit16-G1"),
    pytest.param(2, 1, 1, 3, 12, 70, 16, 32, 2, True, True, id="unit32-cross-causal-pad"),
]


@pytest.mark.parametrize("batch,heads,kv_heads,groups,n,m,dim,unit,slots,causal,pad", CASES)
def test_kernel_matches_dense_reference(batch, heads, kv_heads, groups, n, m, dim, unit, slots,
                                        causal, pad):
    check(batch, heads, kv_heads, groups, n, m, dim, unit, slots, causal, pad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unit", [1, 16])
def test_half_precision_matches_dense_reference(dtype, unit):
    check(2, 2, 1, 2, 33, 33, 16, unit, 4 if unit == 1 else 2, True, True, dtype=dtype,
          index_dtype=torch.int32)


@pytest.mark.parametrize("unit,slots", [(1, 20), (16, 2)])
def test_kernel_matches_torch_op(unit, slots):
    from attn_zoo.selection import selection_attention as torch_selection

    q, k, v = random(2, 2, 2, 40, 16), random(2, 1, 40, 16, seed=1), random(2, 1, 40, 16, seed=2)
    index = random_index(2, 2, 40, slots, -(-40 // unit))
    real = (torch.rand(2, 40, generator=torch.Generator().manual_seed(4)) > 0.3).to(DEVICE)
    options = dict(unit=unit, scale=0.25, causal=True, key_padding_mask=real)
    got = selection_attention(q, k, v, index, **options)
    expected = torch_selection(q, k, v, index, **options)
    tol = dict(atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    for x, y in [*zip(got, expected, strict=True),
                 *zip(grads(got, (q, k, v)), grads(expected, (q, k, v)), strict=True)]:
        torch.testing.assert_close(x, y, **tol)


def test_kernel_input_errors():
    q, k = torch.zeros(1, 2, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    index = torch.zeros(1, 2, 8, 2, dtype=torch.long)
    options = dict(unit=4, scale=0.25, causal=True)
    with pytest.raises(TypeError, match="q must be float32, bfloat16 or float16"):
        selection_attention(q.double(), k.double(), k.double(), index, **options)
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        selection_attention(q, k, k, index.float(), **options)
    with pytest.raises(ValueError, match="index must have shape"):
        selection_attention(q, k, k, index[:, :1], **options)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        selection_attention(q[..., :12], k[..., :12], k[..., :12], index, **options)
    with pytest.raises(ValueError, match="k must have shape"):
        selection_attention(q, torch.zeros(1, 3, 8, 16), torch.zeros(1, 3, 8, 16), index,
                            **options)
    with pytest.raises(ValueError, match="unit must be an int >= 1, got 0"):
        selection_attention(q, k, k, index, unit=0, scale=0.25, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask must be a"):
        selection_attention(q, k, k, index, key_padding_mask=torch.ones(1, 8), **options)


def test_kernel_traces_under_torch_compile():
    q, k, v = random(1, 2, 2, 9, 16), random(1, 1, 9, 16, seed=1), random(1, 1, 9, 16, seed=2)
    index = random_index(1, 2, 9, 2, 3)

    def attend(q, k, v):
        out, lse = selection_attention(q, k, v, index, unit=4, scale=0.25, causal=True)
        return (out * out).sum() + lse.nan_to_num(neginf=0.0).sum()

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    results = [(fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v)))
               for fn in (attend, compiled)]
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, atol=TOLERANCE[torch.float32], rtol=1e-5)
