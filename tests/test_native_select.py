"""The importance and selection kept in the llama context (native/dysco-select.cpp) against
selection.py, which the spec-worded oracles of test_selection.py check: same bits, same S,
same tokens."""
from __future__ import annotations

import numpy as np
import pytest

import models
from dysco_edge.config import DyscoConfig
from dysco_edge.runtime.bookkeeping import HostBookkeeping, InPassBookkeeping
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler
from dysco_edge.runtime.native import DyscoError, DyscoValueError
from dysco_edge.runtime.selection import ImportanceBuffer, bias_vector, select_positions
from test_selection import random_importance, tied_importance

N = 5000  # past selection.py's 4096-value nucleus probe, so both of its branches run
N_LARGE = 20000  # past 8192, where the C selection filters candidates by a sampled floor
HEADS = [(1, 5), (1, 2), (2, 7), (3, 0)]


def filled_context(n):
    """A tiny model's context holding n - 1 positions, with QR heads set."""
    eng = Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=n + 64, n_batch=2048))
    rng = np.random.default_rng(0)
    eng.decode([int(t) for t in rng.integers(100, 30000, size=n - 1)], 0, want_logits=False)
    eng.native.set_heads(HEADS)
    return eng


@pytest.fixture(scope="module")
def filled():
    with filled_context(N) as eng:
        yield eng


@pytest.fixture(scope="module")
def filled_large():
    with filled_context(N_LARGE) as eng:
        yield eng


