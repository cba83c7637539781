"""Decoding through caches: every variant's cache against the teacher-forced forward (or its
stated decode rule), chunked extend, beam-search reorder, bounded sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attn_zoo
from attn_zoo import cache as cache_module
from attn_zoo import generation
from attn_zoo.cache import DecodeCache, KVCache, cache_for
from attn_zoo.model import Seq2SeqTransformer, TransformerLM
from attn_zoo.registry import get
from attn_zoo.variants.lsh import DECODE_BUCKETS_PER_CHUNK, n_buckets

VOCAB = 13
LENGTH, PROMPT = 40, 7

# float32 logits of these models reach about 10: 1e-4 is about 1e-5 of their scale (in float64
# the caches match the forward to 1e-13). A wrong key or weight moves logits by O(1).
FLOAT32 = {"atol": 1e-4, "rtol": 1e-5}


def params_of(name: str) -> dict:
    """The variant's tiny parameters: 40 positions cross every regime of its pattern (windows
    and their edges, global tokens and blocks, dilation, several blocks and segments, memories
    that fill and roll, compressed groups, buckets and clusters with more members than the
    cap)."""
    return get(name).Params.tiny()


def tiny_lm(name: str, params: dict | None = None, depth: int = 2, seed: int = 0,
            **kwargs) -> TransformerLM:
    """An untrained LM with large weights, so that logits depend strongly on the context."""
    torch.manual_seed(seed)
    options = dict(dim=32, depth=depth, heads=4, kv_heads=2) | kwargs
    model = TransformerLM(VOCAB, attention=name,
                          attention_params=params_of(name) if params is None else params,
                          **options)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    torch.nn.init.normal_(model.embedding.weight, std=0.5)
    for module in model.modules():
        if isinstance(module, attn_zoo.Attention):  # learned taps away from where they start
            for parameter in module.parameters():
                torch.nn.init.normal_(parameter, std=0.5)
    return model.eval()


def tokens(shape, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def decode_logits(model, sequence: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Logits of `sequence` fed through a fresh cache in pieces of `sizes` (summing to N)."""
    cache = model.init_cache()
    out, start = [], 0
    with torch.no_grad():
        for size in sizes:
            out.append(model(sequence[:, start:start + size], cache))
            start += size
    assert cache.seen == sequence.shape[1] == start
    return torch.cat(out, dim=1)


def stepwise(length: int, prompt: int = PROMPT) -> list[int]:
    return [prompt] + [1] * (length - prompt)


# -- every variant --------------------------------------------------------------------------


@pytest.mark.parametrize("name", attn_zoo.available())
def test_every_variant_has_a_cache(name):
    cache = cache_for(attn_zoo.build(name, **params_of(name)))
    assert isinstance(cache, KVCache) and cache.seen == 0 and cache.nbytes() == 0
    if not get(name).content_based and name != "bigbird":
        # A static pattern that does not depend on the length decodes exactly.
        assert cache.exact, f"{name}: a static pattern's cache must be exact"


@pytest.mark.parametrize("name", attn_zoo.available())
@pytest.mark.parametrize("sinks", [False, True])
def test_decoding_equals_the_teacher_forced_forward(name, sinks):
    """Prefill a prompt, step the rest: the logits of `model(tokens)`, for every exact cache
    (with sinks: random nonzero sink logits, applied in every row's softmax)."""
    model = tiny_lm(name, sinks=sinks)
    if not cache_for(model.stack.blocks[0].attn.attention).exact:
        pytest.skip(f"{name} decodes by its own rule: tested against it below")
    sequence = tokens((2, LENGTH))
    with torch.no_grad():
        expected = model(sequence)
    torch.testing.assert_close(decode_logits(model, sequence, stepwise(LENGTH)), expected,
                               **FLOAT32)


@pytest.mark.parametrize("name", attn_zoo.available())
def test_extend_by_several_positions_equals_single_steps(name):
    model = tiny_lm(name)
    sequence = tokens((2, LENGTH), seed=2)
    steps = decode_logits(model, sequence, [1] * LENGTH)
    for sizes in ([PROMPT, 9, 1, 13, 10], [LENGTH], [3, 17, 20]):
        torch.testing.assert_close(decode_logits(model, sequence, sizes), steps,
                                   **FLOAT32)


@pytest.mark.parametrize("name", attn_zoo.available())
def test_reorder_keeps_the_chosen_rows(name):
    """Reordering (repeating) batch rows mid-sequence equals decoding those rows from the start."""
    model = tiny_lm(name)
    sequence = tokens((3, LENGTH), seed=3)
    index = torch.tensor([2, 0, 0, 1])
    cache = model.init_cache()
    with torch.no_grad():
        model(sequence[:, :PROMPT + 11], cache)
        cache.reorder(index)
        rest = sequence[index, PROMPT + 11:]
        reordered = torch.cat([model(rest[:, i:i + 1], cache) for i in range(rest.shape[1])], 1)
    expected = decode_logits(model, sequence[index], [PROMPT + 11] + [1] * rest.shape[1])
    torch.testing.assert_close(reordered, expected[:, PROMPT + 11:], **FLOAT32)


