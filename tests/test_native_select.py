"""The importance, selection and bias inside the decode graph (native/dysco-track.cpp) against
selection.py, which the spec-worded oracles of test_selection.py check: the same S (up to which of
several equal values at the boundary is kept), the importance to float32 rounding, same tokens."""
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
N_LARGE = 20000
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
def test_graph_selection_picks_what_select_positions_picks(filled, seed, top_p, top_k):
    check_graph_selection(filled, N, np.random.default_rng(seed), seed, top_p, top_k)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_p,top_k", [(0.975, 4096), (0.5, 4096), (0.9, None), (None, 300)])
def test_graph_selection_over_many_positions(filled_large, seed, top_p, top_k):
    check_graph_selection(filled_large, N_LARGE, np.random.default_rng(100 + seed), seed, top_p, top_k)


def assert_same_selection(selected, expected, x):
    """Same size and the same values: they differ at most in which of equal values at the boundary
    they keep (selection.py keeps the lower positions, the graph's sort has no fixed tie order).
    Positions of importance exactly 0 (never attended since the reset) tie with the empty cells in
    the graph: a top-k reaching past the positive values keeps some of them, not all."""
    selected, expected = selected[x[selected] > 0], expected[x[expected] > 0]
    assert selected.size == expected.size
    np.testing.assert_array_equal(np.sort(x[selected]), np.sort(x[expected]))


def check_graph_selection(eng, n, rng, seed, top_p, top_k):
    """The pass at n - 1 selects (fast mode) from an importance over 0..n-2 set from the host."""
    x = (tied_importance(rng, n - 1) if seed % 3 == 0 else random_importance(rng, n - 1, [0.02, 0.3, 5.0][seed % 3]))
    x32 = x.astype(np.float32)  # what the graph holds, summed in float32 as selection.py sums it
    eng.native.importance_reset(n - 1, 0.75, top_p, top_k, 2.0, rng.random(n // 2) < 0.1)
    eng.native.set_importance(x)
    try:
        assert eng.native.fast_select(n - 1)
        eng.decode([4242], n - 1, want_logits=False)
        selected = eng.native.pass_selection(want_selected=True)
    finally:
        eng.native.clear_bias()
        eng.native.set_capture(False)
        eng.truncate(n - 1)
    assert_same_selection(selected, select_positions(x32, top_p, top_k), x32)


def test_importance_fold_matches_numpy(filled):
    """Capture passes fold their scores into the importance in the graph, as the spec's update."""
    eng = filled
    book = ImportanceBuffer(N - 1)
    eng.native.importance_reset(N - 1, 0.75, 0.9, None, 2.0, np.zeros(0, bool))
    eng.native.set_capture(True)
    rng = np.random.default_rng(3)
    try:
        for pos in range(N - 1, N + 7):
            eng.decode([int(rng.integers(100, 30000))], pos, want_logits=False)
            book.update(eng.native.scores(), 0.75)
            np.testing.assert_allclose(eng.native.importance(), book.values, rtol=2e-5, atol=1e-9)
    finally:
        eng.native.set_capture(False)
        eng.truncate(N - 1)


def test_bookkeeping_errors_name_the_offending_value(filled):
    eng, no_template = filled, np.zeros(0, bool)
    with pytest.raises(DyscoValueError, match=r"top_p = 1.5"):
        eng.native.importance_reset(10, 0.75, 1.5, 8, 2.0, no_template)
    eng.native.importance_reset(10, 0.75, 0.9, 8, 2.0, no_template)
    with pytest.raises(DyscoValueError, match=r"value 1 is nan"):
        eng.native.set_importance(np.array([0.5, np.nan]))
    with pytest.raises(DyscoValueError, match=r"pos = 3 of sequence 0 but the importance covers 10 positions"):
        eng.native.probe_select(11, 3)


def one_step(eng, importance, token, in_graph):
    """Position N-1 from the given importance: probe, update, select, biased pass; S, importance,
    logits. In the graphs (dysco_probe_select), or by selection.py from the probe's scores."""
    pos, template = N - 1, np.arange(N // 3) % 7 == 0
    eng.native.importance_reset(pos, 0.75, 0.975, 4096, 2.0, template)
    eng.native.set_importance(importance)
    try:
        if in_graph:
            eng.native.probe_select(token, pos)
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


def test_graph_step_equals_numpy_step(filled):
    importance = random_importance(np.random.default_rng(8), N - 1, 0.3)
    (s_graph, imp_graph, logits_graph) = one_step(filled, importance, 4242, True)
    (s_numpy, imp_numpy, logits_numpy) = one_step(filled, importance, 4242, False)
    assert 0 < s_graph.size < N
    np.testing.assert_allclose(imp_graph, imp_numpy, rtol=2e-5, atol=1e-9)
    assert jaccard(s_graph, s_numpy) >= 0.99
    np.testing.assert_allclose(logits_graph, logits_numpy, rtol=1e-4, atol=1e-4)


def test_pass_selection_errors_say_what_happened(filled):
    eng, pos, no_template = filled, N - 1, np.zeros(0, bool)
    eng.native.importance_reset(pos, 0.75, 0.9, 8, 2.0, no_template)
    with pytest.raises(DyscoError, match="no pass selection is pending"):
        eng.native.pass_selection()
    try:
        # a pass of several tokens does not select
        eng.native.probe_select(11, pos)
        eng.decode([11, 12], pos, want_logits=False)
        with pytest.raises(DyscoError, match=f"position {pos} of sequence 0 did not select"):
            eng.native.pass_selection()
        eng.truncate(pos)
        # clearing the bias disarms it
        eng.native.importance_reset(pos, 0.75, 0.9, 8, 2.0, no_template)
        eng.native.probe_select(11, pos)
        eng.native.clear_bias()
        with pytest.raises(DyscoError, match="no pass selection is pending"):
            eng.native.pass_selection()
    finally:
        eng.native.clear_bias()
        eng.truncate(pos)


def jaccard(a, b) -> float:
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return len(a & b) / max(1, len(a | b))


def assert_same_decoding(tokens, trace, expected_tokens, expected_trace):
    """Same tokens, and at every intervention step the same position, S up to float32 rounding at
    its boundary (Jaccard >= 0.99) and the same most important position."""
    assert tokens == expected_tokens
    assert len(trace) == len(expected_trace) > 20
    for c, n in zip(trace, expected_trace):
        assert c.pos == n.pos
        assert jaccard(c.selected, n.selected) >= 0.99
        assert c.top_positions[0] == n.top_positions[0]
@pytest.mark.slow
@pytest.mark.parametrize("flash", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("strength", [2.0, 99.0], ids=["soft", "hard-mask"])
def test_decoding_in_the_graph_equals_decoding_in_numpy(strength, flash):
    """The graph bookkeeping (probe folds, full pass selects, dysco_probe_select) against the numpy one."""
    config = DyscoConfig(qr_heads=HEADS, top_k=128, top_p=0.9, strength=strength, template_sequences=[[1, 2]])
    variants = ({"bookkeeping": InPassBookkeeping}, {"bookkeeping": HostBookkeeping})
    results = []
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=1024, flash_attn=flash)) as eng:
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
