"""The README's first command: `dysco-edge run -q "..."` on the bundled sample document with the
default model must print the right answer (the logbook says Sofia painted the sign). Oracle: the
sample document itself, read here."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from dysco_edge.cli import run as run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_asks_the_sample_question_of_the_sample_document():
    first = re.search(r'dysco-edge run -q "([^"]+)"', README.read_text())
    assert first and first.group(1) == run_cli.SAMPLE_QUESTION
    sample = resources.files("dysco_edge").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    assert "Sofia painted the wooden sign at the entrance" in sample


@pytest.mark.slow
def test_the_readme_demo_answers_right_with_the_default_model(tmp_path):
    """Greedy, so the same answer every time; cold (empty KV cache), then warm (loaded cells)."""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", "-q", run_cli.SAMPLE_QUESTION,
                               "--cache-dir", str(tmp_path / "kv")], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=1800)
        assert proc.returncode == 0, proc.stderr
        assert "Sofia" in proc.stdout and not {"Amara", "Lena", "Tomasz"} & set(re.findall(r"\w+", proc.stdout))
