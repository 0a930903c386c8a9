"""Ending an answer that repeats itself (`stop_on_repeat`, `run --stop-on-repeat`).

Oracles: a brute-force search for the longest repeated suffix, and the same greedy generation
without the guard (the guarded answer must be its prefix, cut where the repetition starts)."""
from __future__ import annotations

import random

import pytest

from dysco_edge.runtime.generation import RepeatWatch


def _longest_repeated_suffix(ids: list[int], cap: int) -> int:
    """The longest suffix of ids (at most cap) that also ends somewhere earlier in ids."""
    best = 0
    for m in range(1, min(cap, len(ids) - 1) + 1):
        suffix = ids[-m:]
        if any(ids[e - m + 1:e + 1] == suffix for e in range(m - 1, len(ids) - 1)):
            best = m
    return best


@pytest.mark.parametrize("vocab", [2, 3, 8])
def test_the_held_suffix_is_the_longest_repeated_one(vocab):
    rng = random.Random(vocab)
    for trial in range(40):
        watch, ids, cap = RepeatWatch(6), [], 6
        for _ in range(60):
            token = rng.randrange(vocab)
            ids.append(token)
            shown = watch.push(token, text_length=len(ids) * 2)  # two characters a token
            expected = _longest_repeated_suffix(ids, cap)
            assert shown == (len(ids) - expected) * 2
            assert watch.looped == (expected >= cap)
            if watch.looped:
                break


def test_a_loop_is_cut_where_its_repetition_starts():
    watch = RepeatWatch(4)
    answer = [7, 8, 9] + [1, 2, 3, 4, 5] * 3
    for i, token in enumerate(answer):
        shown = watch.push(token, i + 1)
        if watch.looped:
            break
    assert watch.looped and i == 3 + 5 + 4 - 1  # the fourth token of the second period
    assert shown == 3 + 5  # the text up to the first period's end


def test_zero_is_off():
    watch = RepeatWatch(0)
    for i in range(50):
        assert watch.push(1, i + 1) == i + 1 and not watch.looped


@pytest.mark.slow
def test_a_looping_greedy_answer_ends_where_it_starts_to_repeat():
    import models
    from dysco_edge import Model
    with Model(models.smollm2_q4_1(), n_ctx=512) as model:
        ids = model.tokenize("Say it again and again: I like green tea. I like green tea. I like green tea.",
                             add_bos=True)
        free = model.generate(token_ids=ids, dysco=None, max_new_tokens=96)
        cut = model.generate(token_ids=ids, dysco=None, max_new_tokens=96, stop_on_repeat=16)
        n = len(cut.token_ids)
        kept = model.detokenize(cut.token_ids[:n - 16])  # the text before the repeated stretch
    assert free.finish_reason == "length" and cut.finish_reason == "repeat"
    assert cut.token_ids == free.token_ids[:n] and n < len(free.token_ids)  # the same tokens, fewer of them
    assert _longest_repeated_suffix(cut.token_ids, 16) == 16  # it stopped on a verbatim repetition...
    assert _longest_repeated_suffix(cut.token_ids[:-1], 16) < 16  # ...the first one
    assert cut.text == kept and free.text.startswith(kept)
