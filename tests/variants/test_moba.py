"""`moba` (Mixture of Block Attention): against a float64 reference written from the rule
(block means as gate keys, the own block always selected, ties to the lower index), forward
and gradients; ties, short and single blocks, GQA, padding, causal leakage, pair counts, the
chunked selection, the decode cache, the kernel, bad parameters."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import check_memory_is_linear, padding, params_id, qkv

import attn_zoo
from attn_zoo.cache import cache_for
from attn_zoo.reference import reference_attention
from attn_zoo.variants import moba

# attn_zoo.kernels is the checkout's kernels/ folder; nothing in it is imported here.
KERNEL = importlib.util.find_spec("attn_zoo.kernels.selection") is not None


def moba_allowed(q, k, block, top_k, causal, real=None):
    """(B, Hq, N, N) bool: the keys each query reads under the rule, from a dense loop.

    Block J holds keys J * block .. (J + 1) * block - 1 (< N); its gate key is the mean of its
    real keys. Query i reads its own block i // block, and the top_k - 1 competing blocks of
    highest q_i . mean(k_J), ties to the lower J (causal: competitors J < i // block, the own
    block up to i; bidirectional: every other block, the own block whole); a block without a
    real key never competes.
    """
    batch, q_heads, n, _ = q.shape
    groups = q_heads // k.shape[1]
    q, k = q.detach().double(), k.detach().double()
    real = torch.ones(batch, n, dtype=torch.bool) if real is None else real
    blocks = -(-n // block)
    allowed = torch.zeros(batch, q_heads, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(q_heads):
            means = {}
            for J in range(blocks):
                keys = [j for j in range(J * block, min(n, (J + 1) * block)) if real[b, j]]
                if keys:
                    means[J] = k[b, h // groups, keys].mean(0)
            for i in range(n):
                own = i // block
                competitors = [J for J in means if (J < own if causal else J != own)]
                ranked = sorted(competitors, key=lambda J: (-float(q[b, h, i] @ means[J]), J))
                for J in [own, *ranked[:top_k - 1]]:
                    last = min(n, (J + 1) * block) - 1
                    if causal and J == own:
                        last = i
                    allowed[b, h, i, J * block:last + 1] = True
    return allowed


def moba_reference(q, k, v, block, top_k, causal, real=None, scale=None, sink=None):
    """Float64 MoBA attention: the dense softmax over `moba_allowed` (with the null key of
    `sink`)."""
    allowed = moba_allowed(q, k, block, top_k, causal, real)
    return reference_attention(q, k, v, allowed, scale=scale, key_padding_mask=real, sink=sink)


def check_against_reference(attn, n, causal, kv_heads=2, seed=0, real=None):
    """Forward and gradients of q, k, v at float64 against `moba_reference`."""
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=kv_heads, n=n, dim=8, dtype=torch.float64,
                  seed=seed, requires_grad=True)
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    expected = moba_reference(q, k, v, attn.params.block, attn.params.top_k, causal, real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for label, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, label=label: f"d{label}: {m}")


MOBA_CASES = [
    {"block": 8, "top_k": 3},
    {"block": 5, "top_k": 2},  # N = 37 leaves a last block of 2
    {"block": 8, "top_k": 1},  # the own block alone
    {"block": 16, "top_k": 9},  # top_k beyond the number of blocks: every block
    {"block": 64, "top_k": 3},  # N = 37 is shorter than one block
]


@pytest.mark.parametrize("params", MOBA_CASES, ids=params_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_moba_matches_the_rule_reference(params, causal):
    attn = attn_zoo.build("moba", **params)
    check_against_reference(attn, 37, causal, kv_heads=2, seed=1)
    check_against_reference(attn, 37, causal, kv_heads=1, seed=2, real=padding(2, 37, seed=3))


@pytest.mark.parametrize("n", [1, 8, 64])
def test_moba_lengths_at_block_edges(n):
    attn = attn_zoo.build("moba", block=8, top_k=3)
    for causal in (False, True):
        check_against_reference(attn, n, causal, seed=n)


def test_moba_padding_whole_blocks_never_compete():
    """Blocks 1 and 3 hold no real key: they never compete, and rows of block 1 read only
    their competitors."""
    real = torch.ones(2, 40, dtype=torch.bool)
    real[:, 8:16] = False
    real[1, 24:32] = False
    real[0, ::3] = False
    attn = attn_zoo.build("moba", block=8, top_k=3)
    for causal in (False, True):
        check_against_reference(attn, 40, causal, seed=4, real=real)
    q, k, _ = qkv(batch=2, q_heads=4, kv_heads=2, n=40, dim=8, dtype=torch.float64)
    index = attn.selection(q, k, causal=False, key_padding_mask=real)
    others = index[..., 1:]
    assert not (others == 1).any() and not (others[1] == 3).any()


def tied_keys() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (1, 1, 32, 4) float64 in blocks of 8 whose integer keys make block 0 and 2
    means equal and exactly representable, above block 1's for every query; block 3's below."""
    q = torch.ones(1, 1, 32, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 32, 4, dtype=torch.float64)
    k[..., 0:8, :] = 2.0
    k[..., 8:16, :] = 1.0
    k[..., 16:24, :] = torch.tensor([4.0, 0.0] * 4)[:, None]  # mean 2, in another order
    k[..., 24:32, :] = -1.0
    v = torch.randn(1, 1, 32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return q, k, v


def test_ties_go_to_the_lower_block():
    q, k, v = tied_keys()
    attn = attn_zoo.build("moba", block=8, top_k=2)
    causal = attn.selection(q, k, causal=True)[0, 0]
    assert causal[24:].tolist() == [[3, 0]] * 8  # block 3 sees 0, 1, 2: 0 and 2 tie
    bidir = attn.selection(q, k, causal=False)[0, 0]
    assert bidir[24:].tolist() == [[3, 0]] * 8 and bidir[8:16].tolist() == [[1, 0]] * 8
    assert bidir[:8].tolist() == [[0, 2]] * 8
    for causal in (False, True):
        expected = moba_reference(q, k, v, 8, 2, causal)
        torch.testing.assert_close(attn(q, k, v, causal=causal), expected, atol=1e-12,
                                   rtol=1e-12)


def test_all_blocks_tied_select_the_lowest_indices():
    """Equal keys everywhere: every gate score ties, and each row takes the lowest competing
    indices (torch's topk alone returns other ones)."""
    attn = attn_zoo.build("moba", block=8, top_k=3)
    q, _, _ = qkv(batch=1, q_heads=2, kv_heads=1, n=48, dtype=torch.float64)
    k = torch.ones(1, 1, 48, 24, dtype=torch.float64)
    own = torch.arange(48) // 8
    lowest = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]])
    expected = torch.cat([own[:, None], lowest[own]], 1).expand(1, 2, 48, 3)
    assert torch.equal(attn.selection(q, k, causal=False), expected)
    causal = attn.selection(q, k, causal=True)[0, :, 16:]  # rows with two competitors or more
    assert torch.equal(causal, torch.cat([own[16:, None], torch.tensor([[0, 1]] * 32)],
                                         1).expand(2, 32, 3))


