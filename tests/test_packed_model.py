"""The backbone on packed rows and with sinks: positions restart at each document, a packed
forward equals each document alone, generation continues each row's last document."""

from __future__ import annotations

import pytest
import torch

import attn_zoo
from attn_zoo import generation
from attn_zoo.cache import cache_for
from attn_zoo.layers import RotaryEmbedding
from attn_zoo.model import MultiheadAttention, Seq2SeqTransformer, TransformerEncoder, TransformerLM
from attn_zoo.registry import get

VOCAB = 13
# Two rows of 17 tokens: documents of lengths 1, 5, 3, 8 and 17 (one filling its row).
LENGTHS = [[1, 5, 3, 8], [17]]


def packed_ids(lengths: list[list[int]]) -> torch.Tensor:
    """(B, N) document ids, numbered from 0 in each row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                        for row in lengths])


def documents(lengths: list[list[int]]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document."""
    spans = []
    for row, sizes in enumerate(lengths):
        start = 0
        for size in sizes:
            spans.append((row, start, start + size))
            start += size
    return spans


def varied(model: torch.nn.Module) -> torch.nn.Module:
    """Large random weights (sinks included): outputs depend strongly on the context."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
        if isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.5)
        if isinstance(module, attn_zoo.Attention):
            for parameter in module.parameters():
                torch.nn.init.normal_(parameter, std=0.5)
    return model.eval()


def tiny_lm(attention="full", params=None, seed=0, **kwargs) -> TransformerLM:
    torch.manual_seed(seed)
    options = dict(dim=32, depth=2, heads=4, kv_heads=2, max_seq_len=32) | kwargs
    return varied(TransformerLM(VOCAB, attention=attention, attention_params=params, **options))


def tokens(shape, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def watched(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters whose gradients the packed tests compare: a projection, and the sink."""
    attn = model.stack.blocks[0].attn
    return [attn.q_proj.weight] + ([] if attn.attention.sink is None else [attn.attention.sink])


# -- positions restart at each document -----------------------------------------------------


def test_rope_takes_one_row_of_positions_per_batch_row():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 0, 1, 2], [3, 4, 5, 6, 7]])
    rotated = rope(x, positions)
    for row in range(2):
        torch.testing.assert_close(rotated[row], rope(x[row:row + 1], positions[row])[0])
    assert not torch.allclose(rotated[0], rope(x[:1], torch.arange(5))[0])


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("sinks", [False, True])
def test_packed_lm_equals_each_document_alone(pos, sinks):
    """Logits and the gradients of a weight and the sink, float64: each document as its own
    sequence."""
    model = tiny_lm(pos=pos, sinks=sinks).double()
    ids, sequence = packed_ids(LENGTHS), tokens((2, 17))
    weights = torch.randn(2, 17, VOCAB, dtype=torch.float64)
    packed = model(sequence, document_ids=ids)
    (packed * weights).sum().backward()
    packed_grads = [parameter.grad.clone() for parameter in watched(model)]
    model.zero_grad()
    alone = torch.zeros_like(packed)
    for row, start, end in documents(LENGTHS):
        logits = model(sequence[row:row + 1, start:end])
        alone[row, start:end] = logits[0].detach()
        (logits[0] * weights[row, start:end]).sum().backward()
    torch.testing.assert_close(packed.detach(), alone, atol=1e-12, rtol=1e-12)
    for packed_grad, parameter in zip(packed_grads, watched(model), strict=True):
        torch.testing.assert_close(packed_grad, parameter.grad, atol=1e-12, rtol=1e-12)
    # Not what the whole rows give: the documents do matter.
    assert not torch.allclose(packed, model(sequence), atol=1e-3)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
def test_packed_encoder_equals_each_document_alone(pos):
    """With a padding mask too: a padded token inside a document stays hidden."""
    torch.manual_seed(0)
    encoder = varied(TransformerEncoder(16, 2, 2, attention="local",
                                        attention_params={"window": 3}, pos=pos,
                                        max_seq_len=32, sinks=True)).double()
    ids = packed_ids(LENGTHS)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    real = torch.ones(2, 17, dtype=torch.bool)
    real[0, 10] = real[1, 3] = False
    weights = torch.randn(2, 17, 16, dtype=torch.float64)
    packed = encoder(x, real, document_ids=ids)
    (packed * weights)[real].sum().backward()
    packed_grads = [parameter.grad.clone() for parameter in watched(encoder)]
    encoder.zero_grad()
    for row, start, end in documents(LENGTHS):
        alone = encoder(x[row:row + 1, start:end], real[row:row + 1, start:end])[0]
        keep = real[row, start:end]
        torch.testing.assert_close(packed[row, start:end][keep].detach(), alone[keep].detach(),
                                   atol=1e-12, rtol=1e-12)
        (alone * weights[row, start:end])[keep].sum().backward()
    for packed_grad, parameter in zip(packed_grads, watched(encoder), strict=True):
        torch.testing.assert_close(packed_grad, parameter.grad, atol=1e-12, rtol=1e-12)


