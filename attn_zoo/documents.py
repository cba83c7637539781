"""Packed sequences: rows that hold several documents, attention kept inside each document.

    out = attn(q, k, v, causal=True, document_ids=ids)      # ids (B, N): equal ids = one document
    out = attn(q, k, v, causal=True, cu_seqlens=offsets)    # B = 1, offsets (n_docs + 1,) int32

A packed call equals running each document alone, as its own sequence with positions from 0.
`check_documents` validates either form and returns the (B, N) ids. Two ways run them, both
without an N x N tensor and with work proportional to the pairs inside documents:
`DocumentGroups` regroups the documents into batches of equal length, so any variant, engine
and kernel runs each document exactly as a sequence of its own length; `DocumentSpans` lays the
rows end to end as one sequence and gives each position its document's bounds, for patterns
that speak of positions relative to the sequence start (`PatternAttention.relative_parts`),
which then run every document in one call with document-relative positions.
`positions_in_document` and `last_documents` serve the backbone (positions that restart at
each document, generation that continues the last document of a row).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_documents(document_ids: Tensor | None, cu_seqlens: Tensor | None, batch: int,
                    n: int, device: torch.device) -> Tensor | None:
    """The (B, N) long document ids of a call, from `document_ids` or `cu_seqlens`, checked;
    None when neither is given. A ValueError or TypeError names the tensor and the value."""
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError("give document_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        document_ids = _ids_from_offsets(cu_seqlens, batch, n)
    elif document_ids is None:
        return None
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"document_ids must be a (B, N) integer tensor, got "
                        f"{type(document_ids).__name__}")
    if document_ids.is_floating_point() or document_ids.is_complex() or (
            document_ids.dtype == torch.bool):
        raise TypeError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
    if document_ids.shape != (batch, n):
        raise ValueError(f"document_ids must have shape (B, N) = {(batch, n)}, got "
                         f"{tuple(document_ids.shape)}")
    if document_ids.device != device:
        raise ValueError(f"document_ids must be on {device}, got {document_ids.device}")
    ids = document_ids.long()
    if ids.numel() and int(ids.min()) < 0:
        row, position = (ids < 0).nonzero()[0].tolist()
        raise ValueError(f"document_ids must be >= 0, got {int(ids[row, position])} at row "
                         f"{row}, position {position}")
    # Contiguous runs: an id that changes never comes back later in its row.
    changes = torch.ones_like(ids, dtype=torch.bool)
    changes[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_ids = torch.where(changes, ids, -1)
    sorted_ids = run_ids.sort(dim=1).values
    repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(1).nonzero()[0])
        value = int(sorted_ids[row, 1:][repeated[row]][0])
        position = int(((ids[row] == value) & changes[row]).nonzero()[1])
        raise ValueError(f"document_ids must form contiguous runs, got id {value} again at row "
                         f"{row}, position {position} after another document")
    return ids


def _ids_from_offsets(cu_seqlens: Tensor, batch: int, n: int) -> Tensor:
    """(1, N) document ids from FlashAttention's offsets (n_docs + 1,): document d holds
    positions cu_seqlens[d] .. cu_seqlens[d + 1] - 1."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (n_docs + 1,) with n_docs >= 1, got "
                         f"{tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens describes one packed row (B = 1), got B = {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    steps = [index for index in range(1, len(offsets)) if offsets[index] <= offsets[index - 1]]
    if steps:
        index = steps[0]
        raise ValueError(f"cu_seqlens must be increasing, got {offsets[index]} after "
                         f"{offsets[index - 1]} at index {index}")
    if offsets[-1] != n:
        raise ValueError(f"cu_seqlens must end at N = {n}, got {offsets[-1]}")
    lengths = torch.tensor(offsets, device=cu_seqlens.device).diff()
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=cu_seqlens.device),
                                   lengths)[None]


