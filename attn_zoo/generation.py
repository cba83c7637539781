"""Autoregressive generation: greedy, sampling (temperature, top-k, top-p) and beam search.

Models call `generate` from their own `generate` method with their forward function:

    forward(tokens (B, n), cache=cache, **context) -> logits (B, n, vocab)

Every variant has a cache (`attn_zoo.cache`): the prompt is one prefill call through the
`DecodeCache`, and every later call feeds one new token. Packed prompts (several documents per
row) go through `generate_last_documents`, which continues the last document of each row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attn_zoo.cache import DecodeCache
from attn_zoo.documents import check_documents, last_documents
from attn_zoo.layers import check_choice
from attn_zoo.params import require

STRATEGIES = ("greedy", "sample", "beam")
CHECKED_OPTIONS = ("strategy", "temperature", "top_k", "top_p", "num_beams", "eos_token_id")
"""The options of `generate` that `check_options` checks, besides max_new_tokens and vocab_size."""

Forward = Callable[..., Tensor]


class _Sequences:
    """The rows being generated and what the model needs to extend them.

    tokens (R, L); context: per-row tensors (R, ...) for `forward` (e.g. encoder memory),
    kept in step with the rows when beam search reorders them.
    """

    def __init__(self, forward: Forward, prompt: Tensor, cache: DecodeCache,
                 context: dict[str, Tensor | None]) -> None:
        self.forward, self.tokens, self.cache, self.context = forward, prompt, cache, context

    def next_logits(self) -> Tensor:
        """float32 logits (R, vocab) of the token after each row."""
        # The cache has consumed `seen` tokens: the first call is the prompt, then one each.
        new = self.tokens[:, self.cache.seen:]
        return self.forward(new, cache=self.cache, **self.context)[:, -1].float()

    def append(self, token: Tensor) -> None:
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (R',) long, in that order (rows may repeat)."""
        self.tokens = self.tokens.index_select(0, index)
        self.context = {key: None if value is None else value.index_select(0, index)
                        for key, value in self.context.items()}
        self.cache.reorder(index)


def _int(name: str, value: object, low: int, high: int | None = None,
         optional: bool = False) -> None:
    """TypeError unless `value` is an int (None too when `optional`); ValueError unless it is
    in [low, high) (high None: no upper bound)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {value!r}")
    within = f"in [{low}, {high})" if high is not None else f">= {low}"
    require(low <= value and (high is None or value < high), name, value, f"an int {within}")


def _real(name: str, value: object, optional: bool = False) -> None:
    """TypeError unless `value` is a finite real number (None too when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, "
                        f"got {value!r}")
    require(math.isfinite(value), name, value, "a finite number")


