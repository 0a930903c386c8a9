"""One Model shared by threads (SmolLM2-135M-Instruct Q4_1): generations take turns on the
context, never crash, and give the greedy answers of the same calls made one after another.
The oracle is the sequential run on the same Model."""
from __future__ import annotations

import gc
import threading

import pytest

import models
from dysco_edge import DyscoConfig, Model
from dysco_edge.errors import InputError

HEADS = ((12, 1), (14, 3), (15, 0), (16, 5), (18, 2), (20, 7))
PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello to Anna.", "Name a fruit that is red."]
DOC = "Tom baked bread on Monday. Anna painted the fence on Tuesday. Sofia wrote a letter on Friday. " * 12
QUESTIONS = ["What did Tom do?", "Who painted the fence?", "When did Sofia write?"]
JOIN_S = 120  # a deadlock fails the test instead of hanging the suite


@pytest.fixture(scope="module")
def model():
    with Model(models.smollm2_q4_1(), n_ctx=2048) as m:
        yield m


def _calls():
    """(prompt, dysco, stream) for every call: DySCO and plain, streamed and not."""
    dysco = DyscoConfig(qr_heads=HEADS, top_k=64)
    return [(p, dysco if i % 2 == 0 else None, i % 3 == 0) for i, p in enumerate(PROMPTS * 5)]


def _answer(model, prompt, dysco, stream):
    out = model.generate(prompt, dysco=dysco, max_new_tokens=6, stream=stream)
    if not stream:
        return out.token_ids
    text = "".join(out)
    assert text == out.result.text
    return out.result.token_ids


def _run_threads(targets):
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread is stuck waiting for the model"
    assert not errors, errors


@pytest.mark.slow
def test_four_threads_give_the_sequential_answers(model):
    calls = _calls()
    expected = [_answer(model, *c) for c in calls]
    got = [None] * len(calls)

    def worker(k):
        for i in range(k, len(calls), 4):  # 4 threads x 5 generations
            got[i] = _answer(model, *calls[i])

    _run_threads([lambda k=k: worker(k) for k in range(4)])
    assert got == expected


@pytest.mark.slow
def test_document_session_ask_from_threads(model):
    session = model.document(DOC)
    dysco = DyscoConfig(qr_heads=HEADS, top_k=64)
    expected = {q: session.ask(q, dysco=dysco, max_new_tokens=6).token_ids for q in QUESTIONS}
    got = {}

    def ask(q):
        for _ in range(2):
            ids = session.ask(q, dysco=dysco, max_new_tokens=6).token_ids
            assert got.setdefault(q, ids) == ids

    _run_threads([lambda q=q: ask(q) for q in QUESTIONS])
    assert got == expected


def test_abandoned_stream_frees_the_model_without_the_cycle_collector(model):
    gc.disable()  # the stream must be freed by its reference count alone
    try:
        stream = model.generate("Write a long story.", dysco=None, stream=True, max_new_tokens=40)
        next(iter(stream))
        del stream
        _run_threads([lambda: model.generate("Say hi.", dysco=None, max_new_tokens=3)])
    finally:
        gc.enable()


def test_stream_closed_by_another_thread_frees_the_model(model):
    stream = model.generate("Write a long story.", dysco=None, stream=True, max_new_tokens=40)
    next(iter(stream))
    _run_threads([stream.close])
    assert stream.result is None
    assert model.generate("Say hi.", dysco=None, max_new_tokens=3).token_ids


def test_same_thread_second_generation_is_an_error_not_a_deadlock(model):
    first = model.generate("Write a long story.", dysco=None, stream=True, max_new_tokens=40)
    next(iter(first))
    with pytest.raises(InputError, match="previous generation is still open"):
        model.generate("Say hi.", dysco=None, max_new_tokens=3)
    first.close()
    assert model.generate("Say hi.", dysco=None, max_new_tokens=3).token_ids
