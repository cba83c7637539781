"""Training tasks generated on the fly from a seed: synthetic recall and copying, and real text.

Every task makes batches of next-token prediction at any sequence length `N`:

    task = make_task("mqar", vocab_size=64, n_pairs=8)
    batch = task.batch(batch_size=16, seq_len=512, generator=gen, split="train")
    batch.inputs, batch.targets   # (B, N) long: targets[:, t] is the token after inputs[:, t]
    batch.mask                    # (B, N) bool: the positions the loss and the metric read

* `mqar` (multi-query associative recall, as in Zoology with every position a query):
  `n_pairs` key-value pairs, then a query at every later position, a key drawn uniformly from
  the pairs, whose target is that key's value (not next-token prediction there: the values are
  never inputs after the pairs, so only recall answers). Keys are drawn without replacement
  from the lower half of the vocabulary, values from the upper half.
* `selective_copy`: `n_copy` data tokens scattered (in order) among blanks, then a copy
  marker, then the same tokens again; the answers are the copied tokens.
* `needle` (passkey retrieval): random filler tokens; at depth `depth` (fraction of the
  filler, uniform per sequence when None) a needle `[NEEDLE, key, value_1..value_L]` of
  symbols that the filler never uses; the sequence ends with `[QUERY, key]` and the answers
  are the value tokens.
* `stdlib_lm`: a byte-level language model on the `.py` files of the running Python's
  standard library (no downloads), split by file into train and validation (a file goes to
  validation when the first byte of the SHA-256 of its relative path is below
  `256 * val_fraction`); windows are drawn at random positions of the split's files joined
  by newlines. Its metric is bits per byte.

Packed rows (`packed_batches`, tasks made of documents: `stdlib_lm`, whose documents are its
files): an epoch shuffles the split's documents (with `generator`), concatenates them into
rows of `seq_len` inputs (`pack_documents`) and deals the rows out in a shuffled order, so a
batch holds rows from all over the split; `batch.document_ids` tells the documents apart and
a target that starts another document is masked out, so nothing is predicted across a
boundary. A document that does not fit in what remains of a row continues at the start of the
next row, as a new document there; every byte is an input once per epoch.

`accuracy` on the synthetic tasks is the fraction of answer positions whose argmax
prediction is the answer token.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

SPLITS = ("train", "validation")


@dataclasses.dataclass
class Batch:
    """inputs, targets: (B, N) long; mask: (B, N) bool, True where the loss is read;
    document_ids: (B, N) long for packed rows (equal ids = one document), else None."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    document_ids: Tensor | None = None

    def head(self, rows: int) -> Batch:
        """The first `rows` rows."""
        return Batch(*(None if x is None else x[:rows] for x in (
            self.inputs, self.targets, self.mask, self.document_ids)))


def _require(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
             "a positive int")


