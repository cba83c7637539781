"""Building blocks of the backbone: norms, MLPs, short convolutions and positional encodings
(incl. RoPE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_zoo.documents import positions_in_document
from attn_zoo.params import require

NORMS = ("rms", "layer")
MLPS = ("gelu", "swiglu")
POSITIONS = ("rope", "sinusoidal", "learned", "none")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """`ValueError` naming the argument unless `value` is one of `choices`."""
    require(value in choices, name, value, "one of " + ", ".join(map(repr, choices)))


def make_norm(kind: str, dim: int) -> nn.Module:
    """"rms" (RMSNorm) or "layer" (LayerNorm) over the last axis of size `dim`."""
    check_choice("norm", kind, NORMS)
    return nn.RMSNorm(dim) if kind == "rms" else nn.LayerNorm(dim)


class GeluMLP(nn.Module):
    """dim -> 4 dim -> GELU -> dim. x: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim, bias=bias)
        self.down = nn.Linear(4 * dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    """SiLU-gated MLP. x: (..., dim) -> (..., dim).

    The hidden size is 2/3 of 4 dim (rounded up to a multiple of 8) so that the three
    matrices hold as many parameters as the two of `GeluMLP`.
    """

    def __init__(self, dim: int, bias: bool = False) -> None:
        super().__init__()
        hidden = 8 * math.ceil(8 * dim / 3 / 8)
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mlp(kind: str, dim: int, bias: bool = False) -> nn.Module:
    """"gelu" (`GeluMLP`) or "swiglu" (`SwiGLU`)."""
    check_choice("mlp", kind, MLPS)
    return GeluMLP(dim, bias) if kind == "gelu" else SwiGLU(dim, bias)


class ShortConv(nn.Module):
    """A causal depthwise convolution over positions, added to its input (as in H3, Based and
    canon layers): y_t = x_t + b + sum_{j < kernel} w_j * x_{t-j}, taps before the sequence's
    (or the token's document's) start reading zeros.

    forward(x (B, N, dim), before=None, document_ids=None) -> (B, N, dim). before: (B,
    kernel - 1, dim), the inputs of the positions just before x (decoding, context parallel
    shards), zeros where there are none; document_ids: (B, N), packed rows (no `before`).
    """

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        require(isinstance(kernel, int) and not isinstance(kernel, bool) and kernel >= 1,
                "kernel", kernel, "a positive int")
        self.kernel = kernel
        bound = kernel ** -0.5  # nn.Conv1d's default for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(dim, kernel).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))

    def forward(self, x: Tensor, before: Tensor | None = None,
                document_ids: Tensor | None = None) -> Tensor:
        n, taps = x.shape[1], self.kernel - 1
        if before is None:
            before = x.new_zeros(x.shape[0], taps, x.shape[2])
        padded = torch.cat([before, x], dim=1)
        inside = None if document_ids is None else positions_in_document(document_ids)
        out = x + self.bias
        for j in range(self.kernel):
            tap = padded[:, taps - j:taps - j + n]
            if inside is not None and j:
                tap = tap * (inside >= j)[..., None].to(tap.dtype)
            out = out + self.weight[:, j] * tap
        return out


def sinusoidal(positions: Tensor, dim: int) -> Tensor:
    """Fixed sin/cos encodings (Vaswani et al.): positions (...) long -> (..., dim) float32.

    Frequencies `10000 ** (-2 f / dim)`; the first half of the features are sines, the
    second half cosines (an odd `dim` drops the last cosine).
    """
    half = (dim + 1) // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) * 2 / dim)
    angles = positions.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[..., :dim]


def token_positions(n: int, device: torch.device, start: int = 0,
                    document_ids: Tensor | None = None) -> Tensor:
    """The position of each of n tokens: (N,) long, start .. start + N - 1 for every row, or
    with `document_ids` (B, N) (see `attn_zoo.documents.check_documents`) their (B, N)
    positions inside their documents, 0 at every document start."""
    if document_ids is None:
        return torch.arange(start, start + n, device=device)
    return positions_in_document(document_ids)


class SinusoidalPositions(nn.Module):
    """Adds `sinusoidal` encodings. forward(x (B, N, dim), positions (N,) or (B, N) long)
    -> (B, N, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + sinusoidal(positions, self.dim).to(x.dtype)


class LearnedPositions(nn.Module):
    """Adds a learned embedding per position < `max_seq_len`.

    forward(x (B, N, dim), positions (N,) or (B, N) long) -> (B, N, dim).
    """

    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, dim)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        limit = self.embedding.num_embeddings
        last = int(positions.max()) if positions.numel() else 0
        if last >= limit:
            raise ValueError(f"positions must be < max_seq_len ({limit}) with learned positions "
                             f"(a sequence or document of at most {limit} tokens), got "
                             f"position {last}")
        return x + self.embedding(positions)


def make_positions(kind: str, dim: int, max_seq_len: int) -> nn.Module | None:
    """The additive encoding of `kind`, or None for "rope" (applied in attention) and "none"."""
    check_choice("pos", kind, POSITIONS)
    if kind == "sinusoidal":
        return SinusoidalPositions(dim)
    if kind == "learned":
        return LearnedPositions(max_seq_len, dim)
    return None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), "rotate half" layout as in GPT-NeoX / LLaMA.

    Feature pairs `(f, f + D/2)` of a head are rotated by `position * base ** (-2 f / D)`, so
    the score of a rotated query and key depends only on their relative position.
    forward(x (B, H, N, D), positions (N,) or (B, N) long) -> (B, H, N, D).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        require(head_dim % 2 == 0, "head_dim", head_dim, "even for rotary embeddings")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq  # (N, D / 2) or (B, N, D / 2)
        if positions.dim() == 2:
            angles = angles[:, None]  # one row of positions per batch row, for every head
        cos, sin = angles.cos(), angles.sin()
        # Rotate in float32 at least: low-precision angles lose the position at long range.
        work = torch.promote_types(x.dtype, torch.float32)
        first, second = x.to(work).chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return rotated.to(x.dtype)
