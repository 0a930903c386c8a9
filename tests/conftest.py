"""Shared fixtures: models built from PyPI packages (tests/models.py) and our engine."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import models


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs a downloaded model or takes long (CI runs them)")
    # documents opened by tests (and the CLI they start) keep their KV cells out of the user's cache
    if "DYSCO_EDGE_KV_CACHE" not in os.environ:
        config._test_kv_dir = os.environ["DYSCO_EDGE_KV_CACHE"] = tempfile.mkdtemp(prefix="dysco-edge-test-kv-")
    # catalog models assembled by tests live with the other test models (kept between runs: 1.1 GB
    # is assembled once), not in the user's model cache
    os.environ.setdefault("DYSCO_EDGE_MODEL_CACHE", str(models.cache_dir() / "catalog"))


def pytest_unconfigure(config):
    folder = getattr(config, "_test_kv_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ["DYSCO_EDGE_KV_CACHE"]


F32_MODELS = {
    "tiny-llama": models.tiny_llama_f32,
    "tiny-qwen3": models.tiny_qwen3_f32,
    "smollm2": models.smollm2_f32,
}


@pytest.fixture(scope="session", params=sorted(F32_MODELS))
def f32_model(request):
    """(name, path) of each F32 model checked against transformers."""
    return request.param, F32_MODELS[request.param]()