def test_selection_lists_the_own_block_first_then_distinct_blocks():
    attn = attn_zoo.build("moba", block=8, top_k=4)
    q, k, _ = qkv(n=70, dtype=torch.float64)
    for causal in (False, True):
        index = attn.selection(q, k, causal=causal)
        assert index.shape == (2, 4, 70, 4) and index.dtype == torch.long
        assert torch.equal(index[..., 0], (torch.arange(70) // 8).expand(2, 4, 70))
        others = index[..., 1:]
        assert ((others[..., 1:] > others[..., :-1]) | (others[..., 1:] == -1)).all()
        filled = (others >= 0).sum(-1)
        expected = (torch.arange(70) // 8).clamp(max=3) if causal else torch.full((70,), 3)
        assert torch.equal(filled, expected.expand(2, 4, 70))
    # Fewer blocks than top_k: S = the number of blocks.
    assert attn.selection(*qkv(n=20)[:2]).shape[-1] == 3


def test_each_query_head_selects_for_itself():
    """Two query heads of one kv head with opposite queries pick different blocks."""
    attn = attn_zoo.build("moba", block=8, top_k=2)
    q, k, _ = qkv(batch=1, q_heads=1, kv_heads=1, n=40, dtype=torch.float64)
    index = attn.selection(torch.cat([q, -q], 1), k, causal=True)
    assert not torch.equal(index[0, 0, 16:, 1], index[0, 1, 16:, 1])


def test_no_future_key_query_or_value_changes_an_earlier_output():
    attn = attn_zoo.build("moba", block=8, top_k=3)
    q, k, v = qkv(n=70, dtype=torch.float64)
    out = attn(q, k, v, causal=True)
    for t in (0, 23, 24, 69):
        for which in range(3):
            changed = [x.clone() for x in (q, k, v)]
            changed[which][:, :, t] += 5.0
            torch.testing.assert_close(attn(*changed, causal=True)[:, :, :t], out[:, :, :t],
                                       atol=0, rtol=0)


@pytest.mark.parametrize("params", [{"block": 8, "top_k": 3}, {"block": 5, "top_k": 2},
                                    {"block": 16, "top_k": 9}, {"block": 64, "top_k": 2}],
                         ids=params_id)
def test_scored_pairs_count_the_reference_pairs(params):
    """Causal, and bidirectional with block dividing n: the reference mask's pairs per
    (batch, head) exactly. Otherwise a selected shorter last block counts as `block` keys."""
    attn = attn_zoo.build("moba", **params)
    block = params["block"]
    for n in (1, 40, 64, 75):
        q, k, _ = qkv(batch=1, q_heads=2, kv_heads=1, n=n, dim=8, dtype=torch.float64, seed=n)
        for causal in (False, True):
            pairs = moba_allowed(q, k, block, params["top_k"], causal).sum((0, 2, 3))
            assert (pairs == pairs[0]).all() or (not causal and n % block)
            if causal or n % block == 0:
                assert attn.scored_pairs(n, causal) == int(pairs[0])
            else:
                short = n * (block - n % block)
                assert pairs.max() <= attn.scored_pairs(n, causal) <= pairs.min() + short
            assert attn.flops(n, 8, causal) == 4 * 8 * attn.scored_pairs(n, causal)


def test_chunked_selection_equals_one_chunk(monkeypatch):
    """Gate scores of a few rows at a time select what all rows at once select."""
    attn = attn_zoo.build("moba", block=4, top_k=3)
    q, k, v = qkv(n=61, dtype=torch.float64)
    real = padding(2, 61, seed=5)
    whole = [(attn.selection(q, k, causal, real), attn(q, k, v, causal=causal,
                                                        key_padding_mask=real))
             for causal in (False, True)]
    # 2 batch x 4 heads x 16 blocks: 3 rows per chunk.
    monkeypatch.setattr(moba, "CHUNK_ELEMENTS", 3 * 2 * 4 * 16)
    for causal, (index, out) in zip((False, True), whole, strict=True):
        assert torch.equal(attn.selection(q, k, causal, real), index)
        torch.testing.assert_close(attn(q, k, v, causal=causal, key_padding_mask=real), out,
                                   atol=0, rtol=0)


def test_selection_scores_one_chunk_of_rows_at_a_time(monkeypatch):
    """No gate-score matrix larger than one chunk: every matmul of the selection stays within
    the budget, at N = 4096, block 8 (512 blocks, 2M gate scores per head)."""
    budget = 1 << 14
    monkeypatch.setattr(moba, "CHUNK_ELEMENTS", budget)
    largest = []
    real_topk = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        largest.append(self.numel())
        return real_topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    q, k = (torch.randn(1, 2, 4096, 8) for _ in range(2))
    attn_zoo.build("moba", block=8, top_k=3).selection(q, k, causal=True)
    assert len(largest) > 1 and max(largest) <= budget


def test_moba_memory_is_linear():
    """The forward at N = 1024 and 4096 (256 blocks of 16): selection and attention linear
    in N (the selection op's own tests cover its backward)."""
    check_memory_is_linear(attn_zoo.build("moba", block=16, top_k=3))


# -- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1] * 40, [40], [7, 9, 1, 13, 10], [3, 17, 20]],
                         ids=["steps", "one", "mixed", "chunks"])
def test_cache_equals_the_causal_forward(sizes):
    """Any split of the positions into extend calls gives the teacher-forced outputs (float64,
    GQA, a sink), and the cache holds the mean of every complete block."""
    attn = attn_zoo.build("moba", block=4, top_k=3, sinks=4).double()
    with torch.no_grad():
        attn.sink.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=40, dim=8, dtype=torch.float64, seed=6)
    expected = attn(q, k, v, causal=True)
    cache, outs, start = cache_for(attn), [], 0
    for size in sizes:
        part = slice(start, start + size)
        outs.append(cache.extend(q[:, :, part], k[:, :, part], v[:, :, part]))
        start += size
        complete = start // 4
        if complete:
            means = k[:, :, :complete * 4].unflatten(2, (-1, 4)).mean(3)
            torch.testing.assert_close(cache.buffers["means"], means, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(torch.cat(outs, 2), expected, atol=1e-12, rtol=1e-12)
    assert type(cache).exact and not type(cache).bounded


def test_cache_sums_each_block_once(monkeypatch):
    """Block means are kept, not recomputed: over 40 steps the cache sums 40 keys in all."""
    summed = []
    real_sums = moba.block_sums

    def spy(x, block):
        summed.append(x.shape[-2])
        return real_sums(x, block)

    monkeypatch.setattr(moba, "block_sums", spy)
    attn = attn_zoo.build("moba", block=4, top_k=2)
    cache = cache_for(attn)
    q, k, v = qkv(n=40, dtype=torch.float64)
    for i in range(40):
        cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert sum(summed) == 40 and cache.buffers["means"].shape == (2, 2, 10, 24)


# -- the kernel -----------------------------------------------------------------------------


@pytest.mark.skipif(not KERNEL, reason="kernels/selection.py is not in this checkout")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_kernel_matches_the_torch_backend(causal):
    """Interpreter (or GPU): n = 27 with a short last block, GQA, padding (the second row
    entirely); forward and gradients of q, k, v against the torch backend."""
    kernel, engine = (attn_zoo.build("moba", block=8, top_k=3, backend=backend)
                      for backend in ("triton", "torch"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(device).requires_grad_() for x in qkv(batch=2, q_heads=2, kv_heads=1, n=27,
                                                           dim=16, seed=7))
    real = padding(2, 27, seed=8).to(device)
    outs = [attn(q, k, v, causal=causal, key_padding_mask=real) for attn in (kernel, engine)]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=2e-4)
    grad = torch.randn_like(outs[0])
    for got, want in zip(*(torch.autograd.grad(out, (q, k, v), grad) for out in outs),
                         strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


# -- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("params,match", [
    ({"block": 0}, "block must be >= 1, got 0"),
    ({"block": -8}, "block must be >= 1, got -8"),
    ({"top_k": 0}, r"top_k must be >= 1 \(the own block counts as one\), got 0"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build("moba", **params)


@pytest.mark.parametrize("params", [{"block": 8.0}, {"top_k": True}, {"top_k": "3"}])
def test_parameter_types(params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build("moba", **params)


def test_unknown_parameter():
    with pytest.raises(ValueError, match="unknown parameter 'window' for attention 'moba'"):
        attn_zoo.build("moba", window=4)
