"""`topk` (DSA's lightning indexer with top-k selection): against a float64 reference of the
rule (dense indexer scores, top-k with ties to the lower key index, one masked softmax),
forward and gradients; ties, fewer keys than top_k, GQA sharing, padding, causal leakage; the
indexer loss against a hand-computed KL and its reference, and which weights it reaches;
pair counts, bad parameters; the triton kernel against torch."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import check_memory_is_linear, padding, qkv

import attn_zoo
from attn_zoo.reference import reference_attention

TINY = {"top_k": 8, "index_heads": 2, "index_dim": 8}


def index_scores(attn, q, k):
    """I (B, Hkv, N, M) in float64: I(i, j) = sum_h w_h(i) relu(qI_h(i) · kI(j)) with
    x_i the group's query vectors side by side, qI_h = WQ_h x_i, w_h = Ww_h x_i, kI = WK k_j."""
    batch, q_heads, n, dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    heads = attn.params.index_heads
    wq, ww, wk = (w.detach().double() for w in (attn.index_q, attn.index_w, attn.index_k))
    scores = torch.zeros(batch, kv_heads, n, k.shape[2], dtype=torch.float64)
    for b in range(batch):
        for g in range(kv_heads):
            x = torch.cat([q[b, g * groups + r].detach().double() for r in range(groups)], -1)
            qi = (x @ wq[g]).view(n, heads, -1)
            w = x @ ww[g]
            ki = k[b, g].detach().double() @ wk[g]
            for h in range(heads):
                scores[b, g] += w[:, h, None] * torch.relu(qi[:, h] @ ki.T)
    return scores


def selected(attn, q, k, causal, real):
    """(B, Hkv, N, M) bool: each query's top_k allowed keys of highest I, ties to the lower
    index (all allowed keys when fewer)."""
    scores = index_scores(attn, q, k)
    batch, kv_heads, n, m = scores.shape
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(batch):
        for g in range(kv_heads):
            for i in range(n):
                keys = [j for j in range(m) if (not causal or j <= i)
                        and (real is None or bool(real[b, j]))]
                keys.sort(key=lambda j, b=b, g=g, i=i: (-float(scores[b, g, i, j]), j))
                chosen[b, g, i, keys[:attn.params.top_k]] = True
    return chosen


def topk_reference(attn, q, k, v, causal, real, sink=None):
    """Float64 softmax of each query over its selected keys (and the null key of `sink`)."""
    groups = q.shape[1] // k.shape[1]
    allowed = selected(attn, q, k, causal, real).repeat_interleave(groups, 1)
    return reference_attention(q, k, v, allowed, scale=attn.params.scale, key_padding_mask=real,
                               sink=sink)


def indexer_loss_reference(attn, q, k, causal, real):
    """Mean over real queries, kv heads and batch of KL(p_i || softmax of I over the selected
    keys), p_i the main attention over them summed over the group's heads, L1-normalised;
    differentiable in the module's index weights only."""
    batch, q_heads, n, dim = q.shape
    kv_heads = k.shape[1]
    groups, heads = q_heads // kv_heads, attn.params.index_heads
    chosen = selected(attn, q, k, causal, real)
    scale = attn.params.scale or dim**-0.5
    wq, ww, wk = (w.double() for w in (attn.index_q, attn.index_w, attn.index_k))
    total, count = 0.0, 0
    for b in range(batch):
        for g in range(kv_heads):
            x = torch.cat([q[b, g * groups + r].detach().double() for r in range(groups)], -1)
            qi, w = (x @ wq[g]).view(n, heads, -1), x @ ww[g]
            ki = k[b, g].detach().double() @ wk[g]
            index = sum(w[:, h, None] * torch.relu(qi[:, h] @ ki.T) for h in range(heads))
            for i in range(n):
                if real is not None and not real[b, i]:
                    continue
                keys = chosen[b, g, i]
                main = (q[b, g * groups:(g + 1) * groups, i].detach().double()
                        @ k[b, g, keys].detach().double().T) * scale
                p = main.softmax(-1).sum(0)
                p = p / p.sum()
                log_indexer = index[i, keys].log_softmax(-1)
                total = total + (p * (p.log() - log_indexer)).sum()
                count += 1
    return total / count


