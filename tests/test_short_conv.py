"""The short convolution before attention (`ShortConv`, `TransformerLM(short_conv=k)`): the
float64 rule with explicit loops, chunks through `before`, packed documents, decoding through
`ConvTail` (greedy, beam, reorder, bytes), and context parallelism (`rows_before`, the model
on gloo ranks) equal to one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import check_gradients

from attn_zoo.cache import ConvTail
from attn_zoo.layers import ShortConv
from attn_zoo.model import TransformerLM
from attn_zoo.parallel import count_traffic, traffic_totals
from attn_zoo.parallel.comm import Shards, rows_before
from experiments.parallel import run_ranks

VOCAB = 11
DIM = 16
DEPTH = 2
KERNEL = 3
TOL = {"atol": 1e-10, "rtol": 1e-10}
PACKED = [[1, 4, 2, 6], [3, 3, 7], [13]]
"""Document lengths of three packed rows of 13 positions: documents shorter than the model's
kernel (1, 2) beside longer ones, and a row of one document."""
SHARDS = {2: (7, 1), 4: (5, 1, 7, 6)}
"""Shard lengths by world size: unequal, a shard of one position."""
COUNTS = (0, 1, 3, 8)
"""`rows_before` counts: none, within the shard before, across several shards and past
position 0."""


def reference_conv(x, weight, bias, before=None, document_ids=None):
    """y_t = x_t + b + sum_j w_j * x_{t-j}, one position and tap at a time: a tap before the
    token's document (or the sequence) reads `before` (B, kernel - 1, dim) where the position is
    negative and one is given, else zero."""
    batch, n, _ = x.shape
    kernel = weight.shape[1]
    rows = []
    for b in range(batch):
        out = []
        for t in range(n):
            start = 0 if document_ids is None else t  # the token's document's first position
            while start > 0 and document_ids[b, start - 1] == document_ids[b, t]:
                start -= 1
            y = x[b, t] + bias
            for j in range(kernel):
                p = t - j
                if p >= start:
                    y = y + weight[:, j] * x[b, p]
                elif p < 0 and before is not None:
                    y = y + weight[:, j] * before[b, kernel - 1 + p]
            out.append(y)
        rows.append(torch.stack(out))
    return torch.stack(rows)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv(kernel: int, dim: int = 3, seed: int = 0) -> ShortConv:
    torch.manual_seed(seed)
    return ShortConv(dim, kernel).double()


def packed_ids(rows: list[list[int]]) -> torch.Tensor:
    """(len(rows), N) document ids of rows of documents of these lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in rows])


def spans(lengths: list[int]) -> list[tuple[int, int]]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(start, start + length) for start, length in zip(starts, lengths, strict=True)]


# -- ShortConv ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("with_before", [False, True])
def test_short_conv_equals_the_rule(kernel, n, with_before):
    """Forward and gradients (x, before, weight, bias) equal the float64 loops; n = 1 and 3
    are shorter than kernel 4."""
    layer = conv(kernel, seed=kernel)
    x = randn(2, n, 3, seed=n).requires_grad_()
    before = randn(2, kernel - 1, 3, seed=n + 10).requires_grad_() if with_before else None
    out = layer(x, before)
    expected = reference_conv(x, layer.weight, layer.bias, before)
    assert out.shape == (2, n, 3)
    torch.testing.assert_close(out, expected, **TOL)
    inputs = [x, layer.weight, layer.bias, *([before] if with_before else [])]
    check_gradients(out, expected, inputs)


def test_short_conv_passes_gradcheck():
    layer = conv(3)
    x, before = randn(2, 5, 3, seed=1), randn(2, 2, 3, seed=2)
    ids = packed_ids([[2, 1, 2]])
    ids = torch.cat([ids, ids.flip(1)])

    def call(x, before, weight, bias):
        parameters = {"weight": weight, "bias": bias}
        return (torch.func.functional_call(layer, parameters, (x, before)),
                torch.func.functional_call(layer, parameters, (x,), {"document_ids": ids}))

    inputs = [t.clone().requires_grad_() for t in (x, before, layer.weight, layer.bias)]
    assert torch.autograd.gradcheck(call, inputs)


