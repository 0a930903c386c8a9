"""selection.py against plainly written oracles that follow DYSCO_SPEC.md word for word."""

import math
import time

import numpy as np
import pytest

from dysco_edge.runtime.selection import (
    ImportanceBuffer,
    bias_vector,
    select_nucleus,
    select_positions,
    select_top_k,
    template_mask,
    update_importance,
)

# ---- oracles: explicit loops, the spec's words, the documented tie rule ----


def ranked(values):
    """Positions by descending value, lower position first among equal values."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def nucleus_oracle(values, top_p, accumulate=float):
    kept, total = [], accumulate(0)
    for rank, i in enumerate(ranked(values)):
        total = accumulate(total + accumulate(values[i]))
        if rank == 0 or total <= top_p:
            kept.append(i)
        else:
            break
    return sorted(kept)


def top_k_oracle(values, k):
    return sorted(ranked(values)[: min(k, len(values))])


def selection_oracle(values, top_p, top_k):
    if top_p is None:
        return top_k_oracle(values, top_k)
    nucleus = nucleus_oracle(values, top_p)
    if top_k is not None and len(nucleus) > top_k:
        return top_k_oracle(values, top_k)
    return nucleus


def template_oracle(tokens, sequences):
    mask = [False] * len(tokens)
    for seq in sequences:
        for start in range(len(tokens) - len(seq) + 1):
            if seq and list(tokens[start : start + len(seq)]) == list(seq):
                for j in range(start, start + len(seq)):
                    mask[j] = True
    return mask


def random_importance(rng, n, alpha):
    return rng.dirichlet(np.full(n, alpha))


def tied_importance(rng, n, levels=4):
    """Few distinct values (zeros included): many exact ties everywhere."""
    counts = rng.integers(0, levels, size=n).astype(np.float64)
    counts[0] = max(counts[0], 1.0)  # not all zero
    return counts / counts.sum()


# ---- update ----


def test_update_matches_hand_computation():
    importance = np.array([0.5, 0.5])
    attn = np.array([0.2, 0.3, 0.5])
    # a[:-1] += 0.75 * I -> [0.575, 0.675, 0.5], sum 1.75
    expected = np.array([0.575, 0.675, 0.5]) / 1.75
    updated = update_importance(importance, attn, 0.75)
    np.testing.assert_allclose(updated, expected, rtol=0, atol=1e-15)
    assert updated.dtype == np.float64
    assert math.isclose(updated.sum(), 1.0, abs_tol=1e-15)
    np.testing.assert_array_equal(attn, [0.2, 0.3, 0.5])  # inputs untouched
    np.testing.assert_array_equal(importance, [0.5, 0.5])


def test_update_from_empty_and_zero_importance():
    np.testing.assert_array_equal(update_importance(np.zeros(0), np.array([1.0]), 0.75), [1.0])
    attn = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(update_importance(np.zeros(3), attn, 0.75), attn)


def test_update_sequence_matches_loop():
    rng = np.random.default_rng(1)
    importance = np.zeros(5)
    for step in range(6):
        attn = random_importance(rng, importance.size + 1, 0.5)
        expected = [a + 0.5 * i for a, i in zip(attn[:-1], importance)] + [attn[-1]]
        total = sum(expected)
        importance = update_importance(importance, attn, 0.5)
        np.testing.assert_allclose(importance, [e / total for e in expected], rtol=1e-14)


def test_update_refuses_wrong_length_and_zero_mass():
    with pytest.raises(ValueError, match=r"attn: expected 4 entries"):
        update_importance(np.zeros(3), np.ones(3), 0.75)
    with pytest.raises(ValueError, match=r"attn: the updated scores sum to 0"):
        update_importance(np.zeros(2), np.zeros(3), 0.75)


def test_importance_buffer_gives_the_same_bits_as_update_importance():
    rng = np.random.default_rng(7)
    buffer = ImportanceBuffer(3, capacity=4)  # grows twice on the way
    importance = np.zeros(3)
    for step in range(40):
        attn = random_importance(rng, importance.size + 1, 0.3).astype(np.float32)
        importance = update_importance(importance, attn, 0.75)
        buffer.update(attn, 0.75)
        np.testing.assert_array_equal(buffer.values, importance)


def test_importance_buffer_refuses_wrong_length_and_zero_mass():
    buffer = ImportanceBuffer(3)
    with pytest.raises(ValueError, match=r"attn: expected 4 entries"):
        buffer.update(np.ones(3), 0.75)
    with pytest.raises(ValueError, match=r"attn: the updated scores sum to 0"):
        buffer.update(np.zeros(4), 0.75)


# ---- selection ----


@pytest.mark.parametrize("seed", range(40))
def test_selection_matches_oracle_on_random_vectors(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    values = random_importance(rng, n, float(rng.choice([0.02, 0.2, 1.0, 5.0])))
    top_p = float(rng.choice([0.3, 0.9, 0.975, 1.0]))
    top_k = int(rng.choice([1, 7, 64, 4096]))
    as_list = values.tolist()
    assert select_nucleus(values, top_p).tolist() == nucleus_oracle(as_list, top_p)
    assert select_top_k(values, top_k).tolist() == top_k_oracle(as_list, top_k)
    assert select_positions(values, top_p, top_k).tolist() == selection_oracle(as_list, top_p, top_k)
    assert select_positions(values, None, top_k).tolist() == top_k_oracle(as_list, top_k)
    assert select_positions(values, top_p, None).tolist() == nucleus_oracle(as_list, top_p)


@pytest.mark.parametrize("seed", range(20))
def test_selection_with_exact_ties_prefers_lower_positions(seed):
    rng = np.random.default_rng(100 + seed)
    values = tied_importance(rng, int(rng.integers(1, 400)))
    as_list = values.tolist()
    for top_p in (0.1, 0.5, 0.975, 1.0):
        for top_k in (None, 1, 5, 50):
            assert select_positions(values, top_p, top_k).tolist() == selection_oracle(as_list, top_p, top_k)
        assert select_top_k(values, 3).tolist() == top_k_oracle(as_list, 3)


def test_tie_rule_on_a_small_example():
    values = np.array([0.1, 0.3, 0.1, 0.3, 0.2])
    assert select_top_k(values, 1).tolist() == [1]
    assert select_top_k(values, 3).tolist() == [1, 3, 4]
    assert select_top_k(values, 4).tolist() == [0, 1, 3, 4]
    # cumulative 0.3, 0.6, 0.8, 0.9, 1.0 -> top_p 0.85 keeps three
    assert select_nucleus(values, 0.85).tolist() == [1, 3, 4]


def test_one_position_and_empty_vector():
    assert select_nucleus(np.array([1.0]), 0.5).tolist() == [0]
    assert select_top_k(np.array([1.0]), 4096).tolist() == [0]
    assert select_positions(np.array([1.0]), 0.975, 4096).tolist() == [0]
    assert select_positions(np.zeros(0), 0.975, 4096).tolist() == []


def test_first_is_always_kept():
    values = np.array([0.05, 0.9, 0.05])
    assert select_nucleus(values, 0.5).tolist() == [1]
    assert select_positions(values, 0.01, 2).tolist() == [1]


def test_top_p_one_and_top_k_beyond_context():
    values = np.array([0.25, 0.25, 0.5])  # sums exactly to 1
    assert select_nucleus(values, 1.0).tolist() == [0, 1, 2]
    assert select_top_k(values, 10).tolist() == [0, 1, 2]
    assert select_positions(values, 1.0, 10).tolist() == [0, 1, 2]


def test_hybrid_caps_a_large_nucleus_at_top_k():
    values = np.full(100, 0.01)
    values[[10, 20, 30]] = [0.2, 0.15, 0.1]
    values /= values.sum()
    assert len(select_nucleus(values, 0.975)) > 5
    assert select_positions(values, 0.975, 5).tolist() == top_k_oracle(values.tolist(), 5)
    # a nucleus no larger than top_k is kept as is
    assert select_positions(values, 0.3, 50).tolist() == nucleus_oracle(values.tolist(), 0.3)


@pytest.mark.parametrize("alpha", [0.01, 50.0])
def test_nucleus_on_long_vectors_both_paths(alpha):
    # alpha 0.01: the nucleus ends within the first probe; 50: it needs the full sort.
    rng = np.random.default_rng(7)
    values = random_importance(rng, 20000, alpha)
    assert select_nucleus(values, 0.975).tolist() == nucleus_oracle(values.tolist(), 0.975)
    assert select_positions(values, 0.975, 4096).tolist() == selection_oracle(values.tolist(), 0.975, 4096)


def test_float32_input_selects_in_float32():
    rng = np.random.default_rng(3)
    values = random_importance(rng, 500, 0.3).astype(np.float32)
    expected = nucleus_oracle(values.tolist(), np.float32(0.9), accumulate=np.float32)
    assert select_nucleus(values, 0.9).tolist() == expected


def test_selection_returns_sorted_int64():
    rng = np.random.default_rng(5)
    out = select_positions(random_importance(rng, 1000, 0.1), 0.975, 100)
    assert out.dtype == np.int64
    assert np.all(np.diff(out) > 0)


def test_selection_refuses_bad_arguments():
    values = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="top_p/top_k"):
        select_positions(values, None, None)
    with pytest.raises(ValueError, match="top_p"):
        select_nucleus(values, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        select_top_k(values, 0)
    with pytest.raises(ValueError, match="importance"):
        select_top_k(np.array([0.5, np.nan]), 1)
    with pytest.raises(ValueError, match="importance"):
        select_nucleus(np.array([0.5, -0.1]), 0.9)


def median_ms(function, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def test_selection_time_on_131072_positions():
    rng = np.random.default_rng(11)
    values = random_importance(rng, 131072, 0.1)
    select_positions(values, 0.975, 4096)  # warm up
    elapsed = median_ms(lambda: select_positions(values, 0.975, 4096), runs=21)
    assert elapsed <= 4.0, f"select_positions took {elapsed:.2f} ms (median) on 131072 positions"


# ---- template mask ----


@pytest.mark.parametrize("seed", range(10))
def test_template_mask_matches_naive_loop(seed):
    rng = np.random.default_rng(200 + seed)
    tokens = rng.integers(0, 4, size=int(rng.integers(0, 300)))
    sequences = [[1, 1], [2, 3, 2], [0], [3, 3, 3, 3], []]
    assert template_mask(tokens, sequences).tolist() == template_oracle(tokens.tolist(), sequences)


def test_template_mask_overlaps_and_edges():
    assert template_mask([5, 5, 5], [[5, 5]]).tolist() == [True, True, True]
    assert template_mask([1, 2, 3], [[1, 2, 3, 4]]).tolist() == [False, False, False]
    assert template_mask([1, 2, 3], []).tolist() == [False, False, False]
    assert template_mask([], [[1]]).tolist() == []
    assert template_mask([7, 1, 2, 7, 1], [(7, 1)]).tolist() == [True, True, False, True, True]


def test_template_mask_on_128k_tokens_is_fast():
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, 200, size=131072)
    sequences = [[1, 9690, 198], [1, 4093, 198], [1, 520, 9531, 198], [198]]
    elapsed = median_ms(lambda: template_mask(tokens, sequences), runs=5)
    assert elapsed <= 50.0, f"template_mask took {elapsed:.1f} ms on 131072 tokens"


# ---- bias vector ----


def test_soft_bias_removes_template_and_boosts_current():
    template = np.array([True, False, False, True, False])  # prompt of 5 tokens
    bias = bias_vector(np.array([0, 2, 3]), 6, 2.0, template)
    log2 = np.float32(math.log(2.0))
    assert bias.dtype == np.float32
    assert bias.tolist() == [0.0, 0.0, log2, 0.0, 0.0, 0.0, log2]


def test_soft_bias_current_position_always_boosted_even_if_template():
    template = np.array([False, False, True])
    bias = bias_vector(np.array([0, 2]), 2, 3.0, template)
    log3 = np.float32(math.log(3.0))
    assert bias.tolist() == [log3, 0.0, log3]


def test_soft_bias_without_template():
    bias = bias_vector([1], 3, 2.0)
    log2 = np.float32(math.log(2.0))
    assert bias.tolist() == [0.0, log2, 0.0, log2]


def test_hard_mask_keeps_template_positions():
    template = np.array([True, True, False, False])
    bias = bias_vector(np.array([0, 2]), 4, 99.0, template)
    assert bias.tolist() == [0.0, -np.inf, 0.0, -np.inf, 0.0]


def test_bias_refuses_positions_outside_the_context():
    with pytest.raises(ValueError, match="selected"):
        bias_vector(np.array([5]), 3, 2.0)
    with pytest.raises(ValueError, match="current_pos"):
        bias_vector(np.array([0]), -1, 2.0)
    with pytest.raises(ValueError, match="strength"):
        bias_vector(np.array([0]), 1, 0.0)