class Task(ABC):
    """A source of batches at any length; `metric` names what `evaluate` reports."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    is_text: ClassVar[bool] = False
    vocab_size: int

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
              split: str = "train") -> Batch:
        """A (batch_size, seq_len) batch drawn with `generator` (CPU) from `split`."""
        _positive_int("batch_size", batch_size)
        _positive_int("seq_len", seq_len)
        _require(split in SPLITS, "split", split, f"one of {SPLITS}")
        self.check_length(seq_len)
        return self._batch(batch_size, seq_len, generator, split)

    @abstractmethod
    def check_length(self, seq_len: int) -> None:
        """Raise `ValueError` naming `seq_len` when the task does not fit in it."""

    @abstractmethod
    def _batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
               split: str) -> Batch:
        """The batch after `batch`'s checks."""

    def documents(self, split: str) -> list[Tensor]:
        """The split's documents, (L,) uint8 tokens each; a `ValueError` for tasks without."""
        raise ValueError(f"packing needs a task made of documents (stdlib_lm), got {self.name}")

    def packed_batches(self, batch_size: int, seq_len: int, generator: torch.Generator,
                       split: str = "train") -> Iterator[Batch]:
        """Endless (batch_size, seq_len) batches of packed rows: each epoch packs the split's
        documents, in an order drawn from `generator`, into rows (`pack_documents`) and deals
        them out in another drawn order (neighbouring rows hold the same files: batches of
        them would be alike); the rows that do not fill a last batch are left out."""
        _positive_int("batch_size", batch_size)
        _positive_int("seq_len", seq_len)
        _require(split in SPLITS, "split", split, f"one of {SPLITS}")
        documents = self.documents(split)
        lengths = torch.tensor([len(document) for document in documents])
        rows = (int(lengths.sum()) - 1) // seq_len
        _require(rows >= batch_size, "batch_size", batch_size,
                 f"<= {rows}, the rows of {seq_len} tokens the {split} split fills")
        while True:
            order = torch.randperm(len(documents), generator=generator)
            stream = torch.cat([documents[index] for index in order.tolist()])
            ends = lengths[order].cumsum(0)
            dealt = torch.randperm(rows, generator=generator)
            for first in range(0, rows - batch_size + 1, batch_size):
                yield _packed_rows(stream, ends, dealt[first:first + batch_size], seq_len)

    def config(self) -> dict[str, Any]:
        """The parameters that rebuild this task with `make_task`."""
        return {"name": self.name} | {f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _shifted(tokens: Tensor, answers: Tensor) -> Batch:
    """Next-token prediction of (B, N + 1) tokens; answers (B, N + 1) bool marks the tokens the
    loss reads."""
    return Batch(tokens[:, :-1], tokens[:, 1:], answers[:, 1:])


def _packed_rows(stream: Tensor, ends: Tensor, rows: Tensor, seq_len: int) -> Batch:
    """Rows `rows` ((R,) long) of `stream` (documents back to back; document d ends before
    `ends[d]`) cut into rows of seq_len inputs, the targets one token further."""
    positions = rows[:, None] * seq_len + torch.arange(seq_len + 1)
    tokens = stream[positions].long()
    ids = torch.searchsorted(ends, positions, right=True)  # empty documents take no place
    return Batch(tokens[:, :-1], tokens[:, 1:], ids[:, 1:] == ids[:, :-1], ids[:, :-1])


def pack_documents(documents: Sequence[Tensor], seq_len: int) -> Batch:
    """Documents ((L,) token tensors, in order) packed into every full row of seq_len inputs.

    Row r's inputs are tokens [r N, (r + 1) N) of the documents back to back, its targets the
    tokens one further; `document_ids` holds each input's index in `documents`. A document
    that does not fit in what remains of a row continues at the start of the next row, as a
    new document there (its token at the boundary is the earlier row's last target); `mask` is
    False where the target is the first token of another document. The tokens after the last
    full row are left out; empty documents take no place.
    """
    _positive_int("seq_len", seq_len)
    lengths = torch.tensor([len(document) for document in documents], dtype=torch.long)
    rows = (int(lengths.sum()) - 1) // seq_len
    _require(rows >= 1, "seq_len", seq_len,
             f"< {int(lengths.sum())}, the documents' tokens (one row and its last target)")
    return _packed_rows(torch.cat(list(documents)), lengths.cumsum(0), torch.arange(rows),
                        seq_len)


def _random_slots(batch_size: int, n_slots: int, k: int, generator: torch.Generator) -> Tensor:
    """(B, k) long: k distinct slots of range(n_slots) per row, sorted."""
    scores = torch.rand(batch_size, n_slots, generator=generator)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


@dataclasses.dataclass
class MQAR(Task):
    """Multi-query associative recall: keys `[0, n_keys)` (the lower half of the vocabulary),
    values the rest. Inputs = k_1 v_1 .. k_P v_P, then a query at every remaining position, each a
    key drawn uniformly from the P; a query's target is its key's value (the values after the
    pairs are never inputs, so only recall answers)."""

    vocab_size: int = 64
    n_pairs: int = 8
    name: ClassVar[str] = "mqar"

    def __post_init__(self) -> None:
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("n_pairs", self.n_pairs)
        _require(self.vocab_size >= 2 * self.n_pairs, "vocab_size", self.vocab_size,
                 f">= 2 * n_pairs = {2 * self.n_pairs} (n_pairs distinct keys)")

    @property
    def n_keys(self) -> int:
        return self.vocab_size // 2

    def check_length(self, seq_len: int) -> None:
        _require(seq_len >= 2 * self.n_pairs + 1, "seq_len", seq_len,
                 f">= 2 * n_pairs + 1 = {2 * self.n_pairs + 1} for n_pairs={self.n_pairs} "
                 "(the pairs and a query)")

    def _batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
               split: str) -> Batch:
        pairs, queries = self.n_pairs, seq_len - 2 * self.n_pairs
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(1)[:, :pairs]
        values = self.n_keys + torch.randint(self.vocab_size - self.n_keys, (batch_size, pairs),
                                             generator=generator)
        asked = torch.randint(pairs, (batch_size, queries), generator=generator)
        inputs = torch.cat([torch.stack([keys, values], 2).flatten(1), keys.gather(1, asked)], 1)
        targets = torch.cat([inputs[:, 1:2 * pairs + 1], values.gather(1, asked)], 1)
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, 2 * pairs:] = True
        return Batch(inputs, targets, mask)


