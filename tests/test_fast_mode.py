"""Fast DySCO (mode "fast": no probe; each full pass's QR-head scores select for the next token)
in the graph (dysco_fast_select) against the same procedure done on the host with selection.py
(FastHostBookkeeping): same tokens, the same S at every step up to float32 rounding."""
from __future__ import annotations

import numpy as np
import pytest

import models
from dysco_edge.config import DyscoConfig
from dysco_edge.errors import ConfigError
from dysco_edge.runtime.bookkeeping import FastBookkeeping, FastHostBookkeeping, default_bookkeeping
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler
from test_native_select import assert_same_decoding

HEADS = ((1, 5), (1, 2), (2, 7), (3, 0))


def _generate(eng, prompt, config, warm, strategy):
    eng.clear()
    trace = []
    tokens = list(dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=Sampler(), max_new_tokens=24,
                               is_end=lambda t: False, trace=trace, bookkeeping=strategy))
    eng.native.set_capture(False)
    return tokens, trace


@pytest.mark.slow
@pytest.mark.parametrize("flash", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("strength, context_warmup", [(2.0, 8), (99.0, 8), (2.0, 0)],
                         ids=["soft", "hard-mask", "no-context-warmup"])
def test_fast_in_the_graph_equals_fast_on_the_host(strength, context_warmup, flash):
    config = DyscoConfig(qr_heads=HEADS, top_k=128, top_p=0.9, strength=strength, template_sequences=[[1, 2]],
                         context_warmup=context_warmup, mode="fast")
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=1024, flash_attn=flash)) as eng:
        prompt = [int(t) for t in np.random.default_rng(7).integers(100, 30000, size=700)]
        warm = plan_warmups(len(prompt), context_warmup, 4)
        native_tokens, native_trace = _generate(eng, prompt, config, warm, FastBookkeeping)
        host_tokens, host_trace = _generate(eng, prompt, config, warm, FastHostBookkeeping)
        exact_tokens, exact_trace = _generate(eng, prompt, config.replace(mode="exact"), warm, None)
    assert_same_decoding(native_tokens, native_trace, host_tokens, host_trace)
    # fast selects from one position fewer than exact, from queries that saw the bias: not the same S
    assert any(not np.array_equal(f.selected, e.selected) for f, e in zip(native_trace, exact_trace))


def test_fast_is_dynamic_only_and_picks_its_strategy():
    with pytest.raises(ConfigError, match="mode: 'fast'"):
        DyscoConfig(qr_heads=HEADS, mode="fast", dynamic=False)
    with pytest.raises(ConfigError, match="mode: expected 'exact' or 'fast'"):
        DyscoConfig(qr_heads=HEADS, mode="quick")
    assert default_bookkeeping(DyscoConfig(qr_heads=HEADS, mode="fast")) is FastBookkeeping
    assert default_bookkeeping(DyscoConfig(qr_heads=HEADS, mode="fast"), in_graph=False) is FastHostBookkeeping
    assert DyscoConfig.from_dict({"qr_heads": [[1, 5]], "mode": "fast"}).mode == "fast"
