import random

import pytest

from grait.batching import budget_batches


def _padded_tokens(batch, lengths, rows_per_item=1):
    return len(batch) * rows_per_item * max(lengths[i] for i in batch)


def test_without_a_budget_batches_are_plain_chunks_of_the_order():
    order = [4, 0, 3, 1, 2]
    lengths = [5, 50, 500, 5000, 1]
    assert budget_batches(order, lengths, batch_size=2, token_budget=None) == [[4, 0], [3, 1], [2]]


def test_budget_batches_keep_the_order_and_every_index_once_within_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 40)
        lengths = [rng.randint(1, 300) for _ in range(n)]
        order = sorted(range(n), key=lambda i: lengths[i])
        if rng.random() < 0.3:
            rng.shuffle(order)  # unsorted input still respects the budget
        batch_size = rng.randint(1, 12)
        budget = rng.randint(1, 2000)
        rows = rng.choice([1, 3])
        batches = budget_batches(
            order, lengths, batch_size=batch_size, token_budget=budget, rows_per_item=rows
        )
        assert [i for b in batches for i in b] == order
        for b in batches:
            assert 1 <= len(b) <= batch_size
            assert len(b) == 1 or _padded_tokens(b, lengths, rows) <= budget


def test_budget_fills_short_rows_many_at_a_time_and_long_rows_few():
    lengths = [10] * 6 + [100] * 4
    batches = budget_batches(range(10), lengths, batch_size=8, token_budget=200)
    assert batches == [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]


def test_batch_size_caps_rows_even_under_budget():
    batches = budget_batches(range(5), [1] * 5, batch_size=2, token_budget=10_000)
    assert batches == [[0, 1], [2, 3], [4]]


def test_an_over_long_row_gets_a_batch_of_its_own():
    lengths = [10, 10, 1000, 10]
    batches = budget_batches([0, 1, 2, 3], lengths, batch_size=8, token_budget=100)
    assert batches == [[0, 1], [2], [3]]


def test_rows_per_item_counts_each_sample_against_the_budget():
    batches = budget_batches(range(4), [10] * 4, batch_size=8, token_budget=60, rows_per_item=3)
    assert batches == [[0, 1], [2, 3]]


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"token_budget": 0}, {"rows_per_item": 0}])
def test_nonsense_sizes_are_refused(kwargs):
    args = {"batch_size": 4, "token_budget": 100, "rows_per_item": 1} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        budget_batches([0], [1], **args)
