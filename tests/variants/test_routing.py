"""`routing` (Routing Transformer): against a dense float64 reference built from the clusters
its hook chooses (`clusters`), forward and gradients; centroid updates and their state, pair
counts, bad parameters."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import check_shared_qk_gradients, padding, params_id, qkv

import attn_zoo
from attn_zoo.reference import reference_attention


def routing_reference(attn, q, v, causal, real, sink=None):
    """Float64 routing attention from `attn.clusters(q)`: members of a cluster attend to each
    other (with the null key of `sink` in each cluster's softmax); the mean over a token's
    clusters."""
    n = q.shape[2]
    clusters = attn.clusters(q)  # (B, H, C, W)
    keys = F.normalize(q, dim=-1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    total, count = torch.zeros_like(q), torch.zeros(q.shape[:3], dtype=q.dtype)
    for c in range(clusters.shape[2]):
        member = torch.zeros(q.shape[:3], dtype=torch.bool).scatter_(2, clusters[:, :, c], True)
        allowed = member[..., :, None] & member[..., None, :]
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        total = total + reference_attention(q, keys, v, allowed, key_padding_mask=real,
                                            sink=sink)
        count = count + member
    return total / count.clamp_min(1)[..., None]


ROUTING_CASES = [
    {"n_clusters": 4},
    {"n_clusters": 3, "window": 20},
    {"n_clusters": 1},  # one cluster of every token: full attention
    {"n_clusters": 5, "window": 1000},  # window beyond N: every token, five times
]


@pytest.mark.parametrize("params", ROUTING_CASES, ids=params_id)
@pytest.mark.parametrize("n", [1, 97, 300])
def test_routing_matches_dense_reference(params, n):
    torch.manual_seed(n)
    attn = attn_zoo.build("routing", **params).eval()
    for causal, kv_heads in ((False, 2), (True, 1)):
        q, k, v = qkv(batch=3, q_heads=4, kv_heads=kv_heads, n=n, dim=16, dtype=torch.float64,
                      seed=n, requires_grad=True)
        real = padding(3, n, seed=n + 1)
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        expected = routing_reference(attn, q, v, causal, real)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        check_shared_qk_gradients(out, expected, q, k, v)


def test_routing_one_cluster_of_everything_is_full_attention():
    attn = attn_zoo.build("routing", n_clusters=1).eval()
    full = attn_zoo.build("full")
    q, k, v = qkv(n=40, dtype=torch.float64)
    keys = F.normalize(q, dim=-1)
    for causal in (False, True):
        expected = full(q, keys, v.repeat_interleave(2, 1), causal=causal)
        torch.testing.assert_close(attn(q, k, v, causal=causal), expected)


def test_routing_clusters_are_the_nearest_tokens():
    torch.manual_seed(0)
    attn = attn_zoo.build("routing", n_clusters=3, window=5).eval()
    q = qkv(n=30)[0]
    clusters = attn.clusters(q)
    assert clusters.shape == (2, 4, 3, 5) and clusters.dtype == torch.long
    assert (clusters.diff(dim=-1) > 0).all()  # distinct positions, increasing
    affinity = torch.einsum("bhnd,hcd->bhcn", F.normalize(q, dim=-1), attn.centroids)
    chosen = affinity.gather(3, clusters)
    others = affinity.scatter(3, clusters, float("-inf"))
    assert (chosen.amin(-1) >= others.amax(-1)).all()
    torch.testing.assert_close(attn.centroids.norm(dim=-1), torch.ones(4, 3))


def test_routing_scored_pairs_count_the_clusters():
    torch.manual_seed(0)
    attn = attn_zoo.build("routing", n_clusters=3).eval()
    for n in (1, 10, 97):
        q = qkv(batch=1, q_heads=1, n=n)[0]
        clusters = attn.clusters(q)[0, 0]
        window = math.ceil(n / 3)
        assert attn.scored_pairs(n, False) == 3 * window**2
        causal_pairs = int((clusters[:, None, :] <= clusters[:, :, None]).sum())
        assert attn.scored_pairs(n, True) == causal_pairs
    assert attn_zoo.build("routing", n_clusters=2, window=50).scored_pairs(20, False) == 800


def train_step(attn, q, k, v, **kwargs) -> torch.Tensor:
    """The centroids after one training-mode call."""
    attn.train()
    attn(q, k, v, **kwargs)
    return attn.centroids.clone()


def test_routing_centroids_move_in_training_only():
    torch.manual_seed(0)
    attn = attn_zoo.build("routing", n_clusters=4, decay=0.5)
    q, k, v = qkv(n=40)
    attn.eval()
    attn(q, k, v)
    start = attn.centroids.clone()
    with torch.no_grad():
        attn(q, k, v)
        attn.train()
        attn(q, k, v)  # no_grad is evaluation, whatever the mode
    assert torch.equal(attn.centroids, start)
    moved = train_step(attn, q, k, v)
    assert not torch.allclose(moved, start)
    torch.testing.assert_close(moved.norm(dim=-1), torch.ones(4, 4))
    attn.eval()
    attn(q, k, v)
    assert torch.equal(attn.centroids, moved)


def test_routing_ema_step():
    """Two centroids on one head; the first gets tokens 0 and 1 (token 2, also nearest to it,
    is padding), the second gets token 3, a third centroid gets nothing and stays."""
    attn = attn_zoo.build("routing", n_clusters=3, window=2, decay=0.75)
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    attn.load_state_dict({"centroids": centroids})
    q = torch.tensor([[[[2.0, 1.0], [3.0, -1.0], [5.0, 0.1], [0.2, 1.0]]]])
    real = torch.tensor([[True, True, False, True]])
    moved = train_step(attn, q, q, q, key_padding_mask=real)
    first = F.normalize(F.normalize(q[0, 0, 0], dim=0) + F.normalize(q[0, 0, 1], dim=0), dim=0)
    second = F.normalize(q[0, 0, 3], dim=0)
    expected = torch.stack([
        F.normalize(0.75 * centroids[0, 0] + 0.25 * first, dim=0),
        F.normalize(0.75 * centroids[0, 1] + 0.25 * second, dim=0),
        centroids[0, 2],
    ])[None]
    torch.testing.assert_close(moved, expected)


def test_routing_state_dict_round_trip():
    torch.manual_seed(0)
    attn = attn_zoo.build("routing", n_clusters=4)
    assert attn.state_dict() == {}  # no centroids before the first call
    q, k, v = qkv(n=60)
    train_step(attn, q, k, v, causal=True)
    buffer = io.BytesIO()
    torch.save(attn.state_dict(), buffer)
    buffer.seek(0)
    fresh = attn_zoo.build("routing", n_clusters=4)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.centroids, attn.centroids)
    attn.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(q, k, v, causal=True), attn(q, k, v, causal=True),
                               atol=0, rtol=0)


def test_routing_rejects_a_different_head_layout():
    attn = attn_zoo.build("routing").eval()
    q, k, v = qkv(q_heads=4, n=20)
    attn(q, k, v)
    q, k, v = qkv(q_heads=2, n=20)
    with pytest.raises(ValueError, match="heads"):
        attn(q, k, v)


@pytest.mark.parametrize("name,params,match", [
    ("routing", {"n_clusters": 0}, "n_clusters.*0"),
    ("routing", {"window": 0}, "window.*0"),
    ("routing", {"decay": 0.0}, r"decay.*0\.0"),
    ("routing", {"decay": 1.0}, r"decay.*1\.0"),
    ("routing", {"decay": -0.5}, r"decay.*-0\.5"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize("name,params", [
    ("routing", {"window": 1.5}),
    ("routing", {"n_clusters": True}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize("name", ["routing"])
def test_training_gradients_reach_queries_and_values(name):
    attn = attn_zoo.build(name, **({"bucket_size": 8} if name == "lsh" else {}))
    q, k, v = qkv(n=50, requires_grad=True)
    attn(q, k, v, causal=True).square().sum().backward()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_routing_window_follows_each_document():
    """window=None is ceil(L / n_clusters) for a document of length L, a given window is
    capped at L: a packed call equals the documents alone, each clustered on its own."""
    torch.manual_seed(0)
    for window in (None, 6):
        attn = attn_zoo.build("routing", n_clusters=3, window=window).double().eval()
        q, k, v = qkv(batch=1, n=40, dim=16, dtype=torch.float64, seed=7)
        ids = torch.tensor([[0] * 4 + [1] * 29 + [2] * 7])
        packed = attn(q, k, v, causal=True, document_ids=ids)
        start = 0
        for length in (4, 29, 7):
            part = slice(start, start + length)
            members = attn.clusters(q[:, :, part])
            assert members.shape[-1] == (min(window, length) if window else -(-length // 3))
            torch.testing.assert_close(packed[:, :, part],
                                       attn(q[:, :, part], k[:, :, part], v[:, :, part],
                                            causal=True), atol=0, rtol=0)
            start += length
