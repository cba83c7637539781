"""experiments.tasks: batches are deterministic given the seed and their answers are right."""

from __future__ import annotations

import pytest
import torch

from attn_zoo.documents import check_documents
from experiments import tasks
from experiments.tasks import make_task


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_corpus(root):
    """A small tree of .py files standing in for the standard library, under `root`."""
    for i in range(40):
        folder = root / f"pkg{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "other.py").write_text("not the standard library\n")
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


SYNTHETIC = [("mqar", {"vocab_size": 40, "n_pairs": 6}),
             ("selective_copy", {"vocab_size": 10, "n_copy": 5}),
             ("needle", {"vocab_size": 30, "n_keys": 6, "value_len": 3})]


@pytest.mark.parametrize("name, params", SYNTHETIC, ids=[s[0] for s in SYNTHETIC])
def test_batches_are_deterministic_shifted_and_seed_dependent(name, params):
    task = make_task(name, **params)
    a, b = task.batch(4, 97, gen(1)), task.batch(4, 97, gen(1))
    c = task.batch(4, 97, gen(2))
    for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.mask, b.mask)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == a.targets.shape == a.mask.shape == (4, 97)
    assert a.inputs.dtype == torch.long and a.mask.dtype == torch.bool
    # targets are the next tokens, but for mqar's answers (its values after the pairs are
    # never inputs)
    following = a.targets[:, :-1] == a.inputs[:, 1:]
    assert (following[~a.mask[:, :-1]] if name == "mqar" else following).all()
    assert int(a.inputs.max()) < task.vocab_size and int(a.inputs.min()) >= 0


@pytest.mark.parametrize("n", [17, 64, 257])
def test_mqar_every_position_after_the_pairs_asks_for_a_value_paired_before(n):
    task = make_task("mqar", vocab_size=40, n_pairs=8)
    batch = task.batch(16, n, gen(3))
    for row in range(16):
        inputs, targets = batch.inputs[row].tolist(), batch.targets[row].tolist()
        keys, values = inputs[0:16:2], inputs[1:16:2]
        assert len(set(keys)) == 8 and all(0 <= k < 20 for k in keys)
        assert all(20 <= v < 40 for v in values)
        pairs = dict(zip(keys, values, strict=True))
        assert batch.mask[row].nonzero().flatten().tolist() == list(range(16, n))
        for p in range(16, n):
            assert inputs[p] in pairs and targets[p] == pairs[inputs[p]]
    queried = batch.inputs[:, 16:]
    assert set(queried.unique().tolist()) <= set(range(20))  # no value is an input there


def test_mqar_queries_ask_for_every_pair_evenly():
    batch = make_task("mqar", vocab_size=64, n_pairs=4).batch(64, 1024, gen(0))
    keys = batch.inputs[:, 0:8:2]
    asked = (batch.inputs[:, 8:, None] == keys[:, None, :]).float().mean((0, 1))
    assert torch.allclose(asked, torch.full((4,), 0.25), atol=0.01)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_asked_depth_and_the_answer_is_its_value(depth):
    task = make_task("needle", vocab_size=30, n_keys=6, value_len=3, depth=depth)
    n = 101
    batch = task.batch(8, n, gen(5))
    filler = n + 1 - 2 * task.needle_len
    offset = round(depth * filler)
    for row in range(8):
        tokens = torch.cat([batch.inputs[row], batch.targets[row, -1:]]).tolist()
        assert tokens[offset] == 0 and tokens.count(0) == 1  # the only needle marker
        assert tokens[-5] == 1 and tokens.count(1) == 1  # the query marker
        needle, query = tokens[offset + 1:offset + 5], tokens[-4:]
        assert needle == query and all(2 <= s < 8 for s in needle)
        others = tokens[:offset] + tokens[offset + 5:-5]
        assert all(8 <= t < 30 for t in others)  # filler never uses symbols
    assert batch.mask.sum(1).tolist() == [3] * 8
    assert torch.equal(batch.targets[:, -3:], batch.inputs[:, offset + 2:offset + 5])


def test_needle_depth_none_draws_a_depth_per_sequence():
    task = make_task("needle", vocab_size=30, n_keys=6, depth=None)
    offsets = task.needle_offsets(200, 500, gen(0))
    assert offsets.min() >= 0 and offsets.max() <= 501 - 2 * task.needle_len
    assert offsets.unique().numel() > 50


def test_selective_copy_copies_the_scattered_tokens_in_order():
    task = make_task("selective_copy", vocab_size=10, n_copy=5)
    batch = task.batch(8, 40, gen(0))
    for row in range(8):
        tokens = torch.cat([batch.inputs[row], batch.targets[row, -1:]])
        region = tokens[:35]
        scattered = region[region >= 2]
        assert scattered.numel() == 5 and int(tokens[35]) == 1
        assert torch.equal(tokens[36:], scattered)
        assert torch.equal(batch.targets[row][batch.mask[row]], scattered)


def test_stdlib_split_is_by_file_disjoint_and_deterministic(corpus):
    task = make_task("stdlib_lm", root=str(corpus), val_fraction=0.25)
    train, val = task.split_files("train"), task.split_files("validation")
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == 40  # site-packages is left out
    assert val == make_task("stdlib_lm", root=str(corpus), val_fraction=0.25).split_files(
        "validation")
    assert all(tasks.in_validation(path, 0.25) for path in val)
    text = b"\n".join((corpus / path).read_bytes() for path in val)
    batch = task.batch(4, 50, gen(0), "validation")
    assert batch.mask.all() and task.vocab_size == 256
    for row in range(4):
        window = bytes(torch.cat([batch.inputs[row], batch.targets[row, -1:]]).tolist())
        assert window in text