SELECTIONS = [(0.975, 4096), (0.9, 64), (None, 300), (None, N), (0.5, None), (1.0, None), (0.999, None), (0.3, 1),
              (0.9, N + 10)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("top_p,top_k", SELECTIONS)
def test_select_bias_picks_what_select_positions_picks(filled, seed, top_p, top_k):
    check_select_bias(filled, N, np.random.default_rng(seed), seed, top_p, top_k)


# the hybrid's nucleus smaller than top_k, the nucleus alone, top-k alone, among 20000 positions
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_p,top_k", [(0.975, 4096), (0.5, 4096), (0.2, 64), (0.9, None), (None, 300)])
def test_select_bias_over_sampled_candidates(filled_large, seed, top_p, top_k):
    check_select_bias(filled_large, N_LARGE, np.random.default_rng(100 + seed), seed, top_p, top_k)


def check_select_bias(eng, n, rng, seed, top_p, top_k):
    x = (tied_importance(rng, n) if seed % 3 == 0 else random_importance(rng, n, [0.02, 0.3, 5.0][seed % 3]))
    eng.native.set_importance(x)
    template = rng.random(n // 2) < 0.1
    selected = eng.native.select_bias(n - 1, top_p, top_k, 2.0, template, want_selected=True)
    np.testing.assert_array_equal(selected, select_positions(x, top_p, top_k))
    assert eng.native.select_bias(n - 1, top_p, top_k, 2.0, template) == selected.size
    eng.native.clear_bias()


def test_importance_update_has_numpy_bits(filled):
    eng = filled
    book = ImportanceBuffer(N - 1)
    eng.native.importance_reset(N - 1)
    eng.native.set_capture(True)
    rng = np.random.default_rng(3)
    try:
        for pos in range(N - 1, N + 7):
            eng.decode([int(rng.integers(100, 30000))], pos, want_logits=False)
            assert eng.native.importance_update(0.75) == pos + 1
            book.update(eng.native.scores(), 0.75)
            np.testing.assert_array_equal(eng.native.importance(), book.values)
    finally:
        eng.native.set_capture(False)
        eng.truncate(N - 1)


def test_bookkeeping_errors_name_the_offending_value(filled):
    eng = filled
    eng.native.importance_reset(10)
    with pytest.raises(DyscoError, match=r"pos = 3 but the importance covers 10 positions"):
        eng.native.select_bias(3, 0.9, 8, 2.0, np.zeros(0, bool))
    with pytest.raises(DyscoValueError, match=r"value 1 is nan"):
        eng.native.set_importance(np.array([0.5, np.nan]))
    with pytest.raises(DyscoValueError, match=r"top_p = 1.5"):
        eng.native.select_bias(9, 1.5, 8, 2.0, np.zeros(0, bool))


def one_step(eng, importance, token, in_pass):
    """Position N-1 from the given importance: probe, update, select, biased pass; S, importance,
    logits. In the pass (dysco_probe_select), or by selection.py from the probe's scores."""
    pos, template = N - 1, np.arange(N // 3) % 7 == 0
    eng.native.set_importance(importance)
    try:
        if in_pass:
            eng.native.probe_select(token, pos, 0.75, 0.975, 4096, 2.0, template)
            eng.decode([token], pos)
            return eng.native.pass_selection(want_selected=True), eng.native.importance(), eng.logits()
        eng.native.probe(token, pos)
        book = ImportanceBuffer(pos)
        book.values[:] = importance
        book.update(eng.native.scores(), 0.75)
        selected = select_positions(book.values, 0.975, 4096)
        eng.native.set_bias(bias_vector(selected, pos, 2.0, template))
        eng.decode([token], pos)
        return selected, book.values.copy(), eng.logits()
    finally:
        eng.native.clear_bias()
        eng.truncate(pos)


def test_pass_selection_has_the_bits_of_numpy_bookkeeping(filled):
    importance = random_importance(np.random.default_rng(8), N - 1, 0.3)
    in_pass = one_step(filled, importance, 4242, True)
    numpy_side = one_step(filled, importance, 4242, False)
    assert 0 < in_pass[0].size < N
    for a, b in zip(in_pass, numpy_side):
        np.testing.assert_array_equal(a, b)


def test_pass_selection_errors_say_what_happened(filled):
    eng, pos, no_template = filled, N - 1, np.zeros(0, bool)
    eng.native.importance_reset(pos)
    with pytest.raises(DyscoError, match="no pass selection is pending"):
        eng.native.pass_selection()
    with pytest.raises(DyscoValueError, match=r"pos = 7 but the importance covers 4999 positions"):
        eng.native.probe_select(11, 7, 0.75, 0.9, 8, 2.0, no_template)
    try:
        # a pass whose last token is not the probed one leaves the selection pending
        eng.native.probe_select(11, pos, 0.75, 0.9, 8, 2.0, no_template)
        eng.decode([11, 12], pos, want_logits=False)
        with pytest.raises(DyscoError, match=f"position {pos} of sequence 0 did not select: it has not run"):
            eng.native.pass_selection()
        eng.truncate(pos)
        # a scoring pass in between would overwrite the probe's mask rows
        eng.native.probe_select(11, pos, 0.75, 0.9, 8, 2.0, no_template)
        eng.native.set_capture(True)
        eng.decode([11, 12], pos, want_logits=False)
        with pytest.raises(DyscoError, match=f"a scoring pass ran between the probe at position {pos}"):
            eng.native.pass_selection()
        eng.truncate(pos)
        eng.native.set_capture(False)
        # clearing the bias disarms it
        eng.native.probe_select(11, pos, 0.75, 0.9, 8, 2.0, no_template)
        eng.native.clear_bias()
        with pytest.raises(DyscoError, match="no pass selection is pending"):
            eng.native.pass_selection()
    finally:
        eng.native.set_capture(False)
        eng.native.clear_bias()
        eng.truncate(pos)


def assert_same_decoding(tokens, trace, expected_tokens, expected_trace):
    """Same tokens, and at every intervention step the same position, S and top positions."""
    assert tokens == expected_tokens
    assert len(trace) == len(expected_trace) > 20
    for c, n in zip(trace, expected_trace):
        assert c.pos == n.pos
        np.testing.assert_array_equal(c.selected, n.selected)
        np.testing.assert_array_equal(c.top_positions, n.top_positions)


@pytest.mark.slow
@pytest.mark.parametrize("strength", [2.0, 99.0], ids=["soft", "hard-mask"])
def test_decoding_in_context_equals_decoding_in_numpy(strength):
    """The in-pass bookkeeping (the full pass selecting, dysco_probe_select) against the numpy one."""
    config = DyscoConfig(qr_heads=HEADS, top_k=128, top_p=0.9, strength=strength, template_sequences=[[1, 2]])
    variants = ({"bookkeeping": InPassBookkeeping}, {"bookkeeping": HostBookkeeping})
    results = []
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=1024)) as eng:
        prompt = [int(t) for t in np.random.default_rng(5).integers(100, 30000, size=700)]
        for variant in variants:
            eng.clear()
            trace = []
            tokens = list(dysco_tokens(eng, prompt, config, plan_warmups(len(prompt), 8, 4), reuse=0,
                                       sampler=Sampler(), max_new_tokens=24, is_end=lambda t: False,
                                       trace=trace, **variant))
            results.append((tokens, trace))
    tokens_np, trace_np = results[-1]
    for tokens_c, trace_c in results[:-1]:
        assert_same_decoding(tokens_c, trace_c, tokens_np, trace_np)