def test_short_conv_weight_order_and_bad_kernels():
    """weight[:, j] multiplies x_{t-j}: a one-hot tap j shifts the sequence by j."""
    layer = conv(4, dim=2)
    x = randn(1, 6, 2)
    for j in range(4):
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[:, j] = 1.0
        shifted = torch.cat([x.new_zeros(1, j, 2), x[:, :6 - j]], dim=1)
        torch.testing.assert_close(layer(x), x + shifted, **TOL)
    for kernel in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="kernel"):
            ShortConv(4, kernel)


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("split", [1, 2, 6])
def test_two_chunks_through_before_equal_the_whole_sequence(kernel, split):
    """The second chunk reads the first chunk's last kernel - 1 inputs (zeros in front where
    the first chunk is shorter than that) as `before`; forward and gradients equal one call."""
    layer = conv(kernel, seed=kernel)
    x = randn(2, 9, 3, seed=split).requires_grad_()
    whole = layer(x)
    head = x[:, :split]
    padded = torch.cat([x.new_zeros(2, kernel - 1, 3), head], dim=1)
    before = padded[:, padded.shape[1] - (kernel - 1):]
    chunks = torch.cat([layer(head), layer(x[:, split:], before)], dim=1)
    torch.testing.assert_close(chunks, whole, **TOL)
    check_gradients(chunks, whole, [x, layer.weight, layer.bias])


@pytest.mark.parametrize("kernel", [2, 4])
def test_packed_documents_equal_each_document_alone(kernel):
    """Taps never cross a document boundary, also for documents shorter than the kernel:
    forward and gradients equal each document run alone, and the loops with documents."""
    layer = conv(kernel, seed=kernel)
    ids = packed_ids(PACKED)
    x = randn(3, 13, 3).requires_grad_()
    out = layer(x, document_ids=ids)
    torch.testing.assert_close(out, reference_conv(x, layer.weight, layer.bias,
                                                   document_ids=ids), **TOL)
    alone = out.new_zeros(out.shape)
    for row, lengths in enumerate(PACKED):
        for start, stop in spans(lengths):
            alone[row, start:stop] = layer(x[row:row + 1, start:stop])[0]
    torch.testing.assert_close(out, alone, **TOL)
    check_gradients(out, alone, [x, layer.weight, layer.bias])
    assert not torch.allclose(out, layer(x))  # the boundaries changed something


# -- TransformerLM --------------------------------------------------------------------------


