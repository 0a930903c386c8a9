"""The importance and selection kept in the llama context (native/dysco-select.cpp) against
selection.py, which the spec-worded oracles of test_selection.py check: same bits, same S,
same tokens."""
from __future__ import annotations

import numpy as np
import pytest

import models
from dysco_edge.config import DyscoConfig
from dysco_edge.decode import dysco_tokens, plan_warmups
from dysco_edge.engine import Engine, EngineOptions
from dysco_edge.native import DyscoError, DyscoValueError
from dysco_edge.sampling import Sampler
from dysco_edge.selection import ImportanceBuffer, select_positions
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


@pytest.mark.slow
@pytest.mark.parametrize("strength", [2.0, 99.0], ids=["soft", "hard-mask"])
def test_decoding_in_context_equals_decoding_in_numpy(strength):
    config = DyscoConfig(qr_heads=HEADS, top_k=128, top_p=0.9, strength=strength, template_sequences=[[1, 2]])
    results = []
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=1024)) as eng:
        prompt = [int(t) for t in np.random.default_rng(5).integers(100, 30000, size=700)]
        for in_context in (True, False):
            eng.clear()
            trace = []
            tokens = list(dysco_tokens(eng, prompt, config, plan_warmups(len(prompt), 8, 4), reuse=0,
                                       sampler=Sampler(), max_new_tokens=24, is_end=lambda t: False,
                                       trace=trace, in_context=in_context))
            results.append((tokens, trace))
    (tokens_c, trace_c), (tokens_np, trace_np) = results
    assert tokens_c == tokens_np
    assert len(trace_c) == len(trace_np) > 20
    for c, n in zip(trace_c, trace_np):
        assert c.pos == n.pos
        np.testing.assert_array_equal(c.selected, n.selected)
        np.testing.assert_array_equal(c.top_positions, n.top_positions)
