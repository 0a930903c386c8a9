"""Every node DySCO adds to a graph is named dysco* and reported with its backend (native/dysco-placement.cpp),
llama.cpp's own nodes are not; a quantized K cache is dequantized for the score mat-muls (which Vulkan
would otherwise run on the CPU) without changing what they compute; `dysco-edge devices --check`."""
from __future__ import annotations

import re

import numpy as np
import pytest

import models
from dysco_edge.cli import main as cli_main
from dysco_edge.config import DyscoConfig
from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.runtime.node_placement import node_part, record_placement, summarize

import llama_cpp

HEADS = ((1, 5), (1, 2), (2, 7), (3, 0))
# SmolLM2 (head_dim 64: whole q8_0/q4_0 blocks per KV head; 9 query heads on 3 KV heads): heads on KV
# heads 1, 0 and 2, so the score's K range starts inside the cache row
SMOL_HEADS = ((2, 4), (5, 1), (7, 8))
# the ops DySCO's graph code builds (dysco-graph.cpp, dysco-track.cpp): nothing of llama.cpp's layers
DYSCO_OPS = {"MUL_MAT", "SOFT_MAX", "ADD", "SUB", "MUL", "DIV", "SCALE", "TANH", "CPY", "CONT", "SUM_ROWS", "SUM",
             "ARGSORT", "GET_ROWS", "CUMSUM", "STEP", "CLAMP", "SET_ROWS", "FILL"}


def _prompt(n=120):
    return [int(t) for t in np.random.default_rng(3).integers(100, 20000, size=n)]


@pytest.mark.parametrize("flash", [False, True], ids=["fa-off", "fa-on"])
def test_placement_reports_every_dysco_node_and_only_those(flash):
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=512, flash_attn=flash)) as eng:
        nodes = record_placement(eng, DyscoConfig(qr_heads=HEADS, top_k=32, top_p=0.9), _prompt())
    parts = {node_part(n.name) for n in nodes}
    assert parts == {"scores", "fold", "selection and bias", "head capture"}
    assert {n.op for n in nodes} <= DYSCO_OPS  # a walk past DySCO's inputs would rename ROPE, RMS_NORM, ...
    select_ops = {n.op for n in nodes if node_part(n.name) == "selection and bias"}
    assert {"ARGSORT", "GET_ROWS", "CUMSUM", "SET_ROWS", "CLAMP", "FILL", "STEP"} <= select_ops
    assert {n.layer for n in nodes if node_part(n.name) == "scores"} == {1, 2, 3}  # the QR-head layers
    assert {n.layer for n in nodes if node_part(n.name) == "fold"} == {3}  # after the last of them
    assert {n.layer for n in nodes if node_part(n.name) == "head capture"} == {0, 1, 2, 3}
    assert all(n.backend == "CPU" and n.attention_backend == "CPU" and not n.cpu_fallback for n in nodes)
    assert not any(p.cpu_fallback for p in summarize(nodes))


def _cuda_side_prefixes():
    """The node-name prefixes that native/cuda/dysco-side.cu runs on CUDA's side stream."""
    src = (models.REPO_ROOT / "native" / "cuda" / "dysco-side.cu").read_text()
    return tuple(re.findall(r'"([^"]+)"', re.search(r"prefixes\[\] = \{(.*?)\};", src, re.S).group(1)))


def test_the_cuda_side_stream_takes_the_score_and_fold_nodes_and_no_other():
    """CUDA runs DySCO's scores and fold beside the layers, which never read them; the selection and bias,
    which the attention reads at once, and the head capture stay on the main stream. It tells them apart
    by name: a renamed node would move between streams unnoticed on a machine without a GPU."""
    with Engine(models.tiny_llama_f32(), EngineOptions(n_ctx=512)) as eng:
        nodes = record_placement(eng, DyscoConfig(qr_heads=HEADS, top_k=32, top_p=0.9), _prompt())
    side = _cuda_side_prefixes()
    assert side
    for n in nodes:
        assert n.name.startswith(side) == (node_part(n.name) in ("scores", "fold")), n.name
    assert {node_part(n.name) for n in nodes if n.name.startswith(side)} == {"scores", "fold"}


def _probe_and_capture(type_k):
    """Probe scores of the last prompt token, and the mean over the QR heads of its all-heads capture."""
    ids = _prompt(200)
    n = len(ids)
    with Engine(models.smollm2_q4_1(), EngineOptions(n_ctx=512, type_k=type_k)) as eng:
        eng.decode(ids[:-1], 0, want_logits=False)
        eng.native.set_heads(SMOL_HEADS)
        eng.native.probe(ids[-1], n - 1)  # leaves no trace: the capture pass below sees the same cells
        probe = eng.native.scores()
        eng.native.set_head_capture(n - 1, n)
        eng.decode(ids[-1:], n - 1, want_logits=False)
        heads = eng.native.head_scores()
        eng.native.clear_head_capture()
        eng.native.set_placement_log(True)
        eng.native.probe(ids[-1], n)
        dequant = [p for p in eng.native.placement() if node_part(p.name) == "scores" and p.op == "CPY"]
    capture = np.mean([heads[layer, head, :n] for layer, head in SMOL_HEADS], axis=0)
    return probe, capture, dequant


@pytest.mark.parametrize("type_k, tol", [(llama_cpp.GGML_TYPE_Q8_0, 0.02), (llama_cpp.GGML_TYPE_Q4_0, 0.05)],
                         ids=["q8_0", "q4_0"])
def test_quantized_k_scores_are_the_attention_of_the_quantized_cache(type_k, tol):
    probe, capture, dequant = _probe_and_capture(type_k)
    probe_f16, capture_f16, none = _probe_and_capture(None)
    assert dequant and not none  # a dequantizing copy feeds the score mat-mul of a quantized K only
    assert len(dequant) == 3  # one per QR-head layer
    # the probe's K range and the capture's whole K go through the same dequantization: same numbers
    np.testing.assert_allclose(probe, capture, atol=1e-6)
    np.testing.assert_allclose(probe_f16, capture_f16, atol=1e-6)
    # and they are the attention of the quantized cache: close to the F16 cache's, not equal
    assert 0 < np.max(np.abs(probe - probe_f16)) < tol
    assert np.argmax(probe) == np.argmax(probe_f16)


def test_devices_check_on_the_cpu_lists_the_nodes_and_passes(capsys):
    rc = cli_main(["devices", "--check", str(models.smollm2_q4_1()), "--n-gpu-layers", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for part in ("scores", "fold", "selection and bias", "head capture"):
        assert part in out
    assert "ARGSORT" in out and "no DySCO node falls back to the CPU" in out
