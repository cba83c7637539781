"""`nsa` against a dense float64 reference written from the rule (compressed, selected and
window branches, gates): forward and gradients of q, k, v and the learned weights, mean and mlp
pooling, causal and bidirectional, ties, lengths that are multiples of no block and shorter
than one block, GQA selection sharing, padding, causal leakage, pair counts, bad parameters,
the decode cache, and the Triton backend against torch."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import check_memory_is_linear, padding, qkv

import attn_zoo
from attn_zoo.cache import cache_for
from attn_zoo.reference import reference_attention

CASES = [
    {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "top_n": 4, "window": 6},
    {"cmp_block": 6, "cmp_stride": 2, "sel_block": 10, "top_n": 5, "window": 9},
    {"cmp_block": 4, "cmp_stride": 4, "sel_block": 4, "top_n": 6, "window": 3},
]


def case_id(params: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in params.items())


def reference_selection(importance, n, params, causal):
    """The selected blocks of every row from importance (B, Hs, N, blocks) float64, the rule
    written out row by row: [B][Hs][N] -> set of blocks."""
    block, top_n = params.sel_block, params.top_n
    n_blocks = -(-n // block)
    chosen = []
    for per_batch in importance.tolist():
        rows_of_heads = []
        for per_head in per_batch:
            rows = []
            for i, scores in enumerate(per_head):
                own = i // block
                if causal:
                    candidates = set(range(own + 1))
                    forced = {0, own, own - 1} & candidates
                else:
                    candidates = set(range(n_blocks))
                    forced = {0, own, own - 1 if own > 0 else 1} & candidates
                    if n % block:
                        forced.add(n_blocks - 1)
                size = min(top_n, len(candidates))
                others = sorted(candidates - forced, key=lambda b, s=scores: (-s[b], b))
                rows.append(forced | set(others[:size - len(forced)]))
            rows_of_heads.append(rows)
        chosen.append(rows_of_heads)
    return chosen


def nsa_reference(attn, q, k, v, causal, real=None, sink=None, shared=True, parts=False):
    """Dense float64 NSA from the rule, with the module's learned weights (and `sink`, a null
    key in each branch's softmax). shared=False selects per query head instead of per kv head.
    parts=True also returns the allowed masks (compressed (B, Hq, N, C), selected and window
    (B, Hq, N, N)) for counting pairs."""
    p = attn.params
    batch, q_heads, n, dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    scale = p.scale if p.scale is not None else dim**-0.5
    q, k, v = q.double(), k.double(), v.double()
    real = torch.ones(batch, n, dtype=torch.bool) if real is None else real
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]

    # (1) compressed: whole blocks [c*d, c*d + cmp_block), pooled from their real keys
    length, d = p.cmp_block, p.cmp_stride
    starts = [c * d for c in range(n) if c * d + length <= n]
    pooled_k, pooled_v, pooled_real = [], [], []
    for start in starts:
        keep = real[:, None, start:start + length, None].double()  # (B, 1, l, 1)
        pooled_real.append(real[:, start:start + length].any(1))
        for x, out, kind in ((k, pooled_k, "key"), (v, pooled_v, "value")):
            rows = x[:, :, start:start + length]
            if p.compress == "mean":
                out.append((rows * keep).sum(2) / keep.sum(2).clamp_min(1))
            else:
                weight = getattr(attn, f"{kind}_pool_weight").double()
                position = getattr(attn, f"{kind}_pool_position").double()
                flat = ((rows + position) * keep).flatten(2)  # vec over (l, D)
                out.append(flat @ weight.T)
    count = len(starts)
    if count:
        pooled_k, pooled_v = torch.stack(pooled_k, 2), torch.stack(pooled_v, 2)
        pooled_real = torch.stack(pooled_real, 1)  # (B, C)
    else:
        pooled_k = pooled_v = k.new_zeros(batch, kv_heads, 0, dim)
        pooled_real = torch.zeros(batch, 0, dtype=torch.bool)
    ends = torch.tensor([s + length - 1 for s in starts], dtype=torch.long)
    seen = (ends[None, :] <= i) if causal else torch.ones(n, count, dtype=torch.bool)
    allowed_cmp = seen[None, None] & pooled_real[:, None, None, :]  # (B, 1, N, C)
    out_cmp = reference_attention(q, pooled_k, pooled_v, allowed_cmp, scale=scale, sink=sink)

    # importance: compressed probabilities (no sink) summed over overlapping blocks
    scores = torch.einsum("bhnd,bhcd->bhnc", q,
                          pooled_k.repeat_interleave(groups, 1)) * scale
    scores = scores.masked_fill(~allowed_cmp, -math.inf)
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0).detach()
    sel = p.sel_block
    n_blocks = -(-n // sel)
    overlap = torch.tensor([[float(s < (b + 1) * sel and s + length > b * sel)
                             for b in range(n_blocks)] for s in starts],
                           dtype=torch.float64).reshape(count, n_blocks)
    importance = probs @ overlap  # (B, Hq, N, blocks)
    if shared:
        importance = importance.unflatten(1, (kv_heads, groups)).sum(2)
    chosen = reference_selection(importance, n, p, causal)
    allowed_sel = torch.zeros(batch, q_heads, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(q_heads):
            for row in range(n):
                blocks = chosen[b][h // groups if shared else h][row]
                for block in blocks:
                    allowed_sel[b, h, row, block * sel:(block + 1) * sel] = True
    if causal:
        allowed_sel &= j <= i
    out_sel = reference_attention(q, k, v, allowed_sel, scale=scale, key_padding_mask=real,
                                  sink=sink)

    # (3) window
    w = p.window
    allowed_win = ((j <= i) & (j > i - w)) if causal else ((i - j).abs() < w)
    out_win = reference_attention(q, k, v, allowed_win, scale=scale, key_padding_mask=real,
                                  sink=sink)

    gates = torch.sigmoid(torch.einsum("bhnd,hkd->bhnk", q, attn.gate_weight.double())
                          + attn.gate_bias.double()[None, :, None, :])
    out = gates[..., 0:1] * out_cmp + gates[..., 1:2] * out_sel + gates[..., 2:3] * out_win
    if parts:
        return out, (allowed_cmp.expand(batch, q_heads, n, count), allowed_sel,
                     allowed_win.expand(batch, q_heads, n, n))
    return out


def nsa(compress="mean", seed=0, heads=(4, 2), **params):
    """An nsa module (float64, torch) with random gates and, for mlp, random pooling weights
    near the mean, created for `heads` (query, kv) heads and head_dim 16."""
    attn = attn_zoo.build("nsa", backend="torch", compress=compress, **params).double()
    attn.initialize(*heads, 16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in attn.parameters():
            weight.add_(0.3 * torch.randn(weight.shape, generator=gen, dtype=weight.dtype))
    return attn


def weights(attn):
    return [weight for _, weight in attn.named_parameters()]


def check(attn, q, k, v, causal, real=None):
    """Forward and gradients (q, k, v and every learned weight) against the reference."""
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    expected = nsa_reference(attn, q, k, v, causal, real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    inputs = [q, k, v, *weights(attn)]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    # pooling weights no pooled key uses (N < cmp_block) get no gradient: zero
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    names = ["q", "k", "v", *[name for name, _ in attn.named_parameters()]]
    for name, g, w, x in zip(names, got, want, inputs, strict=True):
        g = torch.zeros_like(x) if g is None else g
        w = torch.zeros_like(x) if w is None else w
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("params", CASES, ids=case_id)
@pytest.mark.parametrize("compress", ["mean", "mlp"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_and_gradients_match_the_reference(params, compress, causal):
    """N = 61 (a multiple of no block), GQA, padding (a padded stretch covering whole blocks,
    the last batch row entirely padded)."""
    attn = nsa(compress, **params)
    q, k, v = qkv(batch=3, n=61, dim=16, dtype=torch.float64, seed=2, requires_grad=True)
    real = padding(3, 61, seed=3)
    real[0, 20:36] = False
    check(attn, q, k, v, causal, real)
    assert torch.equal(attn(q, k, v, causal=causal, key_padding_mask=real)[-1],
                       torch.zeros_like(q[-1]))


@pytest.mark.parametrize("n", [1, 5, 7])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_shorter_than_one_block(n, causal):
    """No compressed key (N < cmp_block) and a single, short selection block."""
    attn = nsa("mlp", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=3)
    q, k, v = qkv(n=n, dim=16, dtype=torch.float64, seed=n, requires_grad=True)
    check(attn, q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_ties_go_to_the_lower_block(causal):
    """Zero keys: every pooled key scores alike, so blocks overlapping as many visible
    compressed blocks tie; the lower index wins, and the output still equals the reference."""
    attn = nsa("mean", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=4)
    q, _, v = qkv(n=64, dim=16, dtype=torch.float64, seed=4, requires_grad=True)
    k = torch.zeros(2, 2, 64, 16, dtype=torch.float64, requires_grad=True)
    check(attn, q, k, v, causal)
    pooled = attn.pool(k, v, None)
    _, lse = attn._compressed(q.detach().unflatten(1, (2, 2)), pooled, causal, 0.25, False)
    index = attn.select(q.detach().unflatten(1, (2, 2)), pooled, lse, torch.arange(64), 64,
                        causal, 0.25)
    # Row 63 sits in block 7: blocks 0, 6 and 7 are forced; blocks 1 .. 5 each overlap three
    # compressed blocks, all visible and equal, so block 1 comes next.
    assert sorted(index[0, 0, 63].tolist()) == [0, 1, 6, 7]


def test_selection_is_shared_by_the_query_heads_of_a_kv_head():
    """Head 0 of the group puts its compressed mass on one block, head 1, more sharply, on
    another: past the rows where either block is forced, the shared selection (summed
    importance) picks head 1's block for both heads, where selecting per head would give
    head 0 its own. The output follows the shared rule."""
    attn = nsa("mean", heads=(2, 1), cmp_block=8, cmp_stride=8, sel_block=8, top_n=4, window=2)
    with torch.no_grad():
        attn.gate_weight.zero_()
    n, dim = 64, 16
    q = torch.zeros(1, 2, n, dim, dtype=torch.float64)
    k = torch.randn(1, 1, n, dim, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64) * 0.1
    v = torch.randn(1, 1, n, dim, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64)
    k[0, 0, 16:24, 0] += 1.0  # block 2 points along axis 0
    k[0, 0, 32:40, 1] += 1.0  # block 4 along axis 1
    q[0, 0, :, 0] = 8.0  # head 0 prefers block 2
    q[0, 1, :, 1] = 16.0  # head 1 prefers block 4, more sharply
    out = attn(q, k, v, causal=True)
    shared = nsa_reference(attn, q, k, v, True)
    per_head = nsa_reference(attn, q, k, v, True, shared=False)
    torch.testing.assert_close(out, shared, atol=1e-10, rtol=1e-10)
    # From row 48 on block 4 is no longer forced: head 1 reads it by its own choice too,
    # head 0 reads it instead of block 2.
    assert not torch.allclose(out[0, 0, 48:], per_head[0, 0, 48:])
    torch.testing.assert_close(out[0, 1, 48:], per_head[0, 1, 48:], atol=1e-10, rtol=1e-10)


def test_padded_keys_never_reach_an_output():
    attn = nsa("mlp", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=6)
    q, k, v = qkv(n=50, dim=16, dtype=torch.float64, seed=7)
    real = torch.rand(2, 50, generator=torch.Generator().manual_seed(8)) > 0.3
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~real[0]] = math.inf  # whatever the padded keys hold
    v2[:, :, ~real[0]] = math.nan
    real[1] = real[0]
    for causal in (False, True):
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        torch.testing.assert_close(attn(q, k2, v2, causal=causal, key_padding_mask=real), out)


def test_no_causal_leakage():
    """Causal: changing q, k or v at position t changes no output before t."""
    attn = nsa("mlp", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=6)
    q, k, v = qkv(n=70, dim=16, dtype=torch.float64, seed=9)
    out = attn(q, k, v, causal=True)
    for t in (0, 31, 69):
        for x in (q, k, v):
            changed = x.clone()
            changed[:, :, t] += 5.0
            args = [changed if y is x else y for y in (q, k, v)]
            torch.testing.assert_close(attn(*args, causal=True)[:, :, :t], out[:, :, :t],
                                       atol=0, rtol=0)


@pytest.mark.parametrize("params", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 7, 40, 61])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_scored_pairs_count_the_reference_pairs(params, n, causal):
    attn = nsa("mean", **params)
    q, k, v = qkv(batch=1, q_heads=4, kv_heads=2, n=n, dim=16, dtype=torch.float64, seed=n)
    _, masks = nsa_reference(attn, q, k, v, causal, parts=True)
    pairs = sum(int(mask[0, 0].sum()) for mask in masks)
    assert attn.scored_pairs(n, causal) == pairs
    assert attn.flops(n, 16, causal) == 4 * 16 * pairs


def test_mlp_starts_as_the_mean():
    mean = attn_zoo.build("nsa", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=6)
    mlp = attn_zoo.build("nsa", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=6,
                         compress="mlp")
    q, k, v = qkv(n=45, dim=16, dtype=torch.float64)
    mean, mlp = mean.double(), mlp.double()
    torch.testing.assert_close(mlp(q, k, v, causal=True), mean(q, k, v, causal=True))
    assert dict(mlp.named_parameters()).keys() == {
        "gate_weight", "gate_bias", "key_pool_weight", "key_pool_position",
        "value_pool_weight", "value_pool_position"}
    assert dict(mean.named_parameters()).keys() == {"gate_weight", "gate_bias"}
    assert mlp.key_pool_weight.shape == (16, 8 * 16) and mlp.gate_weight.shape == (4, 3, 16)


@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_decoding_equals_teacher_forcing(compress):
    """Prefill, single steps and a chunk, with sinks: the causal forward's rows."""
    attn = attn_zoo.build("nsa", cmp_block=8, cmp_stride=4, sel_block=8, top_n=4, window=6,
                          compress=compress, sinks=4).double()
    q, k, v = qkv(n=45, dim=16, dtype=torch.float64, seed=11)
    with torch.no_grad():
        attn.initialize(4, 2, 16)
        for weight in attn.parameters():
            weight.add_(0.3 * torch.randn(weight.shape, dtype=weight.dtype))
        expected = attn(q, k, v, causal=True)
        cache = cache_for(attn)
        outs = [cache.prefill(q[:, :, :6], k[:, :, :6], v[:, :, :6])]
        for t in range(6, 30):
            outs.append(cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
        outs.append(cache.extend(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:]))
    torch.testing.assert_close(torch.cat(outs, 2), expected, atol=1e-12, rtol=1e-12)
    assert len(cache) == 45 + attn.n_pooled(45) and not type(cache).bounded


