"""Token-budget batching for a padded encoder: pure functions over token lengths.

A batch of texts runs through the encoder at one padded width, so every shorter member pays for
padding that is computed and thrown away. Web captions are short with a long tail (median about a
dozen T5 tokens, a few at the 128-token cap), so a fixed batch padded to the cap spends most of its
FLOPs on padding. `plan_batches` instead:

1. pads each item to `pad_width(length)`: a width fixed by the item's own length, never by which
   other items share its batch -- even widths up to 16 tokens, then four widths per octave
   (20, 24, 28, 32, 40, ..., 64, 80, 96, 112, 128, 160, ...), at most `max_width`;
2. cuts the input, in order, into windows of `window` items (bounded memory and latency for a
   streaming caller, and a deterministic plan that depends only on the lengths);
3. sorts each window by length, longest first (stable, so ties keep input order; the largest batch
   runs first, so an out-of-memory budget fails at once rather than at the end);
4. fills batches in that order while `width x batch size <= max_tokens` and, if given,
   `batch size <= max_batch_size`, and closes a batch wherever the width changes: a batch never
   mixes widths, so every member is encoded at exactly its own `pad_width`.

Why a width per length rather than each batch padded to its own longest member: the encoder's
output for a row depends, in its last bits, on the padded width it ran at (the attention softmax
and the probabilities x values product reduce over all `width` keys; padded keys add exact zeros,
but the vectorised reduction order and the GEMM blocking change with the length). Padding to the
batch's longest member therefore made a caption's float32 output, and sometimes its float16 bytes,
depend on its batch-mates -- and in `kiln prepare` those depend on Beam's bundle boundaries, which
differ between runs, breaking DESIGN.md's byte-identical shards. With `pad_width`, the width is a
function of the caption alone. (What makes the rest of the forward pass independent of the batch is
in `embed.t5`'s docstring.)

Cost, at web caption lengths (median 12, mean ~16 tokens) with a window of `max_tokens` captions
(`tests/embed/test_batching.py` measures it): padding is 6.6% of the padded tokens for budgets of 2k,
4k and 16k tokens (padding each batch to its own longest member, closed early at length changes,
wasted 5.0%, 5.1% and 8.3%), while batches hold on average 59%, 59% and 41% of the budget (before:
66%, 66% and 64%): a window leaves a partial batch at every width it holds. Over windows of a few
hundred captions (`kiln prepare` hands the encoder one Beam batch of 256 at a time) padding stays
at 6.6% (before: 39% at a 4k budget), in small passes. Finer widths trade the other way: one width
per length (no padding at all) makes 3-4x as many batches as these.

`scatter` puts per-batch outputs back in input order; `padding_waste` measures a plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["pad_width", "padding_waste", "plan_batches", "scatter"]

T = TypeVar("T")


def pad_width(length: int, max_width: int | None = None) -> int:
    """The width an item of `length` tokens is padded to: `length` rounded up to a multiple of 2 up
    to 16 tokens, then of a quarter of its octave (4 up to 32, 8 up to 64, 16 up to 128, ...), at
    most `max_width` (the encoder's max_length: no item is longer). A function of `length` alone:
    that is what makes the encoding independent of an item's batch-mates (module docstring)."""
    length = int(length)
    if length < 1:
        raise ValueError(f"every length must be >= 1 (T5 appends EOS, so even an empty text has one token), got {length}")
    step = max(2, 1 << max(0, (length - 1).bit_length() - 3))  # (2^k, 2^(k+1)] in steps of 2^(k-2)
    width = -(-length // step) * step
    if max_width is None:
        return width
    if length > max_width:
        raise ValueError(f"length {length} is above max_width={max_width}")
    return min(width, int(max_width))


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    max_batch_size: int | None = None,
    window: int | None = None,
    max_width: int | None = None,
) -> list[list[int]]:
    """Index batches (each a list of positions into `lengths`) covering every index exactly once;
    all members of a batch share one `pad_width(length, max_width)`.

    `max_tokens`: budget on padded tokens per batch (width x batch size); must be at least the
    widest width. `max_batch_size`: optional cap on items per batch. `window`: items sorted
    together (default `max_tokens`). `max_width`: cap on widths (the encoder's max_length).
    Deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    window = int(window or max_tokens)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lengths = [int(n) for n in lengths]
    widths = [pad_width(n, max_width) for n in lengths]
    widest = max(widths, default=0)
    if widest > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} is below the longest length's padded width {widest} "
            f"(length {max(lengths)}): that item fits no batch"
        )

    batches: list[list[int]] = []
    for start in range(0, len(lengths), window):
        order = sorted(range(start, min(start + window, len(lengths))), key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in order:
            width = widths[i]
            if batch:
                full = width * (len(batch) + 1) > max_tokens
                full = full or (max_batch_size is not None and len(batch) >= max_batch_size)
                if full or width != widths[batch[-1]]:
                    batches.append(batch)
                    batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return batches


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]], max_width: int | None = None) -> float:
    """Fraction of the padded positions computed for `batches` that are padding (0 = none); each
    batch runs at its longest member's `pad_width`."""
    padded = sum(pad_width(max(lengths[i] for i in b), max_width) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded


def scatter(batches: Sequence[Sequence[int]], outputs: Sequence[Sequence[T]], n: int) -> list[T]:
    """Per-batch outputs (aligned with `batches`) back in input order: a list of `n` items."""
    result: list = [None] * n
    seen = 0
    for batch, out in zip(batches, outputs, strict=True):
        if len(batch) != len(out):
            raise ValueError(f"a batch of {len(batch)} indices came back with {len(out)} outputs")
        for i, item in zip(batch, out):
            result[i] = item
        seen += len(batch)
    if seen != n:
        raise ValueError(f"batches cover {seen} items, expected {n}")
    return result
