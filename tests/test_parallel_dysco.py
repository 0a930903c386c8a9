"""DySCO per sequence in one decode batch (native/dysco-track.cpp on a context whose sequences have a
KV stream each), on SmolLM2-135M and the catalog's Qwen2.5-Coder-1.5B with their shipped QR heads:
fast mode, and exact mode with the probes of both sequences in one probe decode
(dysco_probe_select_batch).

Oracle: the same sequence decoded alone on a context of one sequence (importance, selected set and
logits step by step), while another sequence, with a document of a different length (so the batch's
KV window is wider than its own), decodes in the same ubatches: tracked too, or plain. Each prompt is
prefilled in a decode of its own: on Qwen's Q4_K weights the CPU's repacked kernels round a row
differently in a block of 4 rows than alone, so prompts prefilled together (or 4 sequences decoding
together) differ from alone already without DySCO; two one-token rows stay exact.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import models
from dysco_edge.heads.maps import shipped_head_map_file
from dysco_edge.models import resolve
from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.runtime.node_placement import node_part

MODELS = {"smollm2": (models.smollm2_q4_1, "smollm2-135m-instruct"),
          "qwen": (lambda: resolve("qwen2.5-coder-1.5b"), "qwen2.5-coder-1.5b-instruct")}
N_CTX = 768
ENGINE = {}   # more EngineOptions (bench/device/check_parallel.py: the same cases on a GPU)
WARM = 3      # context warmup passes
STEPS = 12    # fast steps, teacher-forced


def _doc(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(200, 40000, size=n)]


# prefixes of 100, 300 and 200 tokens (the third only in three-sequence cases)
DOCS = {0: _doc(1, 100 + WARM + STEPS), 1: _doc(2, 300 + WARM + STEPS), 2: _doc(3, 200 + WARM + STEPS)}
# "fast2": fast with another decay and selection, so that its sequence folds and selects apart from
# fast ones beside it (the graph runs a sequence's ops together with its neighbours' only when equal)
VARIANTS = {"fast2": ("fast", dict(decay=0.5, top_p=0.9, top_k=None, strength=3.0))}


def _config(cfg, mode: str):
    """The engine mode and DySCO config of a case's mode name."""
    engine_mode, changes = VARIANTS.get(mode, (mode, {}))
    return engine_mode, dataclasses.replace(cfg, **changes)


def _reset(native, cfg, prefix: int, seq_id: int) -> None:
    template = np.zeros(prefix, dtype=bool)
    template[3:6] = True  # a few template positions: the soft bias must leave them alone in each row
    native.importance_reset(prefix, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, template, seq_id=seq_id)


def _arm_alone(native, token: int, pos: int, mode: str) -> None:
    if mode == "fast":
        assert native.fast_select(pos)
    else:
        native.probe_select(token, pos)


def _alone(path, cfg, doc: list[int], mode) -> list[tuple]:
    """(S, importance, logits) of each DySCO step of `doc` decoded alone; plain: (None, None, logits)."""
    tracked = mode is not None
    if tracked:
        mode, cfg = _config(cfg, mode)
    prefix = len(doc) - WARM - STEPS
    with Engine(path, EngineOptions(n_ctx=N_CTX, **ENGINE)) as eng:
        eng.decode(doc[:prefix], 0, want_logits=False)
        eng.native.set_heads(cfg.qr_heads)
        if tracked:
            _reset(eng.native, cfg, prefix, 0)
            eng.native.set_capture(True)
        for pos in range(prefix, prefix + WARM):
            eng.decode([doc[pos]], pos, want_logits=False)
        eng.native.set_capture(False)
        out = []
        for pos in range(prefix + WARM, len(doc)):
            if tracked:
                _arm_alone(eng.native, doc[pos], pos, mode)
            eng.decode([doc[pos]], pos)
            out.append((eng.native.pass_selection(want_selected=True), eng.native.importance(), eng.logits())
                       if tracked else (None, None, eng.logits()))
        return out


def _arm_together(native, mode: dict, step: dict) -> None:
    """Fast sequences arm their pass; exact ones probe, all in one probe decode."""
    probes = []
    for s, (token, pos) in step.items():
        if VARIANTS.get(mode[s], (mode[s],))[0] == "fast":
            assert native.fast_select(pos, s)
        elif mode[s] == "exact":
            probes.append((token, pos, s))
    if probes:
        native.probe_select_batch(probes)


def _together(path, cfg, mode: dict, placement: list | None = None) -> dict[int, list[tuple]]:
    """The same steps of the case's documents, each step one decode_batch of all its sequences.
    `placement`: gets the placement log of the DySCO nodes the graphs ran."""
    tracked = {s: m is not None for s, m in mode.items()}
    docs = {s: DOCS[s] for s in mode}
    with Engine(path, EngineOptions(n_ctx=N_CTX, n_seq_max=len(docs), **ENGINE)) as eng:
        eng.native.set_placement_log(placement is not None)
        prefix = {s: len(d) - WARM - STEPS for s, d in docs.items()}
        for s in docs:
            assert eng.decode_batch([(docs[s][:prefix[s]], 0, s, False)]) == 0
        eng.native.set_heads(cfg.qr_heads)
        for s in (s for s in docs if tracked[s]):
            _reset(eng.native, _config(cfg, mode[s])[1], prefix[s], s)
            eng.native.set_seq_capture(s, True)
        for k in range(WARM):
            assert eng.decode_batch([([docs[s][prefix[s] + k]], prefix[s] + k, s, False) for s in docs]) == 0
        out = {s: [] for s in docs}
        for k in range(WARM, WARM + STEPS):
            for s in (s for s in docs if tracked[s]):
                eng.native.set_seq_capture(s, False)  # fast_select turns it on for its own pass
            _arm_together(eng.native, mode, {s: (docs[s][prefix[s] + k], prefix[s] + k) for s in docs})
            assert eng.decode_batch([([docs[s][prefix[s] + k]], prefix[s] + k, s, True) for s in docs]) == 0
            for i, s in enumerate(docs):
                logits = eng.logits(i)
                out[s].append((eng.native.pass_selection(want_selected=True, seq_id=s), eng.native.importance(s), logits)
                              if tracked[s] else (None, None, logits))
        if placement is not None:
            placement += eng.native.placement()
        return out


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want) == STEPS
    for (s1, imp1, lg1), (s2, imp2, lg2) in zip(got, want):
        if s2 is not None:
            np.testing.assert_array_equal(s1, s2)
            np.testing.assert_allclose(imp1, imp2, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(lg1, lg2)


CASES = [("smollm2", {0: "fast", 1: "fast"}), ("smollm2", {0: "fast", 1: None}), ("smollm2", {0: None, 1: "fast"}),
         ("smollm2", {0: "exact", 1: "exact"}), ("smollm2", {0: "exact", 1: "fast"}), ("smollm2", {0: None, 1: "exact"}),
         ("qwen", {0: "fast", 1: "exact"}), ("qwen", {0: None, 1: "fast"}),
         # three streams: a run of two sequences folding and selecting together beside one that differs,
         # and two sequences apart on either side of a plain one
         ("smollm2", {0: "fast", 1: "fast", 2: "fast2"}), ("smollm2", {0: "fast", 1: None, 2: "fast"})]


@pytest.mark.slow
@pytest.mark.parametrize("model,mode", CASES)
def test_each_sequence_tracks_as_alone_while_the_other_shares_its_ubatches(model, mode):
    path_of, head_map = MODELS[model]
    path, cfg = path_of(), shipped_head_map_file(head_map).to_config()
    together = _together(path, cfg, mode)
    for s, doc in ((s, DOCS[s]) for s in mode):
        _assert_same(together[s], _alone(path, cfg, doc, mode[s]))


@pytest.mark.slow
def test_a_batch_names_and_places_every_part_as_a_single_stream_does():
    """The nodes DySCO adds to a graph of several KV streams are named after their part and layer
    (native/dysco-placement.cpp), the fold's too: `dysco-edge devices --check` and DYSCO_SCHED_REPORT see
    them (before, a batch's fold showed only its last copy)."""
    path, cfg = models.smollm2_q4_1(), shipped_head_map_file("smollm2-135m-instruct").to_config()
    nodes = []
    _together(path, cfg, {0: "fast", 1: "fast"}, nodes)
    by_part = {}
    for n in nodes:
        by_part.setdefault(node_part(n.name), set()).add((n.op, n.layer))
    l_max = max(layer for layer, _ in cfg.qr_heads)
    assert {("DIV", l_max), ("SUM_ROWS", l_max), ("STEP", l_max), ("CPY", l_max)} <= by_part["fold"]
    assert {"ARGSORT", "CUMSUM", "SET_ROWS"} <= {op for op, _ in by_part["selection and bias"]}
    assert {("SOFT_MAX", layer) for layer, _ in cfg.qr_heads} <= by_part["scores"]
