"""`lsh` (Reformer): against a dense float64 reference built from the buckets its hook chooses
(`buckets`), forward and gradients; seeds, pair counts, bad parameters, linear memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import check_shared_qk_gradients, padding, params_id, qkv

import attn_zoo
from attn_zoo.reference import reference_attention
from experiments.measure import peak_memory


def lsh_candidates(buckets: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """(R, B, H, N, N) bool: key j is in query i's chunk or the one before (no look-back with
    a single chunk), from the buckets of every round."""
    n = buckets.shape[-1]
    positions = torch.arange(n)
    order = (buckets * n + positions).argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
    chunk = rank // bucket_size
    n_chunks = math.ceil(n / bucket_size)
    query_chunk, key_chunk = chunk[..., :, None], chunk[..., None, :]
    candidates = key_chunk == query_chunk
    if n_chunks > 1:
        candidates |= key_chunk == (query_chunk - 1) % n_chunks
    return candidates


def lsh_reference(attn, q, v, causal, real, sink=None):
    """Float64 LSH attention from `attn.buckets(q)`: one softmax over the allowed keys of
    every round (a key allowed in r rounds counts r times), and the null key of `sink`."""
    n = q.shape[2]
    buckets = attn.buckets(q)
    keys = F.normalize(q, dim=-1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    itself = torch.eye(n, dtype=torch.bool)
    rounds = []
    for candidates in lsh_candidates(buckets, attn.params.bucket_size):
        others = candidates & ~itself & real[:, None, None, :]
        if causal:
            others &= torch.ones(n, n, dtype=torch.bool).tril()
        alone = ~others.any(-1, keepdim=True)
        rounds.append(others | (itself & alone))
    copies = len(rounds)
    return reference_attention(q, keys.repeat(1, 1, copies, 1), v.repeat(1, 1, copies, 1),
                               torch.cat(rounds, dim=-1), key_padding_mask=real.repeat(1, copies),
                               sink=sink)


LSH_CASES = [
    {"bucket_size": 8, "n_hashes": 3, "seed": 0},
    {"bucket_size": 5, "n_hashes": 1, "seed": 1},
    {"bucket_size": 64, "n_hashes": 2, "seed": 2},
    {"bucket_size": 400, "n_hashes": 2, "seed": 3},  # one chunk: no look-back
]


@pytest.mark.parametrize("params", LSH_CASES, ids=params_id)
@pytest.mark.parametrize("n", [1, 97, 300])
def test_lsh_matches_dense_reference(params, n):
    attn = attn_zoo.build("lsh", **params)
    for causal, kv_heads in ((False, 2), (True, 1)):
        q, k, v = qkv(batch=3, q_heads=4, kv_heads=kv_heads, n=n, dim=16, dtype=torch.float64,
                      seed=n, requires_grad=True)
        real = padding(3, n, seed=n + 1)
        out = attn(q, k, v, causal=causal, key_padding_mask=real)
        expected = lsh_reference(attn, q, v, causal, real)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        check_shared_qk_gradients(out, expected, q, k, v)


def test_lsh_single_key_attends_to_itself():
    attn = attn_zoo.build("lsh", bucket_size=4, seed=0)
    q, k, v = qkv(n=1)
    torch.testing.assert_close(attn(q, k, v), v.repeat_interleave(2, 1))


def test_lsh_ignores_the_given_keys():
    attn = attn_zoo.build("lsh", bucket_size=8, seed=0)
    q, k, v = qkv(n=50)
    torch.testing.assert_close(attn(q, k, v), attn(q, torch.randn_like(k), v))


def test_lsh_seed_fixes_the_buckets():
    q, k, v = qkv(n=97)
    a, b = (attn_zoo.build("lsh", bucket_size=8, seed=7) for _ in range(2))
    buckets = a.buckets(q)
    assert buckets.shape == (4, 2, 4, 97) and buckets.dtype == torch.long
    assert 0 <= buckets.min() and buckets.max() < 2 * math.ceil(97 / 16)
    assert torch.equal(buckets, b.buckets(q))
    assert torch.equal(buckets, a.buckets(q.double()))  # same rotations in every dtype
    assert not torch.equal(buckets, attn_zoo.build("lsh", bucket_size=8, seed=8).buckets(q))
    torch.testing.assert_close(a(q, k, v), b(q, k, v), atol=0, rtol=0)


def test_lsh_without_seed_draws_from_the_torch_rng():
    attn = attn_zoo.build("lsh", bucket_size=8)
    q, k, v = qkv(n=97)
    torch.manual_seed(5)
    first, first_buckets = attn(q, k, v), attn.buckets(q)
    torch.manual_seed(5)
    torch.testing.assert_close(attn(q, k, v), first, atol=0, rtol=0)
    assert torch.equal(attn.buckets(q), first_buckets)
    assert not torch.equal(attn.buckets(q), first_buckets)  # the RNG moved on


@pytest.mark.parametrize("n", [1, 37, 97, 300])
@pytest.mark.parametrize("bucket_size", [5, 16, 64])
def test_lsh_scored_pairs_count_the_chunks(n, bucket_size):
    attn = attn_zoo.build("lsh", bucket_size=bucket_size, n_hashes=2, seed=0)
    q = qkv(batch=1, q_heads=1, n=n)[0]
    candidates = lsh_candidates(attn.buckets(q), bucket_size)
    assert attn.scored_pairs(n, False) == int(candidates.sum())
    # Causal: the earlier keys of the own chunk exactly, half the look-back pairs.
    n_chunks = math.ceil(n / bucket_size)
    sizes = [bucket_size] * (n_chunks - 1) + [n - (n_chunks - 1) * bucket_size]
    own = sum(s * (s + 1) // 2 for s in sizes)
    back = attn.scored_pairs(n, False) // 2 - sum(s * s for s in sizes)
    assert attn.scored_pairs(n, True) == 2 * (own + back // 2)
    assert attn.flops(n, 32, False) == 4 * 32 * attn.scored_pairs(n, False)
    if n >= 4 * bucket_size:
        assert attn.scored_pairs(n, False) <= 2 * n * 2 * bucket_size


def test_lsh_memory_is_linear():
    attn = attn_zoo.build("lsh", bucket_size=32, n_hashes=2, seed=0)

    def peak(n: int, grad: bool) -> int:
        q, k, v = (torch.randn(1, 2, n, 32, requires_grad=grad) for _ in range(3))
        if grad:
            return peak_memory(lambda: attn(q, k, v, causal=True).sum().backward())
        with torch.no_grad():
            return peak_memory(lambda: attn(q, k, v, causal=True))

    for grad in (False, True):
        small, large = peak(1024, grad), peak(4096, grad)
        assert large / small < 4.5  # 4x the length: 4x the memory, not 16x
        # The scores of all rounds, (R, B, H, N, 2 * bucket_size) float32, a few times over;
        # one N x N float32 matrix per head would be 32 of them.
        scores = 2 * 2 * 4096 * 64 * 4
        assert large < 10 * scores, large / scores


@pytest.mark.parametrize("name,params,match", [
    ("lsh", {"n_hashes": 0}, "n_hashes.*0"),
    ("lsh", {"bucket_size": 0}, "bucket_size.*0"),
    ("lsh", {"seed": -1}, "seed.*-1"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize("name,params", [
    ("lsh", {"n_hashes": 2.0}),
    ("lsh", {"seed": "1"}),
])
def test_parameter_types(name, params):
    with pytest.raises(TypeError, match=next(iter(params))):
        attn_zoo.build(name, **params)


@pytest.mark.parametrize("name", ["lsh"])
def test_training_gradients_reach_queries_and_values(name):
    attn = attn_zoo.build(name, **({"bucket_size": 8} if name == "lsh" else {}))
    q, k, v = qkv(n=50, requires_grad=True)
    attn(q, k, v, causal=True).square().sum().backward()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert torch.equal(k.grad, torch.zeros_like(k))
