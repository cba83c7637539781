"""The backbone: learning, KV-cached generation, padding masks, every variant plugged in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attn_zoo
from attn_zoo import generation
from attn_zoo.attention import Attention
from attn_zoo.layers import RotaryEmbedding
from attn_zoo.model import Seq2SeqTransformer, TransformerEncoder, TransformerLM
from attn_zoo.registry import get

VOCAB = 11
ATTENTIONS = [("full", None), ("local", {"window": 3})]


def tiny_lm(attention="full", attention_params=None, seed=0, **kwargs) -> TransformerLM:
    torch.manual_seed(seed)
    options = dict(dim=32, depth=2, heads=4, kv_heads=2, max_seq_len=64) | kwargs
    model = TransformerLM(VOCAB, attention=attention, attention_params=attention_params,
                          **options)
    return varied(model).eval()


def varied(model: torch.nn.Module) -> torch.nn.Module:
    """Larger weights than the GPT-2 init: an untrained model then predicts varied tokens that
    depend on the context (with the small init it mostly repeats its last input token)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    torch.nn.init.normal_(model.embedding.weight, std=0.5)
    return model


def tokens(shape, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# -- learning -------------------------------------------------------------------------------


def train_copy_task(model: TransformerLM, steps: int, length: int = 6) -> list[float]:
    """Random tokens, a separator, the same tokens; returns the loss on the copy half per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randint(1, VOCAB, (32, length), generator=generator)
        sequence = torch.cat([x, torch.zeros(32, 1, dtype=torch.long), x], dim=1)
        logits = model(sequence[:, :-1])[:, length:]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), sequence[:, length + 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_local_attention_lm_learns_to_copy():
    torch.manual_seed(0)
    # One layer suffices: with RoPE a head can attend exactly length + 1 back (window 8).
    model = TransformerLM(VOCAB, dim=32, depth=1, heads=2, attention="local",
                          attention_params={"window": 8})
    assert train_copy_task(model, 120)[-1] < 0.05


@pytest.mark.parametrize("name", attn_zoo.available())
def test_every_variant_trains(name):
    """Default parameters, by name: the copy-task loss falls.

    A static pattern sees the whole 12-token sequence and must learn to copy (loss well
    below chance). A content-based variant at its defaults routes among tiny groups here
    (routing: 8 clusters of 2 tokens) whose membership has no gradient, so it must only
    learn at all.
    """
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, dim=32, depth=1, heads=2, attention=name)
    losses = train_copy_task(model, 60)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < (0.99 if get(name).content_based else 0.6) * first


# -- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,params", ATTENTIONS, ids=["full", "local"])
@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned", "none"])
def test_cached_logits_equal_full_forward(attention, params, pos):
    model = tiny_lm(attention, params, pos=pos)
    sequence = tokens((2, 12))
    cache = model.init_cache()
    with torch.no_grad():
        steps = [model(sequence[:, :5], cache)]
        steps += [model(sequence[:, i:i + 1], cache) for i in range(5, sequence.shape[1])]
        expected = model(sequence)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_local_cache_is_a_rolling_buffer():
    window = 3
    model = tiny_lm("local", {"window": window})
    sequence = tokens((2, 15))
    cache = model.init_cache()
    with torch.no_grad():
        model(sequence[:, :2], cache)
        for i in range(2, sequence.shape[1]):
            model(sequence[:, i:i + 1], cache)
            for layer in cache.layers:
                assert len(layer) == min(i + 1, window + 1)
                assert layer.buffers["k"].shape[2] == layer.buffers["v"].shape[2] == window + 1
    assert cache.seen == sequence.shape[1]


def test_greedy_equals_argmax_of_forward_and_top_k_one_sampling():
    model = tiny_lm()
    out = model.generate(tokens((2, 3)), 5)
    with torch.no_grad():
        predicted = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 3:], predicted[:, 2:])
    sampled = model.generate(tokens((2, 3)), 5, strategy="sample", top_k=1,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, out)


def test_eos_pads_finished_rows_and_stops():
    model = tiny_lm()
    prompt = tokens((2, 3))
    free = model.generate(prompt, 6)
    eos = int(free[0, 3])  # row 0 emits it first
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert torch.equal(out[0, 3:], torch.full_like(out[0, 3:], eos))
    assert out.shape[1] <= 3 + 6
    finished = (out[:, 3:] == eos).cummax(dim=1).values
    assert torch.equal(out[:, 3:][finished], torch.full_like(out[:, 3:][finished], eos))


def test_beam_search_scores_at_least_greedy():
    model = tiny_lm(seed=3)
    prompt = tokens((2, 4))

    def log_prob(sequence):
        with torch.no_grad():
            logits = model(sequence[:, :-1]).log_softmax(-1)[:, 3:]
        return logits.gather(-1, sequence[:, 4:, None]).sum((1, 2))

    greedy = model.generate(prompt, 5)
    beam = model.generate(prompt, 5, strategy="beam", num_beams=4)
    assert (log_prob(beam) >= log_prob(greedy) - 1e-5).all()


# -- encoder and encoder-decoder ------------------------------------------------------------


@pytest.mark.parametrize("attention,params", ATTENTIONS, ids=["full", "local"])
def test_encoder_ignores_padded_tokens(attention, params):
    torch.manual_seed(0)
    encoder = TransformerEncoder(16, 2, 2, attention=attention, attention_params=params).eval()
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :2] = False
    changed = torch.where(mask[..., None], x, torch.randn(2, 9, 16))
    torch.testing.assert_close(encoder(changed, mask)[mask], encoder(x, mask)[mask],
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention,params", ATTENTIONS, ids=["full", "local"])
def test_seq2seq_respects_padding_masks(attention, params):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, 16, 2, 2, attention=attention,
                               attention_params=params).eval()
    source, target = tokens((2, 8), seed=1), tokens((2, 6), seed=2)
    source_mask = torch.ones(2, 8, dtype=torch.bool)
    source_mask[0, 5:] = False
    target_mask = torch.ones(2, 6, dtype=torch.bool)
    target_mask[1, :2] = False  # left padding: the causal mask alone would not hide it
    other_source = torch.where(source_mask, source, tokens((2, 8), seed=3))
    other_target = torch.where(target_mask, target, tokens((2, 6), seed=4))
    with torch.no_grad():
        memory = model.encode(source, source_mask)
        torch.testing.assert_close(model.encode(other_source, source_mask)[source_mask],
                                   memory[source_mask], atol=1e-6, rtol=1e-6)
        expected = model(source, target, source_mask, target_mask)[target_mask]
        for s, t in ((other_source, target), (source, other_target)):
            out = model(s, t, source_mask, target_mask)[target_mask]
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# -- every registered variant ---------------------------------------------------------------


@pytest.mark.parametrize("name", attn_zoo.available())
def test_every_variant_plugs_into_the_backbone(name):
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, dim=16, depth=1, heads=2, kv_heads=1, attention=name)
    sequence = tokens((2, 21))
    logits = model(sequence)
    assert logits.shape == (2, 21, VOCAB)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), sequence.reshape(-1))
    # A variant's own loss (topk's indexer loss) trains the weights the task loss cannot reach.
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        if attention.auxiliary_loss() is not None:
            loss = loss + attention.auxiliary_loss()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.generate(sequence[:, :4], 3).shape == (2, 7)
    if get(name).causal_only:
        with pytest.raises(ValueError, match="causal only"):
            TransformerEncoder(16, 1, 2, attention=name)
    else:
        encoder = TransformerEncoder(16, 1, 2, attention=name)
        assert encoder(torch.randn(2, 21, 16)).shape == (2, 21, 16)


# -- positions and arguments ----------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_position, key_position):
        return (rope(q, torch.tensor([query_position]))
                * rope(k, torch.tensor([key_position]))).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_learned_positions_stop_at_max_seq_len():
    model = tiny_lm(pos="learned", max_seq_len=8)
    assert model(tokens((1, 8))).shape == (1, 8, VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens((1, 9)))


@pytest.mark.parametrize("kwargs,name", [
    ({"vocab_size": 0}, "vocab_size"),
    ({"dim": 30}, "dim"),
    ({"kv_heads": 3}, "kv_heads"),
    ({"depth": 0}, "depth"),
    ({"pos": "alibi"}, "pos"),
    ({"norm": "batch"}, "norm"),
    ({"mlp": "relu"}, "mlp"),
    ({"dropout": 1.5}, "dropout"),
    ({"dim": 12, "heads": 4}, "head_dim"),  # RoPE needs an even head dimension
    ({"attention": "nope"}, "nope"),
    ({"attention": "local", "attention_params": {"window": -1}}, "window"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    options = dict(vocab_size=VOCAB, dim=32, depth=1, heads=4, kv_heads=2) | kwargs
    with pytest.raises(ValueError, match=name):
        TransformerLM(**options)


@pytest.mark.parametrize("kwargs,name", [
    ({"strategy": "top"}, "strategy"),
    ({"strategy": "sample", "temperature": 0.0}, "temperature"),
    ({"strategy": "sample", "top_p": 0.0}, "top_p"),
    ({"strategy": "sample", "top_k": 0}, "top_k"),
    ({"strategy": "beam", "num_beams": 0}, "num_beams"),
])
def test_bad_generation_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_lm().generate(tokens((1, 3)), 2, **kwargs)


def never_called(*args, **kwargs):
    raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"eos_token_id": VOCAB}, ValueError, f"eos_token_id must be an int in \\[0, {VOCAB}\\), "
     f"got {VOCAB}"),
    ({"eos_token_id": -1}, ValueError, "eos_token_id"),
    ({"eos_token_id": 2.0}, TypeError, "eos_token_id must be an int or None, got 2.0"),
    ({"prompt": torch.tensor([[1, VOCAB + 3]])}, ValueError,
     f"prompt must be token ids in \\[0, vocab_size={VOCAB}\\), got 'ids in \\[1, {VOCAB + 3}\\]'"),
    ({"prompt": torch.tensor([[-1, 2]])}, ValueError, "prompt must be token ids"),
    ({"prompt": torch.ones(1, 3)}, ValueError, "prompt must be a \\(B, P\\) integer tensor"),
    ({"prompt": [[1, 2]]}, TypeError, "prompt must be"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number, got 'hot'"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite number"),
    ({"strategy": "sample", "top_k": 2.5}, TypeError, "top_k must be an int or None, got 2.5"),
    ({"strategy": "sample", "top_k": True}, TypeError, "top_k"),
    ({"strategy": "sample", "top_p": "most"}, TypeError, "top_p must be a number or None"),
    ({"strategy": "sample", "top_p": 1.5}, ValueError, "top_p must be in \\(0, 1\\]"),
    ({"strategy": "beam", "num_beams": "4"}, TypeError, "num_beams must be an int, got '4'"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0, got -1"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int, got 2.0"),
    ({"strategy": None}, TypeError, "strategy must be a str, got None"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator or None, got 0"),
    ({"context": [1]}, TypeError, "context must be a dict or None"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be an int >= 1, got 0"),
])
def test_generation_arguments_are_checked_before_the_model_runs(kwargs, error, message):
    options = {"prompt": tokens((1, 3)), "max_new_tokens": 2, "vocab_size": VOCAB} | kwargs
    model = tiny_lm()
    with pytest.raises(error, match=message):
        generation.generate(never_called, cache=model.init_cache(), **options)


@pytest.mark.parametrize("kwargs", [{"eos_token_id": VOCAB}, {"temperature": "hot"}])
def test_models_pass_their_vocabulary_and_check_before_encoding(kwargs, monkeypatch):
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        tiny_lm().generate(tokens((1, 3)), 2, **kwargs)
    with pytest.raises(ValueError, match="prompt must be token ids"):
        tiny_lm().generate(torch.tensor([[VOCAB]]), 2)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, 16, 1, 2)
    monkeypatch.setattr(model, "encode", never_called)
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        model.generate(tokens((1, 4)), tokens((1, 1)), 2, **kwargs)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_an_empty_batch_generates_an_empty_result(strategy):
    prompt = torch.zeros(0, 3, dtype=torch.long)
    out = tiny_lm().generate(prompt, 4, strategy=strategy, num_beams=3)
    assert out.shape == (0, 3) and out.dtype == torch.long
