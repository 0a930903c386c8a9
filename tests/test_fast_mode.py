"""Fast DySCO (mode "fast": no probe; each full pass's QR-head scores select for the next token)
in the pass (dysco_fast_select) against the same procedure done on the host with selection.py:
same tokens, same S at every step, same importance."""
from __future__ import annotations

import numpy as np
import pytest

import models
from dysco_edge.config import DyscoConfig
from dysco_edge.errors import ConfigError
from dysco_edge.runtime.bookkeeping import FastBookkeeping, HostBookkeeping, default_bookkeeping
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler
from dysco_edge.runtime.selection import bias_vector, select_positions
from test_native_select import assert_same_decoding

HEADS = ((1, 5), (1, 2), (2, 7), (3, 0))


class FastOnTheHost(HostBookkeeping):
    """The oracle: fast mode written out with numpy and the plain C calls (capture, set_bias,
    scores): select from the importance over 0..pos-1, bias the pass, fold its scores after it.
    The first step with nothing scored before it probes, as the spec's step does."""

    def before_pass(self, native, token: int, pos: int) -> None:
        if not self.scores.values.any():  # only a reset's zeros: nothing has scored yet
            native.probe(token, pos)
            self.observe(native)
        selected = select_positions(self.scores.values, self.config.top_p, self.config.top_k)
        native.set_capture(True)
        native.set_bias(bias_vector(selected, pos, self.config.strength, self.template))
        self.record(pos, selected, self.scores.values)

    def after_pass(self, native, pos: int) -> None:
        if self.scores.values.size == pos:  # not yet folded: this pass scored 0..pos
            self.observe(native)


def _generate(eng, prompt, config, warm, strategy):
    eng.clear()
    trace = []
    tokens = list(dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=Sampler(), max_new_tokens=24,
                               is_end=lambda t: False, trace=trace, bookkeeping=strategy))
    eng.native.set_capture(False)
    return tokens, trace


@pytest.mark.slow
@pytest.mark.parametrize("strength, context_warmup", [(2.0, 8), (99.0, 8), (2.0, 0)],
                         ids=["soft", "hard-mask", "no-context-warmup"])
def test_fast_in_the_pass_equals_fast_on_the_host(strength, context_warmup):
    config = DyscoConfig(qr_heads=HEADS, top_k=128, top_p=0.9, strength=strength, template_sequences=[[1, 2]],
                         context_warmup=context_warmup, mode="fast")
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=1024)) as eng:
        prompt = [int(t) for t in np.random.default_rng(7).integers(100, 30000, size=700)]
        warm = plan_warmups(len(prompt), context_warmup, 4)
        native_tokens, native_trace = _generate(eng, prompt, config, warm, FastBookkeeping)
        host_tokens, host_trace = _generate(eng, prompt, config, warm, FastOnTheHost)
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
    assert DyscoConfig.from_dict({"qr_heads": [[1, 5]], "mode": "fast"}).mode == "fast"
