"""Batches sized by padded tokens rather than by a fixed row count.

A fixed count either wastes the GPU on short prompts or runs out of memory on long ones:
activation memory grows with rows x padded length, so a count that is safe for the longest
prompts leaves most of the device idle for the short ones. Over the length-sorted order a
token budget lets short rows share a batch many at a time and long rows go a few at a time.
"""

from __future__ import annotations

from collections.abc import Sequence


def budget_batches(
    order: Sequence[int],
    lengths: Sequence[int],
    *,
    batch_size: int,
    token_budget: int | None,
    rows_per_item: int = 1,
) -> list[list[int]]:
    """Split `order` into consecutive batches of at most `batch_size` items.

    With a budget, a batch also keeps items x `rows_per_item` x its longest `lengths[i]`
    within `token_budget` (the padded tokens one forward holds); an item that alone exceeds
    the budget gets a batch of its own, since it has to run somehow. `lengths[i]` is the
    padded length item i brings (for generation: prompt plus new tokens); `rows_per_item`
    counts sequences per item (samples drawn per prompt). None: plain `batch_size` chunks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be at least 1 or None, got {token_budget}")
    if rows_per_item < 1:
        raise ValueError(f"rows_per_item must be at least 1, got {rows_per_item}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        full = len(current) >= batch_size or (
            token_budget is not None and (len(current) + 1) * rows_per_item * width > token_budget
        )
        if current and full:
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches
