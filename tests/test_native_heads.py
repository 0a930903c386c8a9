"""The native all-heads capture (QR-head detection) and the attention logit scale (AttnTS)
against transformers, eager attention, on the same F32 weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
import oracle
from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.runtime.native import DyscoError, DyscoValueError

import llama_cpp

F32 = llama_cpp.GGML_TYPE_F32
# a multi-token FA batch also rounds its queries to F16, so the captured rows drift further
CAPTURE_TOL = {False: 1e-4, True: 2e-3}


def _engine(path, *, flash_attn=False, n_ctx=2048, n_batch=512):
    return Engine(path, EngineOptions(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn,
                                      type_k=F32, type_v=F32))


def _ids(engine, n, seed=0):
    rng = np.random.default_rng(seed)
    text = engine.tokenize("The ferry to the north island leaves at noon; the ferry to the south island at six. " * 12, add_bos=True)
    extra = rng.integers(100, min(engine.n_vocab, 30000), size=max(0, n - len(text)))
    return [int(t) for t in list(text[:n]) + list(extra)]


def _hf_rows_mean(path, ids, rows):
    """[L, H, rows.stop] mean attention of query rows `rows` over positions 0..rows.stop-1."""
    model = oracle.load_hf(path)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:rows.stop]]), output_attentions=True, use_cache=False)
    return np.stack([a[0, :, rows.start:rows.stop, :].double().mean(dim=1).numpy() for a in out.attentions])


def _capture(eng, ids, rows, *, layer_end=None, chunks=1):
    eng.decode(ids[:rows.start], 0, want_logits=False)
    eng.native.set_head_capture(rows.start, rows.stop, layer_end)
    bounds = np.linspace(rows.start, rows.stop, chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        eng.decode(ids[a:b], int(a), want_logits=False)
    return eng.native.head_scores()


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_head_capture_equals_transformers(f32_model, flash_attn):
    _, path = f32_model
    rows = range(260, 290)
    with _engine(path, flash_attn=flash_attn) as eng:
        ids = _ids(eng, rows.stop)
        got = _capture(eng, ids, rows)
    expected = _hf_rows_mean(path, ids, rows)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < CAPTURE_TOL[flash_attn]


@pytest.mark.slow
def test_head_capture_sums_across_ubatches_and_caps_layers():
    path = models.tiny_qwen3_f32()  # GQA: query heads share KV heads
    rows = range(100, 164)
    with _engine(path, n_batch=16) as eng:  # the rows span four ubatches
        ids = _ids(eng, rows.stop)
        got = _capture(eng, ids, rows, layer_end=1, chunks=2)
    expected = _hf_rows_mean(path, ids, rows)
    assert got.shape == (1,) + expected.shape[1:]
    assert np.max(np.abs(got - expected[:1])) < CAPTURE_TOL[False]


@pytest.mark.slow
def test_gemma3_head_capture_past_the_window():
    path = models.gemma3_270m_f32()  # sliding window 512 on 5 of 6 layers
    rows = range(640, 660)
    with _engine(path) as eng:
        ids = _ids(eng, rows.stop)
        got = _capture(eng, ids, rows)
    expected = _hf_rows_mean(path, ids, rows)
    assert np.max(np.abs(got - expected)) < 5e-4  # Gemma's F32 path, as in test_native.py


def _hf_scaled_logits(path, ids, factor):
    model = oracle.load_hf(path)
    layers = oracle._layers(model)
    saved = [layer.self_attn.scaling for layer in layers]
    try:
        for layer in layers:
            layer.self_attn.scaling *= factor
        return oracle.plain_logits(model, ids)
    finally:
        for layer, scaling in zip(layers, saved):
            layer.self_attn.scaling = scaling


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_attn_scale_equals_scaled_transformers_attention(flash_attn):
    path = models.smollm2_f32()
    with _engine(path, flash_attn=flash_attn) as eng:
        ids = _ids(eng, 200)
        eng.native.set_attn_scale(1.3)
        eng.decode(ids, 0)
        scaled = eng.logits()
        eng.clear()
        eng.native.set_attn_scale(1.0)
        eng.decode(ids, 0)
        plain = eng.logits()
    expected = _hf_scaled_logits(path, ids, 1.3)
    expected_plain = oracle.plain_logits(oracle.load_hf(path), ids)
    tol = {False: 1e-3, True: 1e-2}[flash_attn]
    assert np.max(np.abs(scaled - expected)) / np.max(np.abs(expected)) < tol
    assert np.max(np.abs(plain - expected_plain)) / np.max(np.abs(expected_plain)) < tol
    assert np.max(np.abs(scaled - plain)) > 10 * tol * np.max(np.abs(plain))  # the scale did something


def test_bad_capture_arguments_raise_and_context_still_works():
    with _engine(models.tiny_llama_f32(), n_ctx=256) as eng:
        with pytest.raises(DyscoValueError, match=r"\[10, 5\)"):
            eng.native.set_head_capture(10, 5)
        with pytest.raises(DyscoValueError, match="256 positions"):
            eng.native.set_head_capture(0, 300)
        with pytest.raises(DyscoValueError, match="layer_end = 99"):
            eng.native.set_head_capture(0, 10, 99)
        with pytest.raises(DyscoError, match="no head attention was captured"):
            eng.native.head_scores()
        with pytest.raises(DyscoValueError, match="got 0"):
            eng.native.set_attn_scale(0.0)
        ids = _ids(eng, 20)
        eng.native.set_head_capture(15, 20)
        eng.decode(ids, 0)
        assert eng.native.head_scores().shape[2] == 20
        eng.native.clear_head_capture()
        eng.decode(ids[:1], 20)
        assert np.all(np.isfinite(eng.logits()))