def conv_lm(short_conv: int = KERNEL, seed: int = 0, **kwargs) -> TransformerLM:
    """A float64 LM with larger weights than the GPT-2 init, so its logits depend on the
    context (as tests/test_model.py's `varied`)."""
    torch.manual_seed(seed)
    model = TransformerLM(VOCAB, dim=DIM, depth=DEPTH, heads=2, kv_heads=1, max_seq_len=64,
                          short_conv=short_conv, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    torch.nn.init.normal_(model.embedding.weight, std=0.5)
    return model.double().eval()


def tokens(shape, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    return conv_lm()


def test_lm_packed_rows_equal_each_document_alone(lm):
    ids = packed_ids(PACKED)
    sequence = tokens((3, 13))
    with torch.no_grad():
        packed = lm(sequence, document_ids=ids)
        for row, lengths in enumerate(PACKED):
            for start, stop in spans(lengths):
                alone = lm(sequence[row:row + 1, start:stop])[0]
                torch.testing.assert_close(packed[row, start:stop], alone, **TOL)
        # without the documents the conv would reach across them: rows differ
        assert not torch.allclose(packed[0], lm(sequence)[0])


@pytest.mark.parametrize("prompt", [1, 5])
def test_lm_decoding_in_chunks_equals_teacher_forcing(lm, prompt):
    """A prompt (1 position: shorter than the conv's tail), a chunk of 3, then single tokens;
    the layer-0 tail holds the last kernel - 1 normed inputs (zeros before position 0)."""
    sequence = tokens((2, 12), seed=prompt)
    cache = lm.init_cache()
    with torch.no_grad():
        steps = [lm(sequence[:, :prompt], cache)]
        normed = lm.stack.blocks[0].attn_norm(lm.embedding(sequence[:, :prompt]))
        tail = torch.cat([normed.new_zeros(2, KERNEL - 1, DIM), normed], 1)[:, -(KERNEL - 1):]
        torch.testing.assert_close(cache.convs[0].x, tail, **TOL)
        steps.append(lm(sequence[:, prompt:prompt + 3], cache))
        steps += [lm(sequence[:, i:i + 1], cache) for i in range(prompt + 3, 12)]
        expected = lm(sequence)
    assert cache.seen == 12 and len(cache.convs) == DEPTH
    assert all(isinstance(t, ConvTail) and t.x.shape == (2, KERNEL - 1, DIM) for t in cache.convs)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_lm_greedy_generate_equals_argmax_of_the_forward(lm):
    prompt = tokens((3, 4), seed=2)
    out = lm.generate(prompt, 6)
    assert out.shape == (3, 10)
    with torch.no_grad():
        predicted = lm(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 4:], predicted[:, 3:])


def test_lm_packed_prompts_continue_their_last_document_alone(lm):
    """Last documents of 4, 1 and 2 positions (the last two within the conv's tail)."""
    prompt = tokens((3, 7), seed=6)
    ids = packed_ids([[3, 4], [6, 1], [5, 2]])
    out = lm.generate(prompt, 4, document_ids=ids)
    for row, last in enumerate((4, 1, 2)):
        alone = lm.generate(prompt[row:row + 1, 7 - last:], 4)
        assert torch.equal(out[row, 7:], alone[0, last:]), row


def reference_beam(model: TransformerLM, prompt: torch.Tensor, steps: int,
                   beams: int) -> torch.Tensor:
    """Beam search as `attn_zoo.generation` ranks beams, but every step re-runs the whole
    sequences without a cache."""
    batch = prompt.shape[0]
    with torch.no_grad():
        rows = prompt.repeat_interleave(beams, 0)
        scores = torch.full((batch, beams), float("-inf"))
        scores[:, 0] = 0.0
        for _ in range(steps):
            log_probs = model(rows)[:, -1].float().log_softmax(-1)
            candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, beams * VOCAB)
            scores, best = candidates.topk(beams, dim=-1)
            parent = torch.arange(batch)[:, None] * beams + best // VOCAB
            rows = torch.cat([rows[parent.reshape(-1)], (best % VOCAB).reshape(-1, 1)], 1)
    return rows.reshape(batch, beams, -1)[:, 0]


def test_lm_beam_search_equals_a_search_without_cache(lm):
    prompt = tokens((2, 4), seed=3)
    out = lm.generate(prompt, 5, strategy="beam", num_beams=3)
    assert out.shape == (2, 9)
    assert torch.equal(out, reference_beam(lm, prompt, 5, 3))


def test_reorder_reorders_the_conv_tails(lm):
    sequence = tokens((3, 7), seed=4)
    cache = lm.init_cache()
    index = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        lm(sequence[:, :4], cache)
        held = [tail.x.clone() for tail in cache.convs]
        cache.reorder(index)
        for tail, before in zip(cache.convs, held, strict=True):
            assert torch.equal(tail.x, before[index])
        continued = lm(sequence[index, 4:], cache)
        torch.testing.assert_close(continued, lm(sequence[index])[:, 4:], **TOL)


def test_nbytes_counts_the_conv_tails(lm):
    plain = conv_lm(short_conv=0)
    caches = lm.init_cache(), plain.init_cache()
    assert caches[0].nbytes() == caches[1].nbytes()  # nothing held yet
    sequence = tokens((2, 5), seed=5)
    tail_bytes = DEPTH * 2 * (KERNEL - 1) * DIM * 8  # float64 rows
    with torch.no_grad():
        for end in (3, 4, 5):
            for model, cache in zip((lm, plain), caches, strict=True):
                model(sequence[:, cache.seen:end], cache)
            layers = sum(layer.nbytes() for layer in caches[0].layers)
            assert layers == caches[1].nbytes() > 0
            assert caches[0].nbytes() == layers + tail_bytes
            assert sum(tail.nbytes() for tail in caches[0].convs) == tail_bytes


