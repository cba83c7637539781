"""Packed sequences (`document_ids`, `cu_seqlens`), for every variant: a packed call equals
each document run alone, forward and gradients; the kernels against the torch engine; the
bad-input errors; the engines only ever see whole documents."""

from __future__ import annotations

import pytest
import torch
from attn_zoo.kernels.layout import build_layout
from conftest import VARIANT_MODES, qkv, variant_id

import attn_zoo
from attn_zoo.blocksparse import part_key_blocks
from attn_zoo.documents import DocumentSpans
from attn_zoo.patterns import union, union_reach
from attn_zoo.registry import get

# Documents of random lengths: of length 1, one filling its row, none aligned to blocks.
LENGTHS = [[1, 7, 16, 1, 20], [45], [11, 11, 3, 11, 9]]
N = 45


def document_ids(lengths: list[list[int]]) -> torch.Tensor:
    """(B, N) ids: row b holds documents of lengths[b], numbered from 10 * b."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)) + 10 * b,
                                                torch.tensor(row))
                        for b, row in enumerate(lengths)])


def tiny(name: str, **params):
    """A variant with its tiny parameters and random sinks, float64, in eval mode."""
    attn = attn_zoo.build(name, **get(name).Params.tiny() | params, sinks=4).double().eval()
    with torch.no_grad():
        attn.sink.normal_(generator=torch.Generator().manual_seed(0))
    return attn


def documents_alone(attn, q, k, v, causal, real, lengths):
    """Each document as a call of its own, concatenated back into rows."""
    rows = []
    for b, row in enumerate(lengths):
        outs, start = [], 0
        for length in row:
            part = slice(start, start + length)
            torch.manual_seed(0)
            outs.append(attn(q[b:b + 1, :, part], k[b:b + 1, :, part], v[b:b + 1, :, part],
                             causal=causal, key_padding_mask=real[b:b + 1, part]))
            start += length
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows)


# Every variant at its tiny parameters, and longformer without dilation, which runs packed
# rows in place (relative_parts) rather than regrouped.
PACKED_CASES = [(name, causal, {}) for name, causal in VARIANT_MODES] + [
    ("longformer", causal, {"dilation": 1}) for causal in (False, True)]


def packed_id(case) -> str:
    name, causal, params = case
    return variant_id((name, causal)) + "".join(f"-{k}{v}" for k, v in params.items())


@pytest.mark.parametrize("case", PACKED_CASES, ids=packed_id)
def test_a_packed_call_equals_each_document_alone(case):
    name, causal, params = case
    attn = tiny(name, **params)
    q, k, v = qkv(batch=3, q_heads=4, kv_heads=2, n=N, dim=16, dtype=torch.float64, seed=1,
                  requires_grad=True)
    real = torch.rand(3, N, generator=torch.Generator().manual_seed(2)) > 0.2
    torch.manual_seed(0)
    out = attn(q, k, v, causal=causal, key_padding_mask=real, document_ids=document_ids(LENGTHS))
    expected = documents_alone(attn, q, k, v, causal, real, LENGTHS)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(out)
    inputs = (q, k, v, *attn.parameters())
    for got, want in zip(torch.autograd.grad(out, inputs, grad, allow_unused=True),
                         torch.autograd.grad(expected, inputs, grad, allow_unused=True),
                         strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_cu_seqlens_is_one_packed_row():
    attn = tiny("local")
    q, k, v = qkv(batch=1, n=N, dtype=torch.float64)
    offsets = torch.tensor([0, 11, 22, 25, 36, 45], dtype=torch.int32)
    ids = document_ids(LENGTHS[2:])
    torch.testing.assert_close(attn(q, k, v, causal=True, cu_seqlens=offsets),
                               attn(q, k, v, causal=True, document_ids=ids), atol=0, rtol=0)


def test_one_document_per_row_is_the_plain_call():
    attn = tiny("bigbird")
    q, k, v = qkv(n=N, dtype=torch.float64)
    ids = torch.tensor([[3] * N, [0] * N])
    torch.testing.assert_close(attn(q, k, v, document_ids=ids), attn(q, k, v), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["hierarchical", "lsh", "bigbird"])
def test_documents_run_as_sequences_of_their_own_length(name, monkeypatch):
    """Packing costs what the documents cost alone: the engine runs one call per document
    length, each on sequences of that length, never on the packed row."""
    attn = tiny(name, backend="torch")
    seen = []
    run = attn._forward_torch

    def spy(q, k, v, *args):
        seen.append(tuple(q.shape[i] for i in (0, 3)))
        return run(q, k, v, *args)

    monkeypatch.setattr(attn, "_forward_torch", spy)
    q, k, v = qkv(batch=3, n=N, dtype=torch.float64)
    attn(q, k, v, causal=True, document_ids=document_ids(LENGTHS))
    assert sorted(seen) == [(1, 3), (1, 7), (1, 9), (1, 16), (1, 20), (1, 45), (2, 1), (3, 11)]


@pytest.mark.parametrize("name", [name for name in attn_zoo.available()
                                  if getattr(get(name), "relative_parts", False)])
def test_relative_patterns_run_packed_rows_in_one_call(name, monkeypatch):
    """Rows laid end to end, one call, every part kept inside its document (a dilated
    longformer folds its band by residue, which documents would shift: it regroups; full on
    torch runs SDPA per document length)."""
    if name == "longformer":
        assert not tiny(name).runs_documents_in_place("torch", N, True)
    if name == "full":  # SDPA per document length on torch, in place on the kernel
        assert not tiny(name).runs_documents_in_place("torch", N, True)
        assert tiny(name).runs_documents_in_place("triton", N, True)
        return
    attn = tiny(name, backend="torch", **({"dilation": 1} if name == "longformer" else {}))
    seen = []
    run = attn._forward_torch

    def spy(q, k, v, *args, documents):
        seen.append((q.shape[0], q.shape[3], documents.key))
        return run(q, k, v, *args, documents=documents)

    monkeypatch.setattr(attn, "_forward_torch", spy)
    q, k, v = qkv(batch=3, n=N, dtype=torch.float64)
    attn(q, k, v, causal=True, document_ids=document_ids(LENGTHS))
    assert seen == [(1, 3 * N, (3 * N, 0, 1, 8, 24, 25, 45, 90, 101, 112, 115, 126))]


def test_packed_tiles_stay_inside_documents():
    """16 documents of 64 packed into 1024: the torch engine and the kernel visit the tiles
    of 16 separate calls (16 diagonal tiles, causal), not those of a 1024 call (136)."""
    attn = attn_zoo.build("full")
    spans = DocumentSpans(torch.arange(16).repeat_interleave(64)[None])
    parts = attn.engine_parts(1024, 1024, True, spans)
    assert int((part_key_blocks(parts[0], 1024, 1024, "cpu") >= 0).sum()) == 16
    layout = build_layout(union(parts), 1024, 1024, 64, 64, reach=union_reach(parts))
    assert layout.visited_tiles == 16 and layout.pairs == 16 * 64 * 65 // 2
    plain = attn.engine_parts(1024, 1024, True)
    assert int((part_key_blocks(plain[0], 1024, 1024, "cpu") >= 0).sum()) == 136


# The interpreter runs a kernel's programs one by one: fewer, longer buckets for lsh.
KERNEL_CASES = [(*case, dtype) for case in PACKED_CASES if "triton" in get(case[0]).backends
                for dtype in ([torch.float32, torch.bfloat16] if case[1] else [torch.float32])]


@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=lambda case: f"{packed_id(case[:3])}-{str(case[3])[6:]}")
def test_packed_kernels_match_the_torch_engine(case):
    """Odd document lengths, GQA, padding, sinks; float32 and bfloat16 inputs."""
    name, causal, params, dtype = case
    params = params | ({"bucket_size": 8} if name == "lsh" else {})
    kernel, engine = (tiny(name, backend=backend, **params).to(torch.float32)
                      for backend in ("triton", "torch"))
    engine.load_state_dict(kernel.state_dict())
    lengths = LENGTHS[:2]
    q, k, v = qkv(batch=2, q_heads=4, kv_heads=2, n=N, dim=16, dtype=dtype, seed=5,
                  requires_grad=True)
    real = torch.rand(2, N, generator=torch.Generator().manual_seed(6)) > 0.2
    ids = document_ids(lengths)
    outs, grads = [], []
    for attn in (kernel, engine):
        torch.manual_seed(0)
        out = attn(q, k, v, causal=causal, key_padding_mask=real, document_ids=ids)
        grad = torch.ones_like(out) / out.shape[-1]
        outs.append(out.float())
        grads.append(torch.autograd.grad(out, (q, k, v, attn.sink), grad, allow_unused=True))
    tolerance = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tolerance, rtol=tolerance)
    for got, want in zip(*grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=tolerance,
                                       rtol=tolerance)


BAD_IDS = [
    (torch.zeros(2, 44, dtype=torch.long), ValueError, r"document_ids must have shape \(B, N\)"),
    (torch.zeros(2, 45), TypeError, "document_ids must be an integer tensor, got torch.float32"),
    (torch.zeros(2, 45, dtype=torch.bool), TypeError, "must be an integer tensor"),
    (torch.tensor([[0] * 44 + [-3]] * 2), ValueError, "must be >= 0, got -3 at row 0, position 44"),
    (torch.tensor([[0] * 10 + [1] * 10 + [0] * 25, [0] * 45]), ValueError,
     "contiguous runs, got id 0 again at row 0, position 20"),
]


@pytest.mark.parametrize(("ids", "error", "match"), BAD_IDS,
                         ids=["shape", "float", "bool", "negative", "not contiguous"])
def test_bad_document_ids(ids, error, match):
    q, k, v = qkv(n=N)
    with pytest.raises(error, match=match):
        attn_zoo.build("local", window=4)(q, k, v, document_ids=ids)


BAD_OFFSETS = [
    ([1, 20, 45], "cu_seqlens must start at 0, got 1"),
    ([0, 20, 20, 45], "cu_seqlens must be increasing, got 20 after 20 at index 2"),
    ([0, 30, 20, 45], "cu_seqlens must be increasing, got 20 after 30 at index 2"),
    ([0, 20, 44], "cu_seqlens must end at N = 45, got 44"),
    ([0], r"cu_seqlens must have shape \(n_docs \+ 1,\)"),
]


@pytest.mark.parametrize(("offsets", "match"), BAD_OFFSETS,
                         ids=["start", "repeat", "decrease", "end", "empty"])
def test_bad_cu_seqlens(offsets, match):
    q, k, v = qkv(batch=1, n=N)
    with pytest.raises(ValueError, match=match):
        attn_zoo.build("local", window=4)(q, k, v,
                                          cu_seqlens=torch.tensor(offsets, dtype=torch.int32))


def test_bad_document_combinations():
    attn = attn_zoo.build("full")
    q, k, v = qkv(n=N)
    offsets = torch.tensor([0, 45], dtype=torch.int32)
    with pytest.raises(ValueError, match="give document_ids or cu_seqlens, not both"):
        attn(q, k, v, document_ids=torch.zeros(2, N, dtype=torch.long), cu_seqlens=offsets)
    with pytest.raises(ValueError, match=r"one packed row \(B = 1\), got B = 2"):
        attn(q, k, v, cu_seqlens=offsets)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor, got torch.float32"):
        attn(q[:1], k[:1], v[:1], cu_seqlens=offsets.float())
    with pytest.raises(ValueError, match=r"keys as long as queries \(N=45\), got key length 9"):
        attn(q, k[:, :, :9], v[:, :, :9], document_ids=torch.zeros(2, N, dtype=torch.long))