class Recompute(DecodeCache):
    """Reference for generation: keeps the tokens and re-runs the whole prefix every call."""

    def __init__(self, forward) -> None:
        super().__init__([])
        self.forward_fn, self.tokens = forward, None

    @property
    def seen(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)

    def forward(self, new: torch.Tensor, cache, **context) -> torch.Tensor:
        self.tokens = new if self.tokens is None else torch.cat([self.tokens, new], dim=1)
        return self.forward_fn(self.tokens, **context)


EXACT = [name for name in attn_zoo.available()
         if cache_for(attn_zoo.build(name, **params_of(name))).exact]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_cached_generation_equals_recomputing_the_prefix(name, strategy):
    model = tiny_lm(name)
    prompt = tokens((3, 5))
    options = dict(strategy=strategy, top_k=6, top_p=0.95, num_beams=3)
    cached = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), **options)
    reference = Recompute(model)
    with torch.no_grad():
        expected = generation.generate(reference.forward, prompt, 12, cache=reference,
                                       generator=torch.Generator().manual_seed(7), **options)
    assert cached.shape == (3, 5 + 12) and torch.equal(cached, expected)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_seq2seq_cached_generation_equals_recomputing_the_prefix(strategy):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, 16, 2, 2, attention="local",
                               attention_params={"window": 2}).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    source = tokens((2, 7))
    source_mask = torch.ones(2, 7, dtype=torch.bool)
    source_mask[1, 4:] = False
    start = torch.zeros(2, 1, dtype=torch.long)
    cached = model.generate(source, start, 6, source_mask, strategy=strategy, num_beams=3)
    with torch.no_grad():
        memory = model.encode(source, source_mask)
        reference = Recompute(model.decode)
        expected = generation.generate(
            reference.forward, start, 6, cache=reference, strategy=strategy, num_beams=3,
            context={"memory": memory, "source_mask": source_mask})
    assert cached.shape == (2, 7) and torch.equal(cached, expected)


# -- bigbird: the layout of the prefix ------------------------------------------------------


@pytest.mark.parametrize("sinks", [False, True])
def test_bigbird_decodes_with_the_layout_of_the_prefix(sinks):
    """Row I's random blocks change with the length, so decoding follows the layout of the
    prefix that ends at each position: with one layer, the last logits of `model(prefix)`."""
    model = tiny_lm("bigbird", depth=1, sinks=sinks)
    sequence = tokens((2, LENGTH), seed=4)
    decoded = decode_logits(model, sequence, stepwise(LENGTH))
    with torch.no_grad():
        prefixes = torch.stack([model(sequence[:, :i + 1])[:, -1]
                                for i in range(LENGTH)], dim=1)
        teacher_forced = model(sequence)
    torch.testing.assert_close(decoded, prefixes, **FLOAT32)
    # The rule matters: the full-length layout differs from the prefixes' on earlier rows.
    attention = model.stack.blocks[0].attn.attention
    layout, block = attention.layout(LENGTH, True), params_of("bigbird")["block"]
    assert any(not torch.equal(layout[i, :i + 1], attention.layout((i + 1) * block, True)[i])
               for i in range(layout.shape[0]))
    assert not torch.allclose(decoded, teacher_forced, atol=1e-3)


@pytest.mark.parametrize("sinks", [False, True])
def test_bigbird_without_random_blocks_decodes_the_teacher_forced_forward(sinks):
    params = params_of("bigbird") | {"n_random": 0}
    model = tiny_lm("bigbird", params, sinks=sinks)
    sequence = tokens((2, LENGTH), seed=5)
    with torch.no_grad():
        expected = model(sequence)
    torch.testing.assert_close(decode_logits(model, sequence, stepwise(LENGTH)), expected,
                               **FLOAT32)


# -- lsh and routing: content-based decode rules against a dense reference ------------------