def test_learned_positions_bound_each_document_not_the_row():
    """max_seq_len = 8: a row of 17 tokens in documents of at most 8 runs; a document of 9
    does not."""
    model = tiny_lm(pos="learned", max_seq_len=8)
    assert model(tokens((2, 17)), document_ids=packed_ids(LENGTHS[:1] * 2)).shape == (2, 17, VOCAB)
    with pytest.raises(ValueError, match="max_seq_len \\(8\\).*got position 8"):
        model(tokens((1, 10)), document_ids=packed_ids([[1, 9]]))


# -- sinks ----------------------------------------------------------------------------------


def test_multihead_attention_with_sinks_has_one_learned_sink_per_query_head():
    torch.manual_seed(0)
    layer = MultiheadAttention(32, heads=4, kv_heads=2, attention="local",
                               attention_params={"window": 3}, sinks=True)
    assert layer.attention.sink.shape == (4,)
    layer(torch.randn(2, 9, 32), causal=True).square().sum().backward()
    assert layer.attention.sink.grad is not None and (layer.attention.sink.grad != 0).all()
    assert MultiheadAttention(32, heads=4).attention.sink is None


def test_sinks_reach_every_attention_of_the_models():
    lm = TransformerLM(VOCAB, 16, 2, 2, sinks=True)
    seq2seq = Seq2SeqTransformer(VOCAB, 16, 2, 2, sinks=True)
    encoder = TransformerEncoder(16, 2, 2, sinks=True)
    attentions = [module for model in (lm, seq2seq, encoder) for module in model.modules()
                  if isinstance(module, attn_zoo.Attention)]
    assert len(attentions) == 2 + 2 + 2 + 2 + 2  # seq2seq: encoder, decoder and cross
    assert all(attention.sink.shape == (2,) for attention in attentions)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"sinks": 1}, TypeError, "sinks must be a bool, got 1"),
    ({"attention_params": {"sinks": 4}}, ValueError,
     "attention_params must not set sinks \\(got 4\\): sinks=True gives one per query head"),
])
def test_bad_sinks_name_the_parameter(kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiheadAttention(32, heads=4, **kwargs)


# -- bad document_ids -----------------------------------------------------------------------


@pytest.mark.parametrize("ids,error,message", [
    (torch.zeros(2, 16, dtype=torch.long), ValueError, "document_ids must have shape"),
    (torch.zeros(2, 17), TypeError, "document_ids must be an integer tensor"),
    (-torch.ones(2, 17, dtype=torch.long), ValueError, "document_ids must be >= 0"),
    (torch.tensor([[0] * 5 + [1] * 5 + [0] * 7] * 2), ValueError, "contiguous runs"),
])
def test_bad_document_ids_in_forward(ids, error, message):
    model = tiny_lm(pos="sinusoidal")
    with pytest.raises(error, match=message):
        model(tokens((2, 17)), document_ids=ids)
    with pytest.raises(error, match=message):
        TransformerEncoder(16, 1, 2)(torch.randn(2, 17, 16), document_ids=ids)


def test_document_ids_with_a_cache_point_to_generate():
    model = tiny_lm()
    with pytest.raises(ValueError, match="document_ids cannot be used with a KV cache.*generate"):
        model(tokens((2, 17)), model.init_cache(), document_ids=packed_ids(LENGTHS))


def test_document_ids_are_for_self_attention():
    layer = MultiheadAttention(16, heads=2)
    with pytest.raises(ValueError, match="document_ids applies to self-attention"):
        layer(torch.randn(1, 4, 16), torch.randn(1, 6, 16),
              document_ids=torch.zeros(1, 4, dtype=torch.long))


# -- generation continues the last document of each row -------------------------------------

# Four rows of 9: last documents of 3, 5, 3 and 1 tokens (groups of two lengths share one).
PROMPT_LENGTHS = [[2, 4, 3], [4, 5], [6, 3], [1, 7, 1]]
EXACT = [name for name in attn_zoo.available()
         if cache_for(attn_zoo.build(name, **get(name).Params.tiny())).exact]


def teacher_forced_argmax(model, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Argmax of the packed forward over `out`, the new tokens extending the last document."""
    new = out.shape[1] - ids.shape[1]
    extended = torch.cat([ids, ids[:, -1:].expand(-1, new)], dim=1)
    with torch.no_grad():
        logits = model(out[:, :-1], document_ids=extended[:, :-1])
    return logits[:, ids.shape[1] - 1:].argmax(-1)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("sinks", [False, True])
def test_greedy_generation_of_packed_prompts_equals_the_packed_forward(name, sinks):
    model = tiny_lm(name, get(name).Params.tiny(), sinks=sinks).double()
    ids, prompt = packed_ids(PROMPT_LENGTHS), tokens((4, 9), seed=2)
    out = model.generate(prompt, 8, document_ids=ids)
    assert out.shape == (4, 9 + 8) and torch.equal(out[:, :9], prompt)
    assert torch.equal(out[:, 9:], teacher_forced_argmax(model, out, ids))


def test_generation_from_the_last_documents_alone():
    """Earlier documents do not matter, and one document per row is plain generation."""
    model = tiny_lm("local", {"window": 3})
    ids, prompt = packed_ids(PROMPT_LENGTHS), tokens((4, 9), seed=3)
    out = model.generate(prompt, 6, document_ids=ids)
    changed = torch.where(ids == ids[:, -1:], prompt, tokens((4, 9), seed=4))
    assert not torch.equal(changed, prompt)
    assert torch.equal(model.generate(changed, 6, document_ids=ids)[:, 9:], out[:, 9:])
    single = torch.zeros(4, 9, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 6, document_ids=single), model.generate(prompt, 6))


def test_groups_that_stop_early_are_padded_with_eos():
    model = tiny_lm()
    ids, prompt = packed_ids(PROMPT_LENGTHS), tokens((4, 9), seed=2)
    free = model.generate(prompt, 8, document_ids=ids)
    eos = int(free[3, 9])  # row 3, alone in its group (last document of 1), stops at once
    assert not (free[1, 9:] == eos).any(), "another group must run to the end"
    out = model.generate(prompt, 8, document_ids=ids, eos_token_id=eos)
    assert out.shape == (4, 9 + 8)
    assert torch.equal(out[3, 9:], torch.full((8,), eos))
    for row in range(4):
        hit = (free[row, 9:] == eos).nonzero()
        stop = 8 if hit.numel() == 0 else int(hit[0]) + 1
        assert torch.equal(out[row, 9:9 + stop], free[row, 9:9 + stop])
        assert (out[row, 9 + stop:] == eos).all()


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_other_strategies_take_packed_prompts(strategy):
    model = tiny_lm()
    ids, prompt = packed_ids(PROMPT_LENGTHS), tokens((4, 9), seed=2)
    out = model.generate(prompt, 5, document_ids=ids, strategy=strategy, num_beams=2,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 14) and torch.equal(out[:, :9], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB


def never_called(*args, **kwargs):
    raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"document_ids": torch.zeros(4, 8, dtype=torch.long)}, ValueError,
     "document_ids must have shape \\(B, N\\) = \\(4, 9\\), got \\(4, 8\\)"),
    ({"document_ids": torch.zeros(4, 9)}, TypeError, "document_ids must be an integer tensor"),
    ({"document_ids": torch.tensor([[0, 1, 0] * 3] * 4)}, ValueError, "contiguous runs"),
    ({"document_ids": -torch.ones(4, 9, dtype=torch.long)}, ValueError, ">= 0"),
    ({"eos_token_id": VOCAB}, ValueError, "eos_token_id"),
    ({"prompt": torch.full((4, 9), VOCAB)}, ValueError, "prompt must be token ids"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
])
def test_packed_generation_arguments_are_checked_before_the_model_runs(kwargs, error, message):
    options = {"prompt": tokens((4, 9)), "max_new_tokens": 2, "vocab_size": VOCAB,
               "document_ids": packed_ids(PROMPT_LENGTHS)} | kwargs
    with pytest.raises(error, match=message):
        generation.generate_last_documents(never_called, new_cache=never_called, **options)
    with pytest.raises(error, match=message):
        tiny_lm().generate(**{key: value for key, value in options.items()
                              if key != "vocab_size"})