def test_training_memory_is_linear():
    """Forward and backward at N = 1024 and 4096: no N x N (nor N x N / d) tensor at once."""
    attn = attn_zoo.build("nsa", cmp_block=16, cmp_stride=16, sel_block=16, top_n=4, window=16)
    check_memory_is_linear(attn, causal=True, backward=True)


@pytest.mark.parametrize(("params", "match"), [
    ({"cmp_block": 0}, "cmp_block must be >= 1, got 0"),
    ({"cmp_stride": 0}, "cmp_stride must be >= 1, got 0"),
    ({"cmp_block": 8, "cmp_stride": 16}, r"cmp_stride must be at most cmp_block \(8\)"),
    ({"cmp_stride": 16, "sel_block": 40}, r"sel_block must be a positive multiple of "
                                          r"cmp_stride \(16\), got 40"),
    ({"top_n": 3}, "top_n must be >= 4"),
    ({"window": 0}, "window must be >= 1, got 0"),
    ({"compress": "max"}, "compress must be one of 'mean', 'mlp', got 'max'"),
    ({"cmp_block": 2048}, "cmp_block must be <= 1024, got 2048"),
])
def test_bad_parameters_fail_at_build(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attn_zoo.build("nsa", **params)


KERNEL = importlib.util.find_spec("attn_zoo.kernels.selection") is not None


@pytest.mark.skipif(not KERNEL, reason="the selection kernel (kernels/selection.py) is absent")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_triton_backend_matches_torch(causal):
    """The block-sparse and selection kernels (interpreter on CPU) against the torch backend:
    forward and gradients of q, k, v and the weights, GQA, padding, N a multiple of no
    block."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "top_n": 4, "window": 6,
              "compress": "mlp"}
    torch_attn = attn_zoo.build("nsa", backend="torch", **params).to(device)
    triton_attn = attn_zoo.build("nsa", backend="triton", **params).to(device)
    torch_attn.initialize(2, 1, 16)
    with torch.no_grad():
        for weight in torch_attn.parameters():
            weight.add_(0.3 * torch.randn(weight.shape, device=device))
    triton_attn.load_state_dict(torch_attn.state_dict())
    q, k, v = (x.to(device) for x in qkv(batch=2, q_heads=2, kv_heads=1, n=37, dim=16))
    real = padding(2, 37, seed=5).to(device)
    results = []
    for attn in (torch_attn, triton_attn):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attn(*inputs, causal=causal, key_padding_mask=real)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        results.append([out, *torch.autograd.grad(out, [*inputs, *attn.parameters()], grad)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