@dataclasses.dataclass
class SelectiveCopy(Task):
    """Tokens 0 = blank, 1 = copy marker, data `[2, vocab_size)`: `n_copy` data tokens at
    random positions among blanks, the marker, then the same tokens in order."""

    vocab_size: int = 16
    n_copy: int = 16
    name: ClassVar[str] = "selective_copy"

    def __post_init__(self) -> None:
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("n_copy", self.n_copy)
        _require(self.vocab_size >= 3, "vocab_size", self.vocab_size, ">= 3 (blank, marker, data)")

    def check_length(self, seq_len: int) -> None:
        _require(seq_len >= 2 * self.n_copy, "seq_len", seq_len,
                 f">= 2 * n_copy = {2 * self.n_copy} for n_copy={self.n_copy}")

    def _batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
               split: str) -> Batch:
        region = seq_len - self.n_copy  # then the marker and the n_copy copies: N + 1 tokens
        data = torch.randint(2, self.vocab_size, (batch_size, self.n_copy), generator=generator)
        tokens = torch.zeros(batch_size, seq_len + 1, dtype=torch.long)
        tokens.scatter_(1, _random_slots(batch_size, region, self.n_copy, generator), data)
        tokens[:, region] = 1
        tokens[:, region + 1:] = data
        answers = torch.zeros_like(tokens, dtype=torch.bool)
        answers[:, region + 1:] = True
        return _shifted(tokens, answers)


@dataclasses.dataclass
class Needle(Task):
    """Tokens 0 = needle marker, 1 = query marker, symbols `[2, 2 + n_keys)` (keys and value
    tokens), filler the rest. Random filler; the needle `[0, key, value_1..value_L]` starts at
    offset `round(depth * (N + 1 - 2 * (L + 2)))`; the sequence ends with `[1, key, value_1..L]`
    and the answers are the value tokens after the query."""

    vocab_size: int = 64
    n_keys: int = 16
    value_len: int = 4
    depth: float | None = None
    name: ClassVar[str] = "needle"

    def __post_init__(self) -> None:
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("n_keys", self.n_keys)
        _positive_int("value_len", self.value_len)
        _require(self.vocab_size >= 3 + self.n_keys, "vocab_size", self.vocab_size,
                 f">= 3 + n_keys = {3 + self.n_keys} (markers, symbols, filler)")
        _require(self.depth is None or (isinstance(self.depth, (int, float))
                                        and not isinstance(self.depth, bool)
                                        and 0.0 <= self.depth <= 1.0), "depth", self.depth,
                 "a number in [0, 1] or None (uniform per sequence)")

    @property
    def needle_len(self) -> int:
        return 2 + self.value_len

    def check_length(self, seq_len: int) -> None:
        # The needle and the query with its answers take 2 * needle_len of the N + 1 tokens.
        _require(seq_len + 1 >= 2 * self.needle_len, "seq_len", seq_len,
                 f">= {2 * self.needle_len - 1} for value_len={self.value_len}")

    def needle_offsets(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
        """(B,) long: where each needle starts; draws from `generator` only when depth is None."""
        filler = seq_len + 1 - 2 * self.needle_len
        if self.depth is None:
            depth = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        else:
            depth = torch.full((batch_size,), float(self.depth), dtype=torch.float64)
        return (depth * filler).round().long()

    def _batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
               split: str) -> Batch:
        first_filler = 2 + self.n_keys
        tokens = torch.randint(first_filler, self.vocab_size, (batch_size, seq_len + 1),
                               generator=generator)
        symbols = torch.randint(2, first_filler, (batch_size, 1 + self.value_len),
                                generator=generator)
        needle = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), symbols], dim=1)
        offsets = self.needle_offsets(batch_size, seq_len, generator)
        tokens.scatter_(1, offsets[:, None] + torch.arange(self.needle_len), needle)
        tokens[:, -self.needle_len:] = torch.cat([torch.ones_like(needle[:, :1]), symbols], 1)
        answers = torch.zeros_like(tokens, dtype=torch.bool)
        answers[:, -self.value_len:] = True
        return _shifted(tokens, answers)