def crowded_queries(batch, heads, n, dim, seed=0) -> torch.Tensor:
    """Queries near 3 directions, so that buckets and clusters hold more keys than the cap."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 3, (batch, heads, n), generator=gen)
    return 3 * prototypes[pick] + 0.3 * torch.randn(batch, heads, n, dim, generator=gen,
                                                    dtype=torch.float64)


def cached_outputs(attention, q, k, v, sizes) -> torch.Tensor:
    cache, outs, start = cache_for(attention), [], 0
    for size in sizes:
        outs.append(cache.extend(q[:, :, start:start + size], k[:, :, start:start + size],
                                 v[:, :, start:start + size]))
        start += size
    return torch.cat(outs, dim=2)


def with_null_key(out: torch.Tensor, lse: torch.Tensor, sink) -> torch.Tensor:
    """out and lse of a softmax, with one more key of score `sink` and value 0 (None: none)."""
    if sink is None:
        return out
    return out * lse.exp() / (lse.exp() + torch.exp(torch.as_tensor(sink).to(lse)))


def random_sinks(attention) -> torch.Tensor | None:
    """Random nonzero sink logits for an attention built with sinks, else None."""
    if attention.sink is None:
        return None
    with torch.no_grad():
        attention.sink.copy_(torch.randn(attention.sink.shape,
                                         generator=torch.Generator().manual_seed(9)))
    return attention.sink.detach().double()


def rule_attention(q_row, keys, values, chosen, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax of one query over the chosen key positions: (out (D,), lse ())."""
    scores = torch.stack([scale * q_row @ keys[j] for j in chosen])
    weights = scores.softmax(0)
    return sum(w * values[j] for w, j in zip(weights, chosen, strict=True)), scores.logsumexp(0)