def build(**params):
    """A float64 topk module with weights drawn from a fixed seed, created for 4 query heads
    over 2 kv heads of dimension 16."""
    torch.manual_seed(0)
    attn = attn_zoo.build("topk", **TINY | params).double()
    attn.initialize(4, 2, 16)
    return attn.eval()


def check(attn, q, k, v, causal, real=None):
    """Forward and gradients of q, k, v against the reference."""
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    expected = topk_reference(attn, q, k, v, causal, real)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for label, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, x=label: f"d{x}: {m}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 37, 61])
def test_topk_matches_the_reference_with_gqa_and_padding(causal, n):
    attn = build()
    q, k, v = qkv(batch=3, q_heads=4, kv_heads=2, n=n, dim=16, dtype=torch.float64, seed=n,
                  requires_grad=True)
    real = padding(3, n, seed=n + 1)
    check(attn, q, k, v, causal, real)
    check(attn, q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_fewer_keys_than_top_k_is_full_attention(causal):
    attn = build(top_k=50)
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=37, dim=16, dtype=torch.float64,
                  requires_grad=True)
    check(attn, q, k, v, causal)
    expected = attn_zoo.build("full")(q, k, v, causal=causal)
    torch.testing.assert_close(attn(q, k, v, causal=causal), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_ties_go_to_the_lower_key_index(causal):
    attn = build()
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=30, dim=16, dtype=torch.float64,
                  requires_grad=True)
    with torch.no_grad():  # equal index keys: every score ties
        attn.index_k.zero_()
    check(attn, q, k, v, causal)
    # Each query attends to its first top_k allowed keys: causal, that is a window at the start.
    first = torch.zeros(30, 30, dtype=torch.bool)
    first[:, :8] = True
    if causal:
        first = first.tril()
    expected = reference_attention(q, k, v, first)
    torch.testing.assert_close(attn(q, k, v, causal=causal), expected)
    with torch.no_grad():  # duplicated keys: ties between two positions among other scores
        attn.reset_weights()
        k2 = k.detach().clone()
        k2[:, :, 20] = k2[:, :, 4]
        k2[:, :, 25] = k2[:, :, 4]
    check(attn, q, k2.requires_grad_(), v, causal)
    # three distinct keys repeated: top_k = 8 always splits a group of equal scores
    k3 = k.detach()[:, :, torch.arange(30) % 3].clone().requires_grad_()
    check(attn, q, k3, v, causal)


def test_the_selection_is_shared_by_the_query_heads_of_a_kv_head():
    attn = build()
    q, k, v = qkv(batch=1, q_heads=4, kv_heads=2, n=40, dim=16, dtype=torch.float64)
    chosen = selected(attn, q, k, True, None)
    # Changing one head of a group moves the group's selection; the other group's holds.
    q2 = q.clone()
    q2[:, 1] = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    moved = selected(attn, q2, k, True, None)
    assert not torch.equal(moved[:, 0], chosen[:, 0]) and torch.equal(moved[:, 1], chosen[:, 1])
    out, out2 = attn(q, k, v, causal=True), attn(q2, k, v, causal=True)
    torch.testing.assert_close(out2, topk_reference(attn, q2, k, v, True, None))
    torch.testing.assert_close(out2[:, 2:], out[:, 2:])  # the other group