def test_stdlib_reads_the_running_python():
    task = make_task("stdlib_lm")
    val = task.split_files("validation")
    assert "os.py" in task.split_files("train") + val
    assert 0.05 < len(val) / (len(val) + len(task.split_files("train"))) < 0.15


@pytest.mark.parametrize("name, params, seq_len, parameter", [
    ("mqar", {"n_pairs": 8}, 16, "seq_len"),
    ("mqar", {"vocab_size": 10, "n_pairs": 8}, 64, "vocab_size"),
    ("mqar", {"n_pairs": 0}, 64, "n_pairs"),
    ("selective_copy", {"n_copy": 16}, 31, "seq_len"),
    ("needle", {"value_len": 4}, 10, "seq_len"),
    ("needle", {"depth": 1.5}, 64, "depth"),
    ("needle", {"vocab_size": 10, "n_keys": 8}, 64, "vocab_size"),
    ("stdlib_lm", {"val_fraction": 1.0}, 64, "val_fraction"),
])
def test_bad_parameters_name_the_parameter(name, params, seq_len, parameter):
    with pytest.raises(ValueError, match=parameter):
        make_task(name, **params).batch(2, seq_len, gen())


def test_unknown_task_split_or_parameter():
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("copy")
    with pytest.raises(ValueError, match="unknown parameters \\['pairs'\\]"):
        make_task("mqar", pairs=3)
    with pytest.raises(ValueError, match="split"):
        make_task("mqar").batch(2, 64, gen(), "test")
    with pytest.raises(ValueError, match="batch_size"):
        make_task("mqar").batch(0, 64, gen())


def test_packed_rows_hold_every_byte_once_with_contiguous_documents_and_masked_starts():
    documents = [torch.arange(100, 107), torch.arange(0), torch.arange(200, 203),
                 torch.arange(1, 2), torch.arange(300, 311)]
    batch = tasks.pack_documents(documents, 5)
    stream = torch.cat(documents)
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([7, 0, 3, 1, 11]))
    assert batch.inputs.shape == batch.document_ids.shape == (4, 5)  # (22 - 1) // 5 rows
    # Every byte is an input once, in order; the targets are the next bytes.
    assert torch.equal(batch.inputs.flatten(), stream[:20])
    assert torch.equal(batch.targets.flatten(), stream[1:21])
    assert torch.equal(batch.document_ids.flatten(), ids[:20])
    # Contiguous runs per row (check_documents raises otherwise); a document cut by a row's
    # end (7 bytes in rows of 5; 11 bytes over rows 2 and 3) goes on at the next row's start.
    check_documents(batch.document_ids, None, 4, 5, batch.inputs.device)
    assert batch.document_ids[:, 0].tolist() == [0, 0, 3, 4]
    # Targets that start another document are masked, and only those.
    assert torch.equal(batch.mask.flatten(), ids[1:21] == ids[:20])
    assert (~batch.mask).nonzero().tolist() == [[1, 1], [1, 4], [2, 0]]
    assert batch.targets[~batch.mask].tolist() == [200, 1, 300]


def test_packing_needs_one_full_row():
    with pytest.raises(ValueError, match="seq_len must be < 6"):
        tasks.pack_documents([torch.arange(6)], 6)


def test_an_epoch_of_packed_stdlib_rows_uses_every_byte_of_its_files_once(corpus):
    task = make_task("stdlib_lm", root=str(corpus), val_fraction=0.25)
    files = [(corpus / path).read_bytes() for path in task.split_files("train")]
    rows = (sum(map(len, files)) - 1) // 64
    batches = task.packed_batches(1, 64, gen(0))
    epoch = [next(batches) for _ in range(rows)]
    again = task.packed_batches(1, 64, gen(0))
    assert all(torch.equal(b.inputs, next(again).inputs) for b in epoch)  # seeded
    pieces: dict[int, list[bytes]] = {}
    for batch in epoch:
        ids = batch.document_ids[0]
        for doc in ids.unique().tolist():
            pieces.setdefault(doc, []).append(bytes(batch.inputs[0][ids == doc].tolist()))
    # Every file is a document whose bytes are each an input once (but the tail of fewer
    # than 64 bytes of the epoch's last one): its pieces are cut from it and hold it all.
    assert sorted(pieces) == list(range(len(files)))
    source = {}
    for doc, cut in sorted(pieces.items()):
        held = b"".join(cut)
        matches = [index for index, f in enumerate(files) if all(piece in f for piece in cut)
                   and (sorted(held) == sorted(f) or doc == len(files) - 1
                        and len(f) - 64 <= len(held) < len(f))]
        assert len(matches) == 1
        source[doc] = matches[0]
    # Files are packed in a drawn order, each once; the rows are dealt out in another one.
    assert sorted(source.values()) == list(range(len(files)))
    assert list(source.values()) != sorted(source.values())
    firsts = [int(batch.document_ids[0, 0]) for batch in epoch]
    assert firsts != sorted(firsts)
    assert next(batches).inputs.shape == (1, 64)  # the next epoch


def test_packing_a_task_without_documents_or_too_many_rows_is_an_error(corpus):
    with pytest.raises(ValueError, match="packing needs a task made of documents"):
        next(make_task("mqar").packed_batches(2, 64, gen()))
    task = make_task("stdlib_lm", root=str(corpus), val_fraction=0.25)
    with pytest.raises(ValueError, match="batch_size must be <= "):
        next(task.packed_batches(1000, 64, gen(), "validation"))
