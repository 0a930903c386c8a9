"""QR-head detection on tiny random models: llama.cpp's per-head QRScores equal the same QRScore
computed from transformers' attention (eager, fp32, same weights); the CLI writes a full map."""
from __future__ import annotations

import json

import gguf
import models
import numpy as np
import oracle
import pytest
import torch
from dysco_edge import Model, cli
from dysco_edge.heads.calibration import make_examples
from dysco_edge.runtime.chat import ChatTemplate
from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.heads.gguf import embed_head_map
from dysco_edge.heads.maps import load_head_map
from dysco_edge.heads.layout import PromptFormat
from dysco_edge.heads.detect import NativeAttention, score_layouts

F32 = int(gguf.GGMLQuantizationType.F32)  # an F32 KV cache, so llama.cpp and transformers see the same numbers
TINY = {"tiny-llama": models.tiny_llama_f32, "tiny-qwen3": models.tiny_qwen3_f32}


def hf_attention(model):
    """The AttentionFn of transformers: mean attention of the rows after the prefix, every layer."""
    def attention(prefix, rows):
        ids = torch.tensor([list(prefix) + list(rows)])
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
        return np.stack([a[0, :, len(prefix):, :].double().mean(dim=1).numpy() for a in out.attentions])
    return attention


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_native_qr_scores_equal_transformers(name):
    path = TINY[name]()
    options = EngineOptions(n_ctx=1024, n_batch=64, n_ubatch=64, type_k=F32, type_v=F32, n_threads=2)
    with Engine(path, options) as engine:  # n_batch 64: prefixes span several ubatches
        fmt = PromptFormat.from_engine(engine, ChatTemplate.from_engine(engine))
        layouts = fmt.layouts(make_examples(4, seed=11, n_documents=4))
        native = score_layouts(layouts, NativeAttention(engine))
    expected = score_layouts(layouts, hf_attention(oracle.load_hf(path)))
    assert native.shape == expected.shape == (4, 8)
    assert np.max(np.abs(native - expected)) < 2e-5
    assert np.ptp(expected) > 0.05  # the heads really differ: the comparison has teeth


@pytest.mark.slow
def test_cli_detect_writes_every_score_and_respects_the_layer_cap(tmp_path, capsys):
    out = tmp_path / "map.json"
    argv = ["heads", "detect", str(models.tiny_llama_f32()), "--examples", "3", "--documents", "3",
            "--seed", "4", "--max-layer", "1", "--name", "Tiny", "--n-threads", "2", "-o", str(out)]
    assert cli.main(argv) == 0
    assert "ETA" in capsys.readouterr().err
    head_map = load_head_map(out)
    assert len(head_map.qr_heads) == 16 and max(layer for layer, _ in head_map.qr_heads) == 1
    assert len(head_map.qr_scores) == 4 and all(len(row) == 8 for row in head_map.qr_scores)
    assert {k: head_map.detection[k] for k in ("seed", "examples", "max_layer")} == {
        "seed": 4, "examples": 3, "max_layer": 1}
    scores = np.array(head_map.qr_scores)
    assert min(scores[layer, head] for layer, head in head_map.qr_heads) >= scores[:2].flatten()[
        np.argsort(-scores[:2].flatten())[15]]
    assert json.loads(out.read_text())["detection"]["calibration"] == "fictional-facts-v1"


@pytest.mark.slow
def test_model_finds_the_embedded_map(tmp_path, monkeypatch):
    monkeypatch.setenv("DYSCO_HEAD_MAPS", str(tmp_path / "none"))
    src, heads = tmp_path / "map.json", tmp_path / "heads.txt"
    heads.write_text("1-2,3-7")
    assert cli.main(["heads", "import", str(heads), "--model", str(models.tiny_llama_f32()), "--name", "Tiny",
                     "-o", str(src)]) == 0
    with_heads = embed_head_map(models.tiny_llama_f32(), load_head_map(src), tmp_path / "tiny-heads.gguf")
    with Model(with_heads, n_ctx=256, n_threads=2) as model:
        assert model.find_heads().describe() == "Tiny (embedded in tiny-heads.gguf)"
        assert model.resolve_dysco("auto").qr_heads == ((1, 2), (3, 7))
    with Model(models.tiny_llama_f32(), n_ctx=256, n_threads=2) as model:
        assert model.find_heads() is None
        with pytest.raises(LookupError, match=r"dysco-edge heads detect .*tiny-llama"):
            model.resolve_dysco("auto")


@pytest.mark.slow
def test_native_attention_reuses_a_cached_prefix():
    options = EngineOptions(n_ctx=512, type_k=F32, type_v=F32, n_threads=2)
    with Engine(models.tiny_qwen3_f32(), options) as engine:
        ids = engine.tokenize("The lantern festival of Corinmoor is held every June. " * 8)
        reused = NativeAttention(engine)
        reused(ids[:40], ids[40:48])
        extended = reused(ids[:70], ids[70:75])  # decodes only positions 40..69 on top of the cache
        shorter = reused(ids[:30], ids[30:33])  # not an extension: decoded afresh
        assert np.allclose(extended, NativeAttention(engine)(ids[:70], ids[70:75]), atol=1e-6)
        assert np.allclose(shorter, NativeAttention(engine)(ids[:30], ids[30:33]), atol=1e-6)
