"""Bad input fails loudly, naming the parameter or tensor and the value it got."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANT_MODES, call, qkv, variant_id

import attn_zoo
from attn_zoo import Attention, cache_for, register
from attn_zoo.params import MAX_INT, Params
from attn_zoo.registry import get


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown attention 'nope'.*full.*local"):
        attn_zoo.build("nope")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="'local'.*already taken"):
        register("local")(type("Other", (Attention,), {"_forward_torch": lambda *a: None,
                                                       "scored_pairs": lambda *a: 0}))


def test_only_complete_attention_classes_register():
    with pytest.raises(TypeError, match="not a subclass of attn_zoo.Attention"):
        register("plain")(object)
    with pytest.raises(TypeError, match="lacks scored_pairs, _forward_torch"):
        register("incomplete")(type("Incomplete", (Attention,), {}))
    promises = {"_forward_torch": lambda *a: None, "scored_pairs": lambda *a: 0}
    with pytest.raises(TypeError, match="lacks pattern"):
        register("patternless")(type("Patternless", (Attention,),
                                     {**promises, "static_pattern": True}))
    with pytest.raises(TypeError, match="lacks exact_pattern"):
        register("unpooled")(type("Unpooled", (Attention,), {**promises, "pooled_keys": True}))
    with pytest.raises(TypeError, match="'flex' runs `pattern`.*static_pattern = True"):
        register("flexible")(type("Flexible", (Attention,), {
            **promises, "_forward_flex": lambda *a: None, "backends": ("torch", "flex")}))
    with pytest.raises(TypeError, match="abstract .*scored_pairs"):
        type("Uncounted", (Attention,), {"_forward_torch": lambda *a: None})()
    for name in ("plain", "incomplete", "patternless", "unpooled", "flexible"):
        assert name not in attn_zoo.available()


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("local", {"window": -1}, ValueError, r"window must be >= 0, got -1"),
        ("local", {"window": 2.5}, TypeError, r"window must be int, got 2.5"),
        ("local", {"window": True}, TypeError, r"window must be int, got True"),
        ("local", {"windw": 3}, ValueError, r"unknown parameter 'windw'.*expected: .*window"),
        ("full", {"window": 3}, ValueError, r"unknown parameter 'window' for attention 'full'"),
        ("full", {"backend": "cuda"}, ValueError, r"backend must be one of .*, got 'cuda'"),
        ("routing", {"backend": "flex"}, ValueError, r"backend 'flex' is not supported by"),
        ("full", {"scale": 0.0}, ValueError, r"scale must be finite and > 0, or None, got 0.0"),
        ("full", {"scale": float("inf")}, ValueError, r"scale must be finite.*, got inf"),
        ("full", {"scale": float("nan")}, ValueError, r"scale must be finite.*, got nan"),
        ("full", {"scale": 10**400}, ValueError, r"scale must be finite.*, got 1000"),
        ("local", {"window": 10**30}, ValueError, rf"window must be <= {MAX_INT}, got 10{{30}}"),
        ("longformer", {"dilation": 2**62}, ValueError, r"dilation must be <= 1024, got 4611"),
        ("lsh", {"n_hashes": 10**6}, ValueError, r"n_hashes must be <= 64, got 1000000"),
        ("routing", {"n_clusters": 10**6}, ValueError, r"n_clusters must be <= 4096, got 10{6}"),
        ("bigbird", {"block": 10**6}, ValueError, r"block must be <= 1024, got 1000000"),
        ("full", {"scale": "big"}, TypeError, r"scale must be float or None, got 'big'"),
    ],
)
def test_bad_parameters_fail_at_build(name, params, error, match):
    with pytest.raises(error, match=match):
        attn_zoo.build(name, **params)


def _bad_calls():
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=10, dim=8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    return [
        ("rank", (q[0], k, v), {}, ValueError, r"q must have shape \(B, H, N, D\), got \(4, 10"),
        ("type", (q.numpy(), k, v), {}, TypeError, r"q must be a torch.Tensor, got ndarray"),
        ("dtype", (q.long(), k.long(), v.long()), {}, TypeError, r"q must be float32.*int64"),
        ("mixed", (q, k.double(), v), {}, ValueError, r"k must match q's dtype"),
        ("kv", (q, k, v[..., :4]), {}, ValueError, r"k and v must have the same shape"),
        ("batch", (q, k[:1], v[:1]), {}, ValueError, r"k batch size must equal q's \(2\), got 1"),
        ("dim", (q, k[..., :4], v[..., :4]), {}, ValueError, r"k head_dim must equal q's \(8\)"),
        ("heads", (q[:, :3], k, v), {}, ValueError, r"q heads \(3\) must be a multiple of k heads"),
        ("no heads", (q[:, :0], k, v), {}, ValueError, r"q heads \(0\) must be a multiple"),
        ("length", (q, k[:, :, :7], v[:, :, :7]), {}, ValueError, r"key length 7"),
        ("causal", (q, k, v), {"causal": 1}, TypeError, r"causal must be a bool, got 1"),
        ("mask dtype", (q, k, v), {"key_padding_mask": mask.int()}, TypeError,
         r"key_padding_mask must be a bool tensor, got torch.int32"),
        ("mask shape", (q, k, v), {"key_padding_mask": mask[:, :9]}, ValueError,
         r"key_padding_mask must have shape \(B, M\) = \(2, 10\), got \(2, 9\)"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
def test_bad_inputs_fail_with_the_value(case):
    _, args, kwargs, error, match = case
    with pytest.raises(error, match=match):
        attn_zoo.build("local", window=3)(*args, **kwargs)


def test_full_accepts_other_key_lengths():
    q, k, v = qkv(n=10)
    out = attn_zoo.build("full")(q, k[:, :, :7], v[:, :, :7])
    assert out.shape == q.shape


def test_causal_only_variant_rejects_bidirectional():
    class CausalOnly(Attention):
        name = "causal-only"
        causal_only = True
        Params = Params

        def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
            return q

        def scored_pairs(self, n, causal):
            return n * (n + 1) // 2

    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match="'causal-only' is causal only, got causal=False"):
        CausalOnly()(q, k, v, causal=False)


INT_PARAMETERS = [(name, field) for name in attn_zoo.available()
                  for field in get(name).Params.limits()]
INT_IDS = [f"{name}-{field}" for name, field in INT_PARAMETERS]


@pytest.mark.parametrize(("name", "field"), INT_PARAMETERS, ids=INT_IDS)
@pytest.mark.parametrize("huge", [2**62, 10**30])
def test_huge_integer_parameters_fail_at_build(name, field, huge):
    limit = get(name).Params.limits()[field]
    with pytest.raises(ValueError, match=f"^{field} must be <= {limit}, got {huge}$"):
        attn_zoo.build(name, **get(name).Params.tiny() | {field: huge})
    with pytest.raises(ValueError, match=f"^{field} must be <= {limit}, got {limit + 1}$"):
        attn_zoo.build(name, **get(name).Params.tiny() | {field: limit + 1})


@pytest.mark.parametrize(("name", "field"), INT_PARAMETERS, ids=INT_IDS)
def test_integer_parameters_at_their_bound_run(name, field):
    """The bounds are sensible: at its bound a parameter still runs a short sequence, and
    decodes it."""
    params = get(name).Params.tiny() | {field: get(name).Params.limits()[field]}
    try:
        attn = attn_zoo.build(name, **params).eval()
    except ValueError as error:  # a relation to another parameter (a multiple of, <= stride)
        assert "<=" not in str(error)
        pytest.skip(f"{field} at its bound breaks a relation: {error}")
    # `sinks` counts the query heads.
    q, k, v = qkv(n=30, dim=8, q_heads=params.get("sinks") or 4)
    real = torch.rand(2, 30, generator=torch.Generator().manual_seed(0)) > 0.3
    for causal in [True] if get(name).causal_only else [False, True]:
        out = call(attn, q, k, v, causal=causal, key_padding_mask=real)
        assert torch.isfinite(out).all()
        assert attn.flops(30, 8, causal) > 0
    cache = cache_for(attn)  # decoding holds what was seen, whatever the window
    cache.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    assert torch.isfinite(cache.step(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6])).all()


@pytest.mark.parametrize("case", VARIANT_MODES, ids=variant_id)
def test_batch_size_zero_returns_an_empty_result_with_gradients(case):
    name, causal = case
    attn = attn_zoo.build(name, **get(name).Params.tiny()).eval()
    q, k, v = qkv(batch=0, n=20, requires_grad=True)
    real = torch.ones(0, 20, dtype=torch.bool)
    for mask in (None, real):
        out = attn(q, k, v, causal=causal, key_padding_mask=mask)
        assert out.shape == q.shape and out.dtype == q.dtype
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("name", attn_zoo.available())
@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), 10**400])
def test_a_scale_that_is_not_finite_fails_at_build(name, scale):
    with pytest.raises(ValueError, match=r"^scale must be finite and > 0, or None, got "):
        attn_zoo.build(name, scale=scale)