def test_no_causal_leakage_of_queries_keys_or_values():
    attn = build()
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=50, dim=16, dtype=torch.float64)
    out = attn(q, k, v, causal=True)
    for t in (0, 23, 49):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] += torch.randn(x[:, :, t:].shape, dtype=torch.float64)
        torch.testing.assert_close(attn(q2, k2, v2, causal=True)[:, :, :t], out[:, :, :t],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_key_ranks_last(value):
    """Its index score ranks below every finite one: causal rows with top_k = 4 other allowed
    keys select as if it were padding; rows 2 and 3, with fewer, take it (NaN)."""
    attn = build(top_k=4)
    q, k, v = qkv(batch=1, q_heads=4, kv_heads=2, n=20, dim=16, dtype=torch.float64)
    bad = k.clone()
    bad[:, :, 2] = value
    out = attn(q, bad, v, causal=True)
    assert out[:, :, 2:4].isnan().all()
    without = (torch.arange(20) != 2)[None]
    expected = topk_reference(attn, q, k, v, True, without)
    rows = torch.arange(20) >= 4  # and rows 0, 1, which never see key 2
    rows[:2] = True
    torch.testing.assert_close(out[:, :, rows], expected[:, :, rows], atol=1e-10, rtol=1e-10)


def test_the_indexer_loss_on_a_hand_computed_case():
    """One query head of dimension 1, q = 1, k = (0, 1, 3), scale 2, identity index weights:
    I(i, j) = relu(k_j), main scores 2 k_j; causal, top_k = 2. Row 0: one key, KL 0. Row 1:
    keys {0, 1}, p = softmax(0, 2) = (0.11920292, 0.88079708), indexer softmax(0, 1) =
    (0.26894142, 0.73105858): KL 0.06713075. Row 2: keys {2, 1} (I = 3, 1 beat 0), p =
    softmax(2, 6) = (0.01798621, 0.98201379), indexer softmax(1, 3) = (0.11920292,
    0.88079708): KL 0.07280566. The loss: their mean over the three rows."""
    attn = attn_zoo.build("topk", top_k=2, index_heads=1, index_dim=1, scale=2.0).double()
    attn.initialize(1, 1, 1)
    with torch.no_grad():
        for weight in (attn.index_q, attn.index_w, attn.index_k):
            weight.fill_(1.0)
    q = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    k = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64).view(1, 1, 3, 1)
    assert attn.indexer_loss() is None
    attn.train()(q, k, torch.randn(1, 1, 3, 1, dtype=torch.float64), causal=True)
    row1 = 0.11920292202 * math.log(0.11920292202 / 0.26894142137) + 0.88079707798 * math.log(
        0.88079707798 / 0.73105857863)
    row2 = 0.01798620996 * math.log(0.01798620996 / 0.11920292202) + 0.98201379004 * math.log(
        0.98201379004 / 0.88079707798)
    assert row1 == pytest.approx(0.06713075445) and row2 == pytest.approx(0.07280566320)
    assert attn.indexer_loss().item() == pytest.approx((0 + row1 + row2) / 3, abs=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_the_indexer_loss_matches_its_reference_and_reaches_only_the_index_weights(causal):
    attn = build(sinks=4).train()
    q, k, v = qkv(batch=3, q_heads=4, kv_heads=2, n=37, dim=16, dtype=torch.float64,
                  requires_grad=True)
    real = padding(3, 37, seed=2)
    out = attn(q, k, v, causal=causal, key_padding_mask=real)
    loss = attn.indexer_loss()
    expected = indexer_loss_reference(attn, q, k, causal, real)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=1e-10)
    weights = (attn.index_q, attn.index_w, attn.index_k)
    got = torch.autograd.grad(loss, (q, k, v, attn.sink, *weights), allow_unused=True,
                              retain_graph=True)
    assert got[:4] == (None, None, None, None)  # neither q, k, v nor the sink
    want = torch.autograd.grad(expected, weights)
    for g, w in zip(got[4:], want, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    # and the main output's gradient never reaches the index weights
    assert torch.autograd.grad(out.sum(), weights, allow_unused=True) == (None, None, None)


def test_the_indexer_loss_is_stored_only_by_training_forwards():
    attn = build().train()
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=20, dim=16, dtype=torch.float64)
    attn(q, k, v, causal=True)
    first = attn.indexer_loss()
    assert first.dim() == 0 and first.item() > 0 and attn.auxiliary_loss() is first
    with torch.no_grad():
        attn(q * 2, k, v, causal=True)
    attn.eval()(q * 3, k, v, causal=True)
    assert attn.indexer_loss() is first
    # top_k >= N: the dense warm-up's loss, every allowed key selected
    dense = build(top_k=20).train()
    dense(q, k, v, causal=True)
    expected = indexer_loss_reference(dense, q, k, True, None)
    torch.testing.assert_close(dense.indexer_loss(), expected, atol=1e-10, rtol=1e-10)