@functools.cache
def _stdlib_files(root: str) -> tuple[tuple[str, bytes], ...]:
    """(relative path, bytes) of every .py file under `root` outside site-packages, sorted."""
    base = Path(root)
    files = []
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if relative.parts[0] in ("site-packages", "dist-packages") or not path.is_file():
            continue
        files.append((relative.as_posix(), path.read_bytes()))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: is it a Python standard library?")
    return tuple(files)


def stdlib_root() -> str:
    """The running Python's standard library folder."""
    return sysconfig.get_paths()["stdlib"]


def in_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether a file goes to validation: first byte of SHA-256(path) < 256 * val_fraction."""
    return hashlib.sha256(relative_path.encode()).digest()[0] < 256 * val_fraction


@dataclasses.dataclass
class StdlibLM(Task):
    """Bytes of the standard library's .py files (vocabulary 256), split by file."""

    val_fraction: float = 0.1
    root: str | None = None
    name: ClassVar[str] = "stdlib_lm"
    metric: ClassVar[str] = "bits_per_byte"
    is_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1,
                 "val_fraction", self.val_fraction, "in (0, 1)")
        self.vocab_size = 256

    def split_files(self, split: str) -> list[str]:
        """Relative paths of the files in `split`, sorted."""
        _require(split in SPLITS, "split", split, f"one of {SPLITS}")
        want = split == "validation"
        return [path for path, _ in _stdlib_files(self.root or stdlib_root())
                if in_validation(path, self.val_fraction) == want]

    @functools.cached_property
    def _corpora(self) -> dict[str, Tensor]:
        files = _stdlib_files(self.root or stdlib_root())
        corpora = {}
        for split in SPLITS:
            want = split == "validation"
            text = b"\n".join(data for path, data in files
                              if in_validation(path, self.val_fraction) == want)
            if not text:
                raise ValueError(f"val_fraction={self.val_fraction} leaves the {split} split "
                                 "empty")
            corpora[split] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        return corpora

    @functools.cached_property
    def _documents(self) -> dict[str, list[Tensor]]:
        files = _stdlib_files(self.root or stdlib_root())
        return {split: [torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        for path, data in files if data
                        and in_validation(path, self.val_fraction) == (split == "validation")]
                for split in SPLITS}

    def documents(self, split: str) -> list[Tensor]:
        """The split's non-empty files, in path order, as (L,) uint8 bytes."""
        _require(split in SPLITS, "split", split, f"one of {SPLITS}")
        return self._documents[split]

    def check_length(self, seq_len: int) -> None:
        shortest = min(len(corpus) for corpus in self._corpora.values())
        _require(seq_len < shortest, "seq_len", seq_len, f"< {shortest} (the smaller split)")

    def _batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
               split: str) -> Batch:
        corpus = self._corpora[split]
        starts = torch.randint(len(corpus) - seq_len, (batch_size,), generator=generator)
        windows = corpus[starts[:, None] + torch.arange(seq_len + 1)].long()
        return _shifted(windows, torch.ones_like(windows, dtype=torch.bool))

    def decode(self, tokens: Tensor) -> str:
        """(N,) byte tokens as text (invalid UTF-8 replaced)."""
        return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")

    def encode(self, text: str) -> Tensor:
        """(N,) long byte tokens of `text` (UTF-8)."""
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, SelectiveCopy, Needle, StdlibLM)}


def make_task(name: str, **params: Any) -> Task:
    """The task `name` with `params`; unknown names or parameters are `ValueError`s."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"task {name!r} got unknown parameters {unknown}; it takes "
                         f"{sorted(known)}")
    return cls(**params)


def bits(nats: float) -> float:
    """A cross-entropy in nats as bits."""
    return nats / math.log(2)
