"""Documents -> fixed-length token windows -> batches, and which positions to keep.

    windows = token_windows(texts, tokenizer, context=128)  # Iterator[LongTensor[128]]
    batches = batched_windows(windows, batch_size=32)   # Iterator[LongTensor[32, 128]]
    keep    = skip_positions_mask(batch, bos_token_id=tokenizer.bos_token_id)

The documents come from sae_kit/text.py (``iter_texts``); the details of each step are in its docstring.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

__all__ = ["batched_windows", "skip_positions_mask", "token_windows"]


def _special_id(tokenizer: Any, which: str, purpose: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        fix = (
            "pass prepend_bos=False, or give the tokenizer a BOS token "
            "(e.g. `tokenizer.bos_token = tokenizer.eos_token`, as TransformerLens does)"
            if purpose == "prepend_bos"
            else "choose another separator ('eos', 'bos' or None)"
        )
        raise ValueError(
            f"{purpose} needs a {which.upper()} token but {type(tokenizer).__name__} has none "
            f"({which}_token_id is None); {fix}"
        )
    return int(token_id)


def _text_batches(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Group documents so one tokenizer call gets many of them (fast tokenizers parallelise
    over a list) without holding a whole large corpus in memory."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def token_windows(
    texts: Iterable[str],
    tokenizer: Any,
    context: int,
    *,
    prepend_bos: bool = True,
    separator: Literal["eos", "bos"] | int | None = "eos",
    docs_per_call: int = 256,
    chars_per_call: int = 1 << 20,
) -> Iterator[torch.Tensor]:
    """Cut a stream of documents into int64 windows of exactly ``context`` tokens.

    Each document is tokenised on its own without special tokens, the documents are joined
    with ``separator`` (the tokenizer's EOS or BOS id, an explicit token id, or nothing) between
    consecutive documents, and the stream is cut into consecutive chunks. With ``prepend_bos``
    every window is ``[BOS] + next context-1 tokens``, so each window looks like the start of a
    sequence to the model; without it a window is the next ``context`` tokens. The last partial
    window is dropped. Documents that tokenise to nothing are skipped (no doubled separators).
    Deterministic: the same texts and tokenizer always give the same windows.

    ``tokenizer`` is a Hugging Face tokenizer (anything callable like one, returning
    ``{"input_ids": list[list[int]]}`` for a list of strings). A tokenizer without a BOS token
    and ``prepend_bos=True`` raises ValueError rather than silently using another token.
    Documents are tokenised lazily, ``docs_per_call`` documents or ``chars_per_call``
    characters per tokenizer call.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single string; wrap it in a list")
    if context < (2 if prepend_bos else 1):
        raise ValueError(
            f"context={context} is too small: need at least {2 if prepend_bos else 1} tokens"
            + (" (BOS plus one token)" if prepend_bos else "")
        )
    # Resolve special tokens now so a bad tokenizer fails at the call, not mid-iteration.
    bos_id = _special_id(tokenizer, "bos", "prepend_bos") if prepend_bos else None
    if separator is None:
        sep_id = None
    elif isinstance(separator, int) and not isinstance(separator, bool):
        sep_id = separator
    elif separator in ("eos", "bos"):
        sep_id = _special_id(tokenizer, separator, f"separator={separator!r}")
    else:
        raise ValueError(f"separator must be 'eos', 'bos', a token id or None, got {separator!r}")
    return _windows(texts, tokenizer, context, bos_id, sep_id, docs_per_call, chars_per_call)


def _windows(
    texts: Iterable[str],
    tokenizer: Any,
    context: int,
    bos_id: int | None,
    sep_id: int | None,
    docs_per_call: int,
    chars_per_call: int,
) -> Iterator[torch.Tensor]:
    content = context - (1 if bos_id is not None else 0)
    carry: list[int] = []  # tokens of the stream not yet placed in a window (< content of them)
    first_doc = True
    for docs in _text_batches(texts, docs_per_call, chars_per_call):
        encoded = tokenizer(
            docs,
            add_special_tokens=False,
            return_attention_mask=False,
            # Documents are longer than model_max_length by design; silence that warning.
            verbose=False,
        )["input_ids"]
        stream = carry
        for ids in encoded:
            if not ids:
                continue
            if not first_doc and sep_id is not None:
                stream.append(sep_id)
            stream.extend(ids)
            first_doc = False
        n = len(stream) // content
        if n:
            body = torch.tensor(stream[: n * content], dtype=torch.long).view(n, content)
            if bos_id is not None:
                body = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)
            yield from body.unbind(0)
        carry = stream[n * content:]


def batched_windows(
    windows: Iterable[torch.Tensor], batch_size: int, *, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Stack windows into ``[B, context]`` batches; the last batch may be smaller unless
    ``drop_last``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(windows)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk or (drop_last and len(chunk) < batch_size):
            return
        yield torch.stack(chunk)


# ----------------------------------------------------------------------------------------------
# Positions to keep when harvesting
# ----------------------------------------------------------------------------------------------


def skip_positions_mask(
    tokens: torch.Tensor,
    *,
    skip_bos: bool = True,
    skip_pad: bool = True,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask ``[B, T]`` (or ``[T]``) of positions whose activations a harvester should keep.

    ``skip_bos`` drops the first position of every sequence (the first attended position when
    ``attention_mask`` is given) and every position holding ``bos_token_id``. The first position
    is dropped even if ``bos_token_id`` is unknown: models use it as an attention sink and its
    activations have norms far above the rest, whether or not it holds a BOS token. Mid-sequence
    BOS tokens (``separator="bos"``) are dropped by id.

    ``skip_pad`` drops positions holding ``pad_token_id`` and, if given, positions where
    ``attention_mask`` is 0. Note: many tokenizers (SmolLM2, GPT-2) use EOS as the pad token, so
    passing ``pad_token_id`` also drops the EOS separators of :func:`token_windows`; its windows
    have no padding, so leave ``pad_token_id=None`` for them.
    """
    if tokens.dim() not in (1, 2):
        raise ValueError(f"tokens must be [T] or [B, T], got shape {tuple(tokens.shape)}")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(tokens.shape)}"
        )
    keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if tokens.shape[-1] == 0:
        return keep
    if skip_bos:
        if attention_mask is None:
            keep[..., 0] = False
        else:
            attended = attention_mask.bool()
            # argmax of an int tensor gives the first maximum: the first attended position
            # (left padding puts it after the pads). Rows with no attended position keep none.
            first = attended.to(torch.int8).argmax(dim=-1, keepdim=True)
            keep.scatter_(-1, first, False)
        if bos_token_id is not None:
            keep &= tokens != bos_token_id
    if skip_pad:
        if pad_token_id is not None:
            keep &= tokens != pad_token_id
        if attention_mask is not None:
            keep &= attention_mask.bool()
    return keep
