"""Bad input fails loudly, naming the parameter or tensor and the value it got."""

from __future__ import annotations

import pytest
import torch
from conftest import qkv

import attn_zoo
from attn_zoo import Attention, register
from attn_zoo.params import Params


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
    assert "plain" not in attn_zoo.available() and "incomplete" not in attn_zoo.available()


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
        ("full", {"scale": 0.0}, ValueError, r"scale must be > 0 or None, got 0.0"),
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

    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match="'causal-only' is causal only, got causal=False"):
        CausalOnly()(q, k, v, causal=False)