def test_packed_documents_give_one_loss_over_every_document():
    attn = build().train()
    q, k, v = qkv(batch=1, q_heads=4, kv_heads=2, n=30, dim=16, dtype=torch.float64)
    ids = torch.tensor([[0] * 12 + [1] * 18])
    attn(q, k, v, causal=True, document_ids=ids)
    parts = [indexer_loss_reference(attn, q[:, :, s], k[:, :, s], True, None)
             for s in (slice(0, 12), slice(12, 30))]
    expected = (parts[0] * 12 + parts[1] * 18) / 30
    torch.testing.assert_close(attn.indexer_loss(), expected, atol=1e-10, rtol=1e-10)


def test_scored_pairs_count_the_selected_keys():
    attn = build()
    q, k, _ = qkv(batch=1, q_heads=4, kv_heads=2, n=37, dim=16, dtype=torch.float64)
    for causal in (False, True):
        for n in (1, 5, 37):
            pairs = int(selected(attn, q[:, :, :n], k[:, :, :n], causal, None)[0, 0].sum())
            assert attn.scored_pairs(n, causal) == pairs
            assert attn.flops(n, 64, causal) == 4 * 64 * pairs
    assert build(top_k=256).scored_pairs(4096, True) == 256 * 257 // 2 + (4096 - 256) * 256


def test_training_memory_is_linear_in_the_length():
    """The indexer's scores live one row chunk at a time, the indexer loss's too."""
    check_memory_is_linear(attn_zoo.build("topk", **TINY).train(), backward=True)


def test_weights_are_made_per_kv_head():
    attn = attn_zoo.build("topk", top_k=4, index_heads=3, index_dim=5)
    attn.initialize(8, 2, 16)
    assert attn.index_q.shape == (2, 64, 15)
    assert attn.index_w.shape == (2, 64, 3)
    assert attn.index_k.shape == (2, 16, 5)
    assert set(attn.state_dict()) == {"index_q", "index_w", "index_k"}


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"top_k": 0}, ValueError, r"^top_k must be >= 1, got 0$"),
        ({"index_heads": -1}, ValueError, r"^index_heads must be >= 1, got -1$"),
        ({"index_dim": 0}, ValueError, r"^index_dim must be >= 1, got 0$"),
        ({"top_k": 2.5}, TypeError, r"^top_k must be int, got 2.5$"),
        ({"index_heads": 65}, ValueError, r"^index_heads must be <= 64, got 65$"),
        ({"index_dim": 1025}, ValueError, r"^index_dim must be <= 1024, got 1025$"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        attn_zoo.build("topk", **params)


def test_weights_made_for_other_heads_are_an_error():
    attn = attn_zoo.build("topk", **TINY)
    q, k, v = qkv(q_heads=4, kv_heads=2, n=10)
    attn(q, k, v)
    with pytest.raises(ValueError, match="index_q of shape"):
        attn(q, k[:, :1], v[:, :1])


KERNEL = importlib.util.find_spec("attn_zoo.kernels.selection") is not None


@pytest.mark.skipif(not KERNEL, reason="kernels/selection.py is absent")
@pytest.mark.parametrize("causal", [False, True])
def test_the_kernel_matches_torch(causal):
    """The triton backend (interpreter on CPU) against torch: forward, gradients of q, k, v,
    and the same indexer loss, with GQA and padding."""
    torch.manual_seed(0)
    kernel = attn_zoo.build("topk", **TINY, backend="triton").train()
    plain = attn_zoo.build("topk", **TINY, backend="torch").train()
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=37, dim=16, requires_grad=True)
    real = padding(2, 37, seed=1)
    real[-1] = True
    out = kernel(q, k, v, causal=causal, key_padding_mask=real)
    plain.load_state_dict(kernel.state_dict())
    expected = plain(q, k, v, causal=causal, key_padding_mask=real)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(kernel.indexer_loss(), plain.indexer_loss())
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)