def test_short_conv_zero_builds_no_conv(lm):
    plain = conv_lm(short_conv=0)
    assert all(block.conv is None for block in plain.stack.blocks)
    assert plain.init_cache().convs is None
    assert all(isinstance(block.conv, ShortConv) and block.conv.kernel == KERNEL
               for block in lm.stack.blocks)
    extra = sum(p.numel() for p in lm.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == DEPTH * (DIM * KERNEL + DIM)
    # kernel 1: no taps before a position, so chunks and packed rows need no tail content
    one = conv_lm(short_conv=1)
    sequence = tokens((2, 6))
    cache = one.init_cache()
    with torch.no_grad():
        steps = torch.cat([one(sequence[:, :2], cache), one(sequence[:, 2:], cache)], 1)
        torch.testing.assert_close(steps, one(sequence), **TOL)


@pytest.mark.parametrize("value", [-1, True, 2.5, "3"])
def test_bad_short_conv_names_it(value):
    with pytest.raises(ValueError, match="short_conv"):
        TransformerLM(VOCAB, dim=DIM, depth=1, heads=2, short_conv=value)


# -- context parallelism --------------------------------------------------------------------


def rows_inputs(world: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole sequence (2, n, 3) and each rank's output gradient (2, count, 3)."""
    n = sum(SHARDS[world])
    grads = randn(world, 2, count, 3, seed=100 + count)
    return randn(2, n, 3, seed=count), list(grads)


def _rows_before_cases(world: int) -> dict[int, tuple]:
    """Per count: this rank's rows, the gradient of its shard, the bytes it received."""
    rank, lengths = dist.get_rank(), SHARDS[world]
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    shards = Shards.of(stop - start)
    assert shards.bounds == (0, *(sum(lengths[:r + 1]) for r in range(world)))
    results = {}
    for count in COUNTS:
        x, grads = rows_inputs(world, count)
        mine = x[:, start:stop].clone().requires_grad_()
        with count_traffic() as transfers:
            rows = rows_before(mine, shards, count)
        (rows * grads[rank]).sum().backward()
        results[count] = (rows.detach(), mine.grad, traffic_totals(transfers).forward_received)
    return results


def _lm_case(world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """This rank's logits of its shard and its parameter gradients, the model split over the
    world."""
    rank, lengths = dist.get_rank(), SHARDS[world]
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    model = conv_lm(attention="full", context_parallel=dist.group.WORLD)
    sequence, weights = lm_inputs(world)
    logits = model(sequence[:, start:stop])
    (logits * weights[:, start:stop]).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def lm_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(SHARDS[world])
    return tokens((2, n), seed=world), randn(2, n, VOCAB, seed=world)


def _rank_cases(world: int) -> dict:
    return {"rows": _rows_before_cases(world), "lm": _lm_case(world)}


@pytest.fixture(scope="module", params=sorted(SHARDS), ids=lambda world: f"world{world}")
def ranks(request) -> tuple[int, list[dict]]:
    """(world, every rank's results): one spawn per world size."""
    return request.param, run_ranks(request.param, _rank_cases, request.param)


def test_rows_before_equals_slicing_the_whole_sequence(ranks):
    world, results = ranks
    bounds = [sum(SHARDS[world][:r]) for r in range(world + 1)]
    for count in COUNTS:
        x, grads = rows_inputs(world, count)
        whole = x.clone().requires_grad_()
        padded = torch.cat([whole.new_zeros(2, count, 3), whole], dim=1)  # zeros before 0
        total = 0
        for rank, result in enumerate(results):
            rows, _, received = result["rows"][count]
            start = bounds[rank]
            expected = padded[:, start:start + count]
            assert rows.shape == (2, count, 3)
            assert torch.equal(rows, expected.detach()), (world, count, rank)
            assert received == min(count, start) * 2 * 3 * 8, (world, count, rank)
            total = total + (expected * grads[rank]).sum()
        # each rank's shard gets the gradients of its rows from every rank that read them
        (grad,) = torch.autograd.grad(total, whole)
        for rank, result in enumerate(results):
            local = result["rows"][count][1]
            local = torch.zeros_like(local) if local is None else local
            torch.testing.assert_close(local, grad[:, bounds[rank]:bounds[rank + 1]], **TOL)


def test_context_parallel_lm_equals_one_process(ranks):
    world, results = ranks
    model = conv_lm(attention="full")
    sequence, weights = lm_inputs(world)
    logits = model(sequence)
    (logits * weights).sum().backward()
    bounds = [sum(SHARDS[world][:r]) for r in range(world + 1)]
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["lm"][0], logits[:, bounds[rank]:bounds[rank + 1]]
                                   .detach(), **TOL)
    for index, (name, parameter) in enumerate(model.named_parameters()):
        summed = sum(result["lm"][1][index] for result in results)
        torch.testing.assert_close(summed, parameter.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
