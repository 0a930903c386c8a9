"""Where an answer looked (documents/focus.py, runtime/focus_trace.py): passages, places, the
importance summed over the answer's steps, and passage weights on the real SmolLM2.

Oracles: hand-cut passages of small texts, Python's own UTF-8 encoding, brute-force sums over
the trace, and token offsets from detokenizing every prefix of the prompt (not the per-token
pieces the code joins)."""
from __future__ import annotations

import numpy as np
import pytest

import models
from dysco_edge import Model
from dysco_edge.api import DOCUMENT_TEMPLATE
from dysco_edge.documents.focus import MAX_PASSAGE, _char_of_byte, focus_passages, passage_bounds, places
from dysco_edge.runtime.bookkeeping import StepTrace
from dysco_edge.runtime.focus_trace import FocusTrace

TEXT = ("[page 1]\nThe harbour opened on 2 April. Forty boats were registered!\n\n[page 2]\n"
        "A line without a stop\n## Repairs\nThe lamp was repaired by Mara Quint (on 3 March).")


def test_passages_are_sentences_and_lines_never_markers():
    assert [TEXT[s:e] for s, e in passage_bounds(TEXT)] == [
        "The harbour opened on 2 April.", "Forty boats were registered!", "A line without a stop",
        "## Repairs", "The lamp was repaired by Mara Quint (on 3 March)."]


def test_a_long_sentence_is_cut_at_spaces_into_readable_passages():
    text = "word " * 200 + "end."
    bounds = passage_bounds(text)
    assert all(e - s <= MAX_PASSAGE for s, e in bounds) and len(bounds) == 4
    assert " ".join(text[s:e] for s, e in bounds) == text.strip()


def test_places_are_the_readers_markers_and_markdown_headings():
    assert places(TEXT) == [(0, "page 1"), (TEXT.index("[page 2]"), "page 2"),
                            (TEXT.index("## Repairs"), "section: Repairs")]


def test_char_of_byte_follows_utf8():
    text = "aé€😀b"
    expected = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    assert _char_of_byte(text).tolist() == expected


def test_focus_trace_sums_only_the_answers_steps():
    trace, rng = FocusTrace(5), np.random.default_rng(0)
    steps = {pos: rng.random(pos + 1) for pos in (2, 3, 4, 5, 6)}  # the importance grows a position a step
    for pos, importance in steps.items():
        trace.append(StepTrace(pos, np.array([0]), np.array([0])))
        trace.observe(pos, importance)
    answer = [steps[p][:5] for p in (4, 5, 6)]  # the last prompt token's step (pos 4) and after
    assert trace.steps == 3 and len(trace) == 5
    np.testing.assert_allclose(trace.mean_importance(), np.mean(answer, axis=0))


@pytest.fixture(scope="module")
def smollm2():
    with Model(models.smollm2_q4_1(), n_ctx=2048) as m:
        yield m


def _prefix_byte_starts(model, ids) -> list[int]:
    """Where each token starts in the prompt's text, from detokenizing every prefix (the oracle)."""
    return [len(model.engine.detokenize(ids[:i], special=True)) for i in range(len(ids))]


@pytest.mark.slow
def test_passage_weights_are_their_tokens_mean_importance(smollm2):
    doc = TEXT + "\nLe café coûte 3 € — 😀 a smile.\nThe ferry ran twice a day."
    question = DOCUMENT_TEMPLATE.format(document=doc, question="Who repaired the lamp?")
    gen = smollm2.generate(messages=[{"role": "user", "content": question}], max_new_tokens=10, trace=True,
                           dysco=smollm2.head_map().to_config(mode="fast"))
    passages = focus_passages(smollm2, gen, [doc], top=100)
    prompt = smollm2.engine.detokenize(gen.prompt_ids, special=True)
    at = prompt.find(doc.encode())
    starts = _prefix_byte_starts(smollm2, gen.prompt_ids)
    mean = gen.trace.mean_importance()
    expected = {}
    for s, e in passage_bounds(doc):
        lo, hi = at + len(doc[:s].encode()), at + len(doc[:e].encode())
        ends = starts[1:] + [len(prompt)]
        # a token counts for the passage holding its first byte inside the document
        w = sum(mean[i] for i in range(len(starts)) if ends[i] > at and lo <= max(starts[i], at) < hi)
        if w > 0:
            expected[(s, e)] = w
    assert {(p.start, p.end): p.weight for p in passages} == pytest.approx(expected, rel=1e-9)
    assert [p.weight for p in passages] == sorted((p.weight for p in passages), reverse=True)
    for p in passages:
        assert p.text == doc[p.start:p.end]
    by_text = {p.text: p.where for p in passages}
    assert by_text["Forty boats were registered!"] == "page 1"
    assert by_text["Le café coûte 3 € — 😀 a smile."] == "section: Repairs"


@pytest.mark.slow
def test_the_evidence_sentence_is_where_smollm2_looked(smollm2):
    doc = ("[page 1]\nThe harbour opened for the season on 2 April.\nForty fishing boats were registered.\n\n"
           "[page 2]\nThe north pier was painted white in May.\n"
           "The lighthouse lamp was repaired by Mara Quint on 3 March.\nA new crane was ordered for the east quay.")
    question = DOCUMENT_TEMPLATE.format(document=doc, question="Who repaired the lighthouse lamp?")
    for mode in ("fast", "exact"):
        gen = smollm2.generate(messages=[{"role": "user", "content": question}], max_new_tokens=20, trace=True,
                               dysco=smollm2.head_map().to_config(mode=mode))
        top = focus_passages(smollm2, gen, [doc], top=3)
        assert top[0].text == "The lighthouse lamp was repaired by Mara Quint on 3 March.", (mode, top)
        assert top[0].where == "page 2"


@pytest.mark.slow
def test_plain_and_untraced_answers_have_no_focus(smollm2):
    gen = smollm2.generate("Say hi.", dysco=None, max_new_tokens=3, trace=True)
    assert focus_passages(smollm2, gen, ["Say hi."]) == []
    gen = smollm2.generate("Say hi.", max_new_tokens=3)
    assert focus_passages(smollm2, gen, ["Say hi."]) == []