def lsh_reference(q, v, bucket_size, n_hashes, seed, groups,
                  sink=None) -> tuple[torch.Tensor, bool]:
    """The LSH decode rule, position by position, the sink (Hq,) once on the merged rounds;
    also whether the cap ever bound."""
    batch, heads, n, dim = q.shape
    half = n_buckets(DECODE_BUCKETS_PER_CHUNK * bucket_size, bucket_size) // 2
    rotations = torch.randn((n_hashes, dim, half),
                            generator=torch.Generator().manual_seed(seed)).to(q)
    keys = F.normalize(q, dim=-1)
    out = torch.zeros_like(q)
    capped = False
    for b in range(batch):
        for h in range(heads):
            rotated = torch.einsum("nd,rdc->rnc", keys[b, h], rotations)
            buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (R, N)
            for i in range(n):
                parts = []
                for r in range(n_hashes):
                    same = [j for j in range(i) if buckets[r, j] == buckets[r, i]]
                    capped |= len(same) > 2 * bucket_size
                    chosen = same[-2 * bucket_size:] or [i]
                    parts.append(rule_attention(q[b, h, i], keys[b, h], v[b, h // groups],
                                                chosen, dim**-0.5))
                lse = torch.stack([p[1] for p in parts])
                weights = (lse - lse.logsumexp(0)).exp()
                merged = sum(w * p[0] for w, p in zip(weights, parts, strict=True))
                out[b, h, i] = with_null_key(merged, lse.logsumexp(0),
                                             None if sink is None else sink[h])
    return out, capped


def routing_reference(q, v, centroids, n_clusters, window, groups,
                      sink=None) -> tuple[torch.Tensor, bool]:
    batch, heads, n, dim = q.shape
    keys = F.normalize(q, dim=-1)
    out = torch.zeros_like(q)
    capped = False
    for b in range(batch):
        for h in range(heads):
            cluster = (keys[b, h] @ centroids[h].T).argmax(-1)
            for i in range(n):
                cap = window or math.ceil((i + 1) / n_clusters)
                same = [j for j in range(i + 1) if cluster[j] == cluster[i]]
                capped |= len(same) > cap
                row, lse = rule_attention(q[b, h, i], keys[b, h], v[b, h // groups],
                                          same[-cap:], dim**-0.5)
                out[b, h, i] = with_null_key(row, lse, None if sink is None else sink[h])
    return out, capped


@pytest.mark.parametrize("sinks", [0, 4])
def test_lsh_decode_rule_against_its_dense_reference(sinks):
    params = params_of("lsh")
    attention = attn_zoo.build("lsh", **params, sinks=sinks).eval()
    sink = random_sinks(attention)
    q = crowded_queries(2, 4, LENGTH, 8)
    k, v = (torch.randn(2, 2, LENGTH, 8, dtype=torch.float64) for _ in range(2))
    expected, capped = lsh_reference(q, v, params["bucket_size"], params["n_hashes"],
                                     params["seed"], groups=2, sink=sink)
    assert capped, "the test must reach buckets with more keys than the cap"
    for sizes in (stepwise(LENGTH), [LENGTH], [5, 20, 15]):
        torch.testing.assert_close(cached_outputs(attention, q, k, v, sizes), expected,
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("window", [4, None])
@pytest.mark.parametrize("sinks", [0, 4])
def test_routing_decode_rule_against_its_dense_reference(window, sinks):
    attention = attn_zoo.build("routing", n_clusters=3, window=window, sinks=sinks).eval()
    sink = random_sinks(attention)
    q = crowded_queries(2, 4, LENGTH, 8, seed=1)
    k, v = (torch.randn(2, 2, LENGTH, 8, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(0)
    attention.clusters(q[:, :, :1])  # draws the centroids, as a first forward would
    expected, capped = routing_reference(q, v, attention.centroids.to(q), 3, window, groups=2,
                                         sink=sink)
    assert capped, "the test must reach clusters with more keys than the cap"
    for sizes in (stepwise(LENGTH), [LENGTH], [5, 20, 15]):
        torch.testing.assert_close(cached_outputs(attention, q, k, v, sizes), expected,
                                   atol=1e-10, rtol=1e-10)


# -- the shared softmax of the caches -------------------------------------------------------


@pytest.mark.parametrize("kind", ["mask", "bias"])
def test_attend_against_a_dense_softmax(kind, monkeypatch):
    """GQA, chunked rows, a row with no allowed key (out 0, lse -inf), keys not allowed whose
    scores exceed every allowed one: out and lse of a float64 softmax."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 13, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k[:, :, 5] = 50 * q[:, ::2, 0].mean(1)  # a huge score, for a key row 0 may not see
    allowed = torch.rand(9, 13, generator=gen) > 0.4
    allowed[0, 5] = False
    allowed[3] = False
    extra = torch.randn(9, 13, generator=gen, dtype=torch.float64)
    bias = allowed if kind == "mask" else extra.masked_fill(~allowed, float("-inf"))
    scores = torch.einsum("bhtd,bhmd->bhtm", q, k.repeat_interleave(2, 1)) * 0.3
    scores = scores + (0.0 if kind == "mask" else extra)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    expected = torch.nan_to_num(scores.softmax(-1)) @ v.repeat_interleave(2, 1)
    monkeypatch.setattr(cache_module, "CHUNK_ELEMENTS", 2 * 4 * 13 * 2)  # two rows a chunk
    out, got_lse = cache_module.attend(q, k, v, lambda t0, t1: bias[t0:t1], 0.3)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_lse, lse, atol=1e-12, rtol=1e-12)
    assert (out[:, :, 3] == 0).all() and (got_lse[:, :, 3] == float("-inf")).all()


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", attn_zoo.available())
def test_caches_declared_bounded_stay_the_same_size_past_their_window(name):
    attention = attn_zoo.build(name, **params_of(name)).eval()
    cache = cache_for(attention)
    q, k, v = (torch.randn(1, 2, 120, 8) for _ in range(3))
    sizes = []
    for i in range(120):
        cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        sizes.append((cache.nbytes(), len(cache)))
    if type(cache).bounded:
        assert len(set(sizes[60:])) == 1, f"{name}: size changes after 60 positions"
        assert sizes[-1][0] <= max(sizes)[0] and sizes[-1][1] < 60
    else:
        assert sizes[-1][0] > sizes[60][0], f"{name}: a growing cache that does not grow"


@pytest.mark.parametrize(("name", "params"), [
    ("local", {"window": 2**31 - 1}),
    ("longformer", {"window": 2**31 - 1, "n_global": 2}),
    ("hierarchical", {"block": 2**31 - 1, "window_blocks": 1}),
    ("compressive", {"segment": 4, "mem_len": 2**30, "rate": 2}),
])
def test_a_ring_longer_than_the_sequence_costs_only_the_sequence(name, params):
    """A window of 2**31 positions holds (at most twice) what was seen, not 2**31 slots."""
    attention = attn_zoo.build(name, **params)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    expected = attention(q, k, v, causal=True)
    cache = cache_for(attention)
    out = [cache.prefill(q[:, :, :7], k[:, :, :7], v[:, :, :7])]
    out += [cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(7, 30)]
    torch.testing.assert_close(torch.cat(out, dim=2), expected)
    slots = 2 * 30
    assert cache.nbytes() <= 2 * (1 * 2 * slots * 8 * 4) + slots * 8


def test_growing_caches_grow_by_one_position_per_step():
    cache = cache_for(attn_zoo.build("full"))
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    cache.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10])
    per_position = cache.nbytes() // 10
    for i in range(10, 50):
        cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        assert cache.nbytes() == (i + 1) * per_position == (i + 1) * 2 * 2 * 8 * 4


def test_cache_arguments_are_checked():
    cache = cache_for(attn_zoo.build("local", window=3))
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="one position"):
        cache.step(q, q, q)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        cache.extend(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
    cache.prefill(q, q, q)
    with pytest.raises(ValueError, match="empty cache"):
        cache.prefill(q, q, q)
    with pytest.raises(TypeError, match="DecodeCache"):
        generation.generate(tiny_lm("full"), tokens((1, 2)), 2, cache=None)
    with pytest.raises(TypeError, match="attn_zoo.Attention"):
        cache_for(torch.nn.Identity())


def test_a_variant_without_a_registered_cache_is_an_error(monkeypatch):
    monkeypatch.delitem(cache_module._CACHES, "local")
    with pytest.raises(ValueError, match="'local' has no registered cache"):
        tiny_lm("local").init_cache()