def _begins(document_ids: Tensor) -> Tensor:
    """(B, N) bool: True where a document begins (every row begins one)."""
    begins = torch.ones_like(document_ids, dtype=torch.bool)
    begins[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return begins


def document_starts(document_ids: Tensor) -> Tensor:
    """(B, N) long: the position where each token's document starts."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device)
    return torch.where(_begins(document_ids), positions, 0).cummax(dim=1).values


def positions_in_document(document_ids: Tensor) -> Tensor:
    """(B, N) long: each token's position inside its document (0 at every document start)."""
    return torch.arange(document_ids.shape[1], device=document_ids.device) - document_starts(
        document_ids)


def last_documents(document_ids: Tensor) -> Tensor:
    """(B,) long: the start of the last document of every row."""
    return document_starts(document_ids)[:, -1]


class DocumentGroups:
    """The documents of packed rows, grouped by length.

    For each distinct length L: `index` (G, L) long, the positions in the flattened (B * N)
    rows of the G documents of that length. `gather` regroups a (B, H, N, ...) tensor into
    per-length batches (G, H, L, ...); `scatter` puts per-length results back in place.
    """

    def __init__(self, document_ids: Tensor) -> None:
        batch, n = document_ids.shape
        device = document_ids.device
        rows, begins = _begins(document_ids).nonzero(as_tuple=True)
        flat_begins = rows * n + begins
        # Every row starts a document, so a row's last one ends where the next row begins.
        ends = torch.cat([flat_begins[1:], flat_begins.new_tensor([batch * n])])
        lengths = ends - flat_begins
        self.index: list[Tensor] = []
        for length in sorted(set(lengths.tolist())):
            chosen = flat_begins[lengths == length]
            self.index.append(chosen[:, None] + torch.arange(length, device=device))
        order = torch.cat([index.flatten() for index in self.index])
        self._inverse = torch.empty_like(order)
        self._inverse[order] = torch.arange(order.numel(), device=device)
        self.batch, self.n = batch, n

    def gather(self, x: Tensor) -> list[Tensor]:
        """x (B, H, N, ...) -> one (G, H, L, ...) tensor per length (B, N, ... without a head
        axis: pass x[:, None] and drop it after)."""
        flat = x.movedim(2, 1).flatten(0, 1)  # (B * N, H, ...)
        return [flat[index].movedim(1, 2) for index in self.index]

    def scatter(self, parts: list[Tensor]) -> Tensor:
        """One (G, H, L, ...) tensor per length -> (B, H, N, ...), each row back in place."""
        flat = torch.cat([part.movedim(2, 1).flatten(0, 1) for part in parts])
        return flat[self._inverse].unflatten(0, (self.batch, self.n)).movedim(1, 2)


class DocumentSpans:
    """The rows of packed (B, N) document ids laid end to end as one sequence of B * N
    positions: `starts`, `ends` (B * N,) long, the first position and one past the last of
    each position's document; `key`, the document boundaries (for caches of layouts).
    `flatten` and `unflatten` move (B, H, N, ...) tensors to (1, H, B * N, ...) and back.
    """

    def __init__(self, document_ids: Tensor) -> None:
        self.batch, self.n = document_ids.shape
        total = self.batch * self.n
        rows = torch.arange(self.batch, device=document_ids.device)[:, None] * self.n
        self.starts = (document_starts(document_ids) + rows).reshape(-1)
        first = (torch.arange(self.n, device=document_ids.device) + rows)[_begins(document_ids)]
        last = torch.cat([first[1:], first.new_tensor([total])])
        self.ends = torch.repeat_interleave(last, last - first)
        self.key = (total, *first.tolist())

    def flatten(self, x: Tensor) -> Tensor:
        """(B, H, N, ...) -> (1, H, B * N, ...); (B, N) -> (1, B * N)."""
        if x.dim() == 2:
            return x.reshape(1, -1)
        return x.transpose(0, 1).flatten(1, 2)[None]

    def unflatten(self, x: Tensor) -> Tensor:
        """(1, H, B * N, ...) -> (B, H, N, ...)."""
        return x[0].unflatten(1, (self.batch, self.n)).transpose(0, 1)
