"""DySCO on a Vulkan device against the CPU backend of the same libraries (bench/device/check_vulkan.py,
each side in a process of its own), and no DySCO node on the CPU with a quantized K cache. Runs only
where the libraries have a Vulkan device (a -DGGML_VULKAN=ON build, bench/verify/build_vulkan.sh, with
DYSCO_EDGE_LIB_DIR pointing at it; lavapipe does: GGML_VK_VISIBLE_DEVICES=0); skips elsewhere.

SmolLM2 in F32: with quantized weights the CPU and Vulkan multiply differently (lavapipe: 2e-2 relative
in the logits on the Q4_1 file) and a greedy decode may part on a near tie, DySCO or not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parents[1]


def _vulkan_devices() -> list[str]:
    from dysco_edge.runtime.engine import devices
    return [d.name for d in devices() if d.backend == "Vulkan"]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _vulkan_devices(), reason="no Vulkan device in the loaded libraries (build with "
                       "bench/verify/build_vulkan.sh and set DYSCO_EDGE_LIB_DIR; lavapipe: GGML_VK_VISIBLE_DEVICES=0)"),
]


def _check(tmp_path, *args) -> dict:
    """bench/device/check_vulkan.py on SmolLM2 F32 with its shipped heads: the row of its JSON."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "bench/device/check_vulkan.py"), "--model", str(models.smollm2_f32()),
           "--head-map", str(ROOT / "head_maps/smollm2-135m-instruct.json"), "--flash-attn", "on",
           "--n-ctx", "512", "--json", str(out), *args]
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
    assert out.exists(), done.stderr[-2000:]
    return json.loads(out.read_text())["rows"][0]


def test_vulkan_decodes_as_the_cpu(tmp_path):
    row = _check(tmp_path, "--prompt", "200", "--tokens", "8")
    assert row["probe_diff"] < 1e-3 and row["capture_diff"] < 1e-3 and row["logits_rel"] < 1e-2
    assert row["no_trace"]
    for mode in ("plain", "exact", "fast"):
        assert row[mode]["equal"], (mode, row[mode])
    for mode in ("exact", "fast"):
        assert row[mode]["jaccard_min"] >= 0.95, (mode, row[mode])


def test_quantized_k_scores_on_vulkan_are_the_cpus(tmp_path):
    # the dequantizing copy of a strided quantized view is wrong on Vulkan (0.33 off): the whole K is copied
    row = _check(tmp_path, "--type-k", "q8_0", "--modes", "plain", "--prompt", "120", "--tokens", "2")
    assert row["probe_diff"] < 1e-3 and row["capture_diff"] < 1e-3, row


def test_no_dysco_node_falls_back_to_the_cpu_with_a_quantized_k_cache():
    cmd = [sys.executable, "-m", "dysco_edge.cli", "devices", "--check", str(models.smollm2_q4_1()),
           "--flash-attn", "on", "--cache-type-k", "q8_0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["scores", "CPY", "Vulkan0"] in [r[:3] for r in rows]  # the dequantizing copy, on the device
    assert "CPU fallback" not in done.stdout
