"""Token-budget batching (embed/batching.py): pure functions, no model."""

from __future__ import annotations

import numpy as np
import pytest

from embed.batching import pad_width, padding_waste, plan_batches, scatter


def web_like_lengths(n: int, seed: int = 0) -> list[int]:
    """T5 token counts shaped like LAION alt-text: median ~12, long tail, capped at 128 (EOS included)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(12), 0.75, n)), 1, 128).astype(int).tolist()


def check_plan(lengths, batches, max_tokens, max_batch_size=None, max_width=None):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for b in batches:
        assert b, "empty batch"
        widths = {pad_width(lengths[i], max_width) for i in b}
        assert len(widths) == 1, f"a batch mixes padded widths {sorted(widths)}"
        assert widths.pop() * len(b) <= max_tokens
        if max_batch_size is not None:
            assert len(b) <= max_batch_size


def test_web_like_distribution_small_waste():
    lengths = web_like_lengths(20_000)
    assert 11 <= np.median(lengths) <= 13 and max(lengths) == 128
    for max_tokens in (2048, 4096, 16384):
        batches = plan_batches(lengths, max_tokens)  # default window: max_tokens captions
        check_plan(lengths, batches, max_tokens)
        waste = padding_waste(lengths, batches)
        assert waste < 0.08, (max_tokens, waste)  # 6.6% (embed/batching.py docstring)
        # Batches stay large: mean padded tokens at least a third of the budget.
        mean_padded = np.mean([pad_width(max(lengths[i] for i in b)) * len(b) for b in batches])
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
    batches = plan_batches(lengths, max_tokens=10)
    # Stable sort: ties keep input order; each batch respects 10 padded tokens (9 pads to 10) and
    # holds one padded width (3 -> 4 and 2 -> 2 may not share a batch; 2 and 1 both pad to 2).
    assert batches == [[1], [3], [6], [4], [0], [5, 2]]


def test_pad_width_depends_on_the_length_alone():
    assert [pad_width(n) for n in (1, 2, 3, 8, 9, 15, 16, 17, 20, 21, 32, 33, 64, 65, 100, 128, 129, 200)] == [
        2, 2, 4, 8, 10, 16, 16, 20, 20, 24, 32, 40, 64, 80, 112, 128, 160, 224]
    widths = [pad_width(n) for n in range(1, 513)]
    assert widths == sorted(widths) and all(w >= n for n, w in zip(range(1, 513), widths))
    # Four widths per octave above 16: no caption of 4+ tokens is padded by a quarter or more.
    assert max((w - n) / w for n, w in zip(range(4, 513), widths[3:])) < 0.25
    assert len({w for w in widths if 16 < w <= 32}) == len({w for w in widths if 128 < w <= 256}) == 4
    # Capped at the encoder's max_length, never below the length itself.
    assert (pad_width(70, 77), pad_width(77, 77), pad_width(12, 77)) == (77, 77, 12)
    with pytest.raises(ValueError, match="above max_width"):
        pad_width(78, 77)
    with pytest.raises(ValueError, match=">= 1"):
        pad_width(0)


def test_batches_never_mix_padded_widths():
    # 4 and 3 both pad to 4: one batch may hold both, as the budget allows.
    assert plan_batches([4] * 6 + [3] * 6, 40) == [list(range(10)), [10, 11]]
    # 5 pads to 6, 4 to 4: split at the change although all six would fit the budget.
    assert plan_batches([5] * 3 + [4] * 3, 40) == [[0, 1, 2], [3, 4, 5]]


def test_each_item_runs_at_its_own_width_whatever_its_batch():
    """Which items share a batch depends on the window, budget, cap and order (in a Beam job, on
    bundle boundaries); the width an item is encoded at must not (embed/batching.py docstring)."""
    lengths = web_like_lengths(3000, seed=6)
    rng = np.random.default_rng(6)
    for max_tokens, max_bs, window in [(4096, None, None), (512, 8, 100), (128, 3, 7), (16384, None, 256)]:
        order = rng.permutation(len(lengths))
        permuted = [lengths[i] for i in order]
        batches = plan_batches(permuted, max_tokens, max_batch_size=max_bs, window=window, max_width=128)
        check_plan(permuted, batches, max_tokens, max_bs, max_width=128)
        for b in batches:
            width = pad_width(max(permuted[i] for i in b), 128)
            assert all(width == pad_width(permuted[i], 128) for i in b)


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
    with pytest.raises(ValueError, match="padded width 64"):
        plan_batches([63], 63)  # 63 pads to 64
    assert plan_batches([63], 63, max_width=63) == [[0]]
    with pytest.raises(ValueError, match=">= 1"):
        plan_batches([0, 3], 64)
    with pytest.raises(ValueError):
        plan_batches([3], 64, max_batch_size=0)
    assert padding_waste([], []) == 0.0
    assert padding_waste([4, 4], [[0, 1]]) == 0.0
    assert padding_waste([4, 2], [[0, 1]]) == pytest.approx(0.25)
    assert padding_waste([3], [[0]]) == pytest.approx(0.25)  # 3 pads to 4
    assert padding_waste([3], [[0]], max_width=3) == 0.0
