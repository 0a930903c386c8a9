"""`run --show-focus` on a real Markdown file (this repository's head_maps/README.md) and a PDF
read through pypdf, with SmolLM2-135M-Instruct: every passage shown is document text (never the
system prompt, the chat template or the question) and is placed by the page or heading it lies
under. Oracle: the passage found in the file's own text, and the headings/pages before it there."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import models
from test_documents import make_pdf

README = Path(__file__).resolve().parents[1] / "head_maps" / "README.md"
FOCUS = re.compile(r"^  focus(?: \((.+)\))?: \.\.\.(.*)\.\.\.$")


def _focus(doc: Path, question: str) -> list[tuple[str, str]]:
    proc = subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", str(models.smollm2_q4_1()), "--doc", str(doc),
                           "-q", question, "--show-focus", "--max-tokens", "12", "--no-cache"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stderr
    found = [FOCUS.match(line) for line in proc.stderr.splitlines() if line.startswith("  focus")]
    assert found and all(found), proc.stderr
    return [(m.group(1) or "", m.group(2)) for m in found]


def _squeezed(text: str) -> str:
    return " ".join(text.split())


def _places(text: str, passage: str, heading: re.Pattern) -> set[str]:
    """Every marker that may place the passage: the last one before it, and any inside it."""
    flat = _squeezed(text)
    start = flat.find(passage)
    assert start >= 0, f"not document text: {passage!r}"
    marks = [(m.start(), m.group(1).strip()) for m in heading.finditer(flat)]
    before = [name for at, name in marks if at < start]
    inside = {name for at, name in marks if start <= at < start + len(passage)}
    return inside | set(before[-1:])


@pytest.mark.slow
def test_markdown_focus_is_document_text_placed_by_its_heading():
    question = "Which key gives the QR heads of a head map?"
    source = README.read_text()
    code_free = re.sub(r"```.*?```", "", source, flags=re.S)  # headings only outside code
    titles = {m.group(1).strip() for m in re.finditer(r"^#{1,6} +(.+)$", code_free, re.M)}
    heading = re.compile("(?<![^ ])#{1,6} (" + "|".join(map(re.escape, titles)) + ")(?= )")
    for where, passage in _focus(README, question):
        assert question not in passage and "Question:" not in passage and "SmolLM" not in passage
        assert where.startswith("section: ") and where.removeprefix("section: ") in _places(source, passage, heading)


@pytest.mark.slow
def test_pdf_focus_is_document_text_placed_by_its_page(tmp_path):
    pages = [[f"Page {p} of the harbour log.", *(f"On day {p}{d} the keeper counted {p * d + 7} boats in the bay."
                                                 for d in range(1, 9))] for p in range(1, 5)]
    pages[2][4] = "On day 35 the lamp of the lighthouse was painted red by Mara Quint."
    doc = tmp_path / "log.pdf"
    doc.write_bytes(make_pdf(pages))
    text = "\n\n".join(f"[page {p}]\n" + "\n".join(lines) for p, lines in enumerate(pages, 1))
    for where, passage in _focus(doc, "Who painted the lamp of the lighthouse?"):
        assert "painted the lamp of the lighthouse?" not in passage and "Question:" not in passage
        assert where in _places(text, passage, re.compile(r"\[(page \d+)\]"))