def check_options(
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Check `generate`'s options (see there): a TypeError or ValueError naming the first bad
    one and its value. `eos_token_id` must be below `vocab_size` when that is given."""
    _int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {strategy!r}")
    check_choice("strategy", strategy, STRATEGIES)
    _real("temperature", temperature)
    require(temperature > 0, "temperature", temperature, "> 0 (use strategy='greedy')")
    _int("top_k", top_k, 1, optional=True)
    _real("top_p", top_p, optional=True)
    require(top_p is None or 0 < top_p <= 1, "top_p", top_p, "in (0, 1] or None")
    _int("num_beams", num_beams, 1)
    _int("vocab_size", vocab_size, 1, optional=True)
    _int("eos_token_id", eos_token_id, 0, vocab_size, optional=True)


def generate(
    forward: Forward,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    cache: DecodeCache,
    vocab_size: int | None = None,
    context: dict[str, Tensor | None] | None = None,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """The prompt (B, P) long followed by up to `max_new_tokens` new tokens: (B, P + new).

    strategy: "greedy" (argmax), "sample" (from softmax(logits / temperature), restricted to
    the `top_k` most likely tokens and/or the smallest set holding probability `top_p`, drawn
    with `generator`), or "beam" (`num_beams` beams per row, ranked by their plain summed
    log-probability, no length normalisation; the best beam of each row is returned).
    With `eos_token_id`, a row that produced it is padded with it, and generation stops early
    once every row (every beam) has finished. `vocab_size`: the model's vocabulary; when
    given, the prompt's ids and `eos_token_id` must lie in [0, vocab_size). `context`: extra
    per-row keyword arguments of `forward` (None values pass through). `cache`: an empty
    `DecodeCache` (the model's `init_cache()`). Every argument is checked before the first
    call of `forward`; an empty batch (B = 0) returns the prompt.
    """
    check_options(max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
                  top_k=top_k, top_p=top_p, num_beams=num_beams, eos_token_id=eos_token_id,
                  vocab_size=vocab_size)
    check_prompt(prompt, vocab_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"context must be a dict or None, got {type(context).__name__}")
    if not isinstance(cache, DecodeCache):
        raise TypeError(f"cache must be a DecodeCache, got {type(cache).__name__}")
    if cache.seen:
        raise ValueError(f"cache must be empty, got one at position {cache.seen}")
    if prompt.shape[0] == 0:
        return prompt.clone()
    sequences = _Sequences(forward, prompt, cache, dict(context or {}))
    if strategy == "beam":
        return _beam_search(sequences, max_new_tokens, num_beams, eos_token_id)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = sequences.next_logits()
        if strategy == "greedy":
            token = logits.argmax(-1)
        else:
            token = _sample(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done = done | (token == eos_token_id)
        sequences.append(token)
        if done.all():
            break
    return sequences.tokens


def check_prompt(prompt: object, vocab_size: int | None) -> None:
    """TypeError or ValueError unless `prompt` is a (B, P) integer tensor, P >= 1, of token ids
    >= 0 (and < vocab_size when that is given)."""
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be a (B, P) integer tensor, got {type(prompt).__name__}")
    require(prompt.dim() == 2 and prompt.shape[1] >= 1 and not prompt.is_floating_point()
            and not prompt.is_complex() and prompt.dtype != torch.bool, "prompt",
            f"{prompt.dtype} of shape {tuple(prompt.shape)}", "a (B, P) integer tensor, P >= 1")
    if prompt.numel():
        low, high = int(prompt.min()), int(prompt.max())
        require(low >= 0 and (vocab_size is None or high < vocab_size), "prompt",
                f"ids in [{low}, {high}]", "token ids >= 0" if vocab_size is None
                else f"token ids in [0, vocab_size={vocab_size})")


def generate_last_documents(
    forward: Forward,
    prompt: Tensor,
    max_new_tokens: int,
    document_ids: Tensor,
    *,
    new_cache: Callable[[], DecodeCache],
    vocab_size: int | None = None,
    **options: Any,
) -> Tensor:
    """`generate` for packed prompts: the prompt (B, P) followed by new tokens that continue
    the last document of each row, (B, P + new).

    document_ids: (B, P) integer, equal ids = one contiguous document. Attention never crosses
    documents, so a row's continuation depends only on its last document (positions from 0):
    the rows are grouped by the length of their last document, and each group is one `generate`
    call (through a fresh cache from `new_cache`) on those last documents. options: those of
    `generate` (not `context`); with `eos_token_id`, a group that stops early is padded with it,
    as `generate` pads finished rows. Every argument is checked before `forward` runs.
    """
    checked = {key: value for key, value in options.items() if key in CHECKED_OPTIONS}
    check_options(max_new_tokens=max_new_tokens, vocab_size=vocab_size, **checked)
    check_prompt(prompt, vocab_size)
    ids = check_documents(document_ids, None, *prompt.shape, prompt.device)
    length = prompt.shape[1] - last_documents(ids)  # (B,): each row's last document
    parts = []
    for size in length.unique().tolist():
        rows = (length == size).nonzero()[:, 0]
        out = generate(forward, prompt[rows, -size:], max_new_tokens, cache=new_cache(),
                       vocab_size=vocab_size, **options)
        parts.append((rows, out[:, size:]))
    longest = max((new.shape[1] for _, new in parts), default=0)
    # Only eos stops a group early: every group makes max_new_tokens without it.
    pad = options.get("eos_token_id")
    new = prompt.new_full((prompt.shape[0], longest), 0 if pad is None else pad)
    for rows, tokens in parts:
        new[rows, :tokens.shape[1]] = tokens
    return torch.cat([prompt, new], dim=1)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> Tensor:
    """One token per row of logits (R, vocab)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones already hold top_p: the top token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _beam_search(sequences: _Sequences, max_new_tokens: int, num_beams: int,
                 eos_token_id: int | None) -> Tensor:
    """Beam search over rows b * num_beams + k (beam k of batch row b); see `generate`."""
    batch = sequences.tokens.shape[0]
    if max_new_tokens == 0:
        return sequences.tokens
    # One prefill per batch row, then every row splits into its beams.
    log_probs = sequences.next_logits().log_softmax(-1)
    device = log_probs.device
    expand = torch.arange(batch, device=device).repeat_interleave(num_beams)
    sequences.reorder(expand)
    log_probs = log_probs.index_select(0, expand)
    vocab = log_probs.shape[-1]
    # Only beam 0 is live at first, so the first step does not pick one token num_beams times.
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step:
            log_probs = sequences.next_logits().log_softmax(-1)
        if eos_token_id is not None:
            # A finished beam can only be extended by eos, at no cost: its score is final.
            log_probs[finished] = float("-inf")
            log_probs[finished, eos_token_id] = 0.0
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, num_beams * vocab)
        scores, best = candidates.topk(num_beams, dim=-1)  # sorted: beam 0 is the best
        parent = torch.arange(batch, device=device)[:, None] * num_beams + best // vocab
        token = (best % vocab).reshape(-1)
        sequences.reorder(parent.reshape(-1))
        sequences.append(token)
        if eos_token_id is not None:
            finished = token == eos_token_id
            if finished.all():
                break
    return sequences.tokens.reshape(batch, num_beams, -1)[:, 0]
