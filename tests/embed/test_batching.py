"""Token-budget batching (embed/batching.py): pure functions, no model."""

from __future__ import annotations

import numpy as np
import pytest

from embed.batching import padding_waste, plan_batches, scatter


def web_like_lengths(n: int, seed: int = 0) -> list[int]:
    """T5 token counts shaped like LAION alt-text: median ~12, long tail, capped at 128 (EOS included)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(12), 0.75, n)), 1, 128).astype(int).tolist()


def check_plan(lengths, batches, max_tokens, max_batch_size=None):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for b in batches:
        assert b, "empty batch"
        assert max(lengths[i] for i in b) * len(b) <= max_tokens
        if max_batch_size is not None:
            assert len(b) <= max_batch_size


def test_web_like_distribution_small_waste():
    lengths = web_like_lengths(20_000)
    assert 11 <= np.median(lengths) <= 13 and max(lengths) == 128
    for max_tokens in (2048, 4096, 16384):
        batches = plan_batches(lengths, max_tokens)  # default window: max_tokens captions
        check_plan(lengths, batches, max_tokens)
        waste = padding_waste(lengths, batches)
        assert waste < 0.10, (max_tokens, waste)
        # Batches stay large: mean padded tokens at least a third of the budget.
        mean_padded = np.mean([max(lengths[i] for i in b) * len(b) for b in batches])
        assert mean_padded > max_tokens / 3, (max_tokens, mean_padded)


def test_far_less_waste_than_fixed_batches_padded_to_128():
    lengths = web_like_lengths(5000, seed=1)
    fixed = [list(range(i, min(i + 64, len(lengths)))) for i in range(0, len(lengths), 64)]
    padded_128 = 1 - sum(lengths) / (128 * len(lengths))
    assert padded_128 > 0.85  # what padding='max_length' 128 throws away
    assert padding_waste(lengths, fixed) > 0.5  # fixed batches padded to their own longest
    assert padding_waste(lengths, plan_batches(lengths, 4096)) < 0.1


def test_budget_and_batch_size_respected():
    lengths = web_like_lengths(3000, seed=2)
    for max_tokens, max_bs, window in [(128, None, 100), (512, 8, 1000), (1000, 64, 3000), (300, 1, 50)]:
        batches = plan_batches(lengths, max_tokens, max_batch_size=max_bs, window=window)
        check_plan(lengths, batches, max_tokens, max_bs)


def test_windows_are_bounded_and_in_order():
    lengths = web_like_lengths(1000, seed=3)
    batches = plan_batches(lengths, 512, window=100)
    # Each batch draws from one window, and windows are processed in input order.
    windows = [{i // 100 for i in b} for b in batches]
    assert all(len(w) == 1 for w in windows)
    order = [next(iter(w)) for w in windows]
    assert order == sorted(order)


def test_sorted_longest_first_within_window():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = plan_batches(lengths, max_tokens=9, min_fill=1.0)
    # Stable sort: ties keep input order; each batch respects 9 padded tokens.
    assert batches == [[1], [3], [6], [4], [0, 5, 2]]


def test_early_close_at_length_change():
    lengths = [4] * 6 + [3] * 6
    # Budget 40: 6 x 4 = 24 >= half the budget, so the 3s start a new batch instead of being padded.
    assert plan_batches(lengths, 40, min_fill=0.5) == [list(range(6)), list(range(6, 12))]
    # Without early closing the greedy fill straddles the length change.
    assert plan_batches(lengths, 40, min_fill=1.0) == [list(range(10)), [10, 11]]


def test_deterministic():
    lengths = web_like_lengths(5000, seed=4)
    assert plan_batches(lengths, 2048) == plan_batches(list(lengths), 2048)
    assert plan_batches(lengths, 2048, max_batch_size=32, window=777) == plan_batches(lengths, 2048, max_batch_size=32, window=777)


def test_scatter_restores_input_order():
    lengths = web_like_lengths(500, seed=5)
    batches = plan_batches(lengths, 256, window=64)
    outputs = [[f"item{i}" for i in b] for b in batches]
    assert scatter(batches, outputs, len(lengths)) == [f"item{i}" for i in range(len(lengths))]
    with pytest.raises(ValueError):
        scatter(batches, outputs[:-1], len(lengths))
    with pytest.raises(ValueError):
        scatter(batches, [o[:-1] for o in outputs], len(lengths))


def test_edge_cases():
    assert plan_batches([], 64) == []
    assert plan_batches([64], 64) == [[0]]
    with pytest.raises(ValueError, match="longest length"):
        plan_batches([65], 64)
    with pytest.raises(ValueError, match=">= 1"):
        plan_batches([0, 3], 64)
    with pytest.raises(ValueError):
        plan_batches([3], 64, max_batch_size=0)
    with pytest.raises(ValueError):
        plan_batches([3], 64, min_fill=0.0)
    assert padding_waste([], []) == 0.0
    assert padding_waste([4, 4], [[0, 1]]) == 0.0
    assert padding_waste([4, 2], [[0, 1]]) == pytest.approx(0.25)
