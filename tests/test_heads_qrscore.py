"""QRScore in numpy against a brute-force loop; top-16 with a layer cap; the calibration set and its layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
from dysco_edge import cli
from dysco_edge.heads.calibration import make_examples
from dysco_edge.heads.maps import dump_head_map, get_shipped_head_map, load_head_map
from dysco_edge.heads.layout import NULL_QUERY, PromptFormat
from dysco_edge.heads.qrscore import (
    document_scores,
    example_qr_score,
    mean_qr_scores,
    top_heads,
)
from heads_fixtures import head_map


def brute_force_gold_mass(query, null, spans, gold):
    """The spec, one head and one token at a time, in plain Python."""
    n_layer, n_head, _ = query.shape
    out = np.zeros((n_layer, n_head))
    start, end = spans[gold]
    for layer in range(n_layer):
        for head in range(n_head):
            s = [float(query[layer, head, j]) - float(null[layer, head, j]) for j in range(start, end)]
            mean = sum(s) / len(s)
            std = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
            out[layer, head] = sum(x for x in s if x >= mean - 2 * std)
    return out


def random_attention(rng, n_layer, n_head, n_pos):
    """Softmax-like rows with a few spikes, so that the outlier filter has something to drop."""
    logits = rng.standard_normal((n_layer, n_head, n_pos)) * 2
    return np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)


def test_qr_score_equals_brute_force():
    rng = np.random.default_rng(7)
    spans = [(3, 15), (15, 22), (25, 40)]
    per_example, expected = [], []
    for gold in (0, 2, 1):
        query, null = random_attention(rng, 3, 4, 44), random_attention(rng, 3, 4, 41)
        per_example.append(example_qr_score(query, null, spans, gold))
        expected.append(brute_force_gold_mass(query, null, spans, gold))
        assert np.allclose(document_scores(query, null, spans)[..., gold], expected[-1], atol=1e-12)
    assert np.allclose(mean_qr_scores(per_example), np.mean(expected, axis=0), atol=1e-12)


def test_outliers_below_two_std_are_dropped():
    query = np.zeros((1, 1, 12))
    query[0, 0, :11] = 0.1
    query[0, 0, 11] = -5.0  # far below the mean: dropped
    assert document_scores(query, np.zeros_like(query), [(0, 12)])[0, 0, 0] == pytest.approx(1.1)


def test_bad_inputs_are_named():
    query = np.zeros((2, 3, 10))
    with pytest.raises(ValueError, match=r"document span \[5, 12\) is empty or outside the 10 captured positions"):
        document_scores(query, query, [(5, 12)])
    with pytest.raises(ValueError, match=r"equal layers and heads"):
        document_scores(query, np.zeros((2, 4, 10)), [(0, 5)])
    with pytest.raises(ValueError, match=r"gold must index a document span \(0-0\), got 1"):
        example_qr_score(query, query, [(0, 5)], 1)


def test_top_heads_order_ties_and_layer_cap():
    scores = np.array([[0.1, 0.5, 0.5], [0.9, 0.2, 0.0], [0.95, 0.3, 0.5]])
    assert top_heads(scores, 4) == ((2, 0), (1, 0), (0, 1), (0, 2))  # ties: lower (layer, head) first
    assert top_heads(scores, 3, max_layer=1) == ((1, 0), (0, 1), (0, 2))
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3 \(heads in layers 0-0\), got 4"):
        top_heads(scores, 4, max_layer=0)


def test_calibration_set_is_seeded_and_well_formed():
    first, again, other = (make_examples(20, seed=s) for s in (5, 5, 6))
    assert first == again and first != other
    for example in first:
        titles = [title for title, _ in example.documents]
        assert len(set(titles)) == len(titles) == 8
        assert example.answer in example.documents[example.gold][1]
        name = titles[example.gold].removeprefix("The ").split()[0]
        assert name in example.question  # the entry's name is what links question and gold document
        assert sum(name in body for _, body in example.documents) == 1
    assert len({e.gold for e in first}) > 3  # the gold document moves around


def test_layout_spans_cover_exactly_the_documents():
    def tokenize(text, special):
        return [ord(c) for c in text]  # one token per character: spans are easy to read back

    fmt = PromptFormat(tokenize, head=(1,), tail="<end>")
    example = make_examples(1, seed=0, n_documents=3)[0]
    layout = fmt.layout(example)
    text = lambda ids: "".join(map(chr, ids))
    for (start, end), (title, body) in zip(layout.spans, example.documents):
        assert text(layout.prefix[start:end]) == f" {title}\n{body}"
    assert text(layout.question) == f" {example.question}" and text(layout.null) == f" {NULL_QUERY}"
    assert text(layout.prefix).endswith("Question:") and layout.prefix[0] == 1
    assert text(layout.prompt).endswith(f"{example.question}<end>")


def test_select_repicks_the_top_heads_under_a_cap(tmp_path, capsys):
    scores = np.arange(32, dtype=float).reshape(4, 8) / 32  # later layers score higher
    source = tmp_path / "full.json"
    source.write_text(dump_head_map(head_map(heads=((3, 7),), qr_scores=scores.tolist())))
    out = tmp_path / "capped.json"
    assert cli.main(["heads", "select", str(source), "--max-layer", "1", "--name", "Capped", "-o", str(out)]) == 0
    capped = load_head_map(out)
    assert capped.qr_heads == tuple((layer, head) for layer in (1, 0) for head in range(7, -1, -1))
    assert (capped.name, capped.detection["max_layer"], capped.qr_scores) == ("Capped", 1, tuple(map(tuple, scores)))
    assert "probe cost: layers 0-1, (L_max+1)/L = 2/4 = 0.50 of a pass" in capsys.readouterr().err
    assert cli.main(["heads", "select", str(source), "--max-layer", "4"]) == 2
    assert "max_layer must be in 0..3 for this map, got 4" in capsys.readouterr().err
    source.write_text(dump_head_map(head_map(scores=False)))
    assert cli.main(["heads", "select", str(source)]) == 2
    assert "holds no qr_scores" in capsys.readouterr().err


@pytest.mark.parametrize("name, cap", [("SmolLM2-135M-Instruct", 18), ("Gemma-3-270M", 11)])
def test_shipped_detected_maps_are_the_top_16_of_their_scores(name, cap):
    shipped = get_shipped_head_map(name)
    assert shipped.detection["max_layer"] == cap and shipped.detection["examples"] == 64
    assert shipped.qr_heads == top_heads(np.array(shipped.qr_scores), 16, max_layer=cap)
