"""Learned weights whose shapes depend on the heads and head_dim (`Attention.weight_names`):
created once by `initialize` (by the backbone at construction, or by the first call), checked
against later shapes, saved and loaded before and after they exist."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parameter import is_lazy

import attn_zoo
from attn_zoo.attention import Attention
from attn_zoo.model import MultiheadAttention
from attn_zoo.registry import get


class Scaled(Attention):
    """Each query head's output is its query times a learned vector (not registered)."""

    weight_names = ("gain",)

    def weight_shapes(self, q_heads, kv_heads, head_dim):
        return {"gain": (q_heads, head_dim)}

    def reset_weights(self):
        self.gain.fill_(2.0)

    def _forward_torch(self, q, k, v, causal, key_padding_mask, scale):
        return q * self.gain.view(1, q.shape[1], q.shape[2], 1, -1).to(q), None

    def scored_pairs(self, n, causal):
        return 0


def inputs(q_heads=4, kv_heads=2, dim=8):
    return torch.randn(1, q_heads, 5, dim), torch.randn(1, kv_heads, 5, dim), torch.randn(
        1, kv_heads, 5, dim)


def test_the_first_call_creates_the_weights_once():
    attn = Scaled()
    assert is_lazy(attn.gain)
    q, k, v = inputs()
    torch.testing.assert_close(attn(q, k, v), 2 * q)
    assert attn.gain.shape == (4, 8) and not is_lazy(attn.gain)
    with torch.no_grad():
        attn.gain.fill_(3.0)
    torch.testing.assert_close(attn(q, k, v), 3 * q)  # created once, not reset
    with pytest.raises(ValueError, match=r"holds gain of shape \(4, 8\).*head_dim=16 need "
                                         r"\(4, 16\)"):
        attn(*inputs(dim=16))


def test_an_optimizer_built_after_the_first_call_trains_them():
    attn = Scaled()
    q, k, v = inputs()
    attn(q, k, v)
    optimizer = torch.optim.SGD(attn.parameters(), lr=0.1)
    attn(q, k, v).sum().backward()
    optimizer.step()
    assert not torch.equal(attn.gain, torch.full((4, 8), 2.0))


def test_state_dicts_before_and_after_creation():
    trained = Scaled()
    trained.initialize(4, 2, 8)
    with torch.no_grad():
        trained.gain.normal_()
    fresh = Scaled()
    fresh.load_state_dict(trained.state_dict())  # shapes come from the checkpoint
    assert torch.equal(fresh.gain, trained.gain)
    empty = Scaled()
    empty.load_state_dict(Scaled().state_dict())  # neither created: stays to be created
    assert is_lazy(empty.gain)


WEIGHTED = [name for name in attn_zoo.available() if get(name).weight_names]


@pytest.mark.parametrize("name", WEIGHTED)
def test_the_backbone_creates_every_variants_weights_at_construction(name):
    layer = MultiheadAttention(32, 4, kv_heads=2, attention=name,
                               attention_params=get(name).Params.tiny())
    assert not any(is_lazy(p) for p in layer.parameters())
    assert {name for name, _ in layer.attention.named_parameters()} >= set(
        get(name).weight_names)
