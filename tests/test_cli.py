"""What the CLI prints for errors: ours and the OS's as one line, everything else as a bug."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dysco_edge import cli
from dysco_edge.cli import run as run_cli
from dysco_edge.errors import ContextOverflow


def _raising(error):
    def handler(args):
        raise error
    return handler


def test_our_errors_and_os_errors_are_one_line(monkeypatch, capsys):
    for error in (ContextOverflow("the input is 9000 tokens"), PermissionError("cannot read /x")):
        monkeypatch.setattr(run_cli, "run_command", _raising(error))
        assert cli.main(["run", "-q", "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dysco-edge: error: ") and str(error) in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(run_cli, "run_command", _raising(KeyError("not ours to hide")))
    with pytest.raises(KeyError):
        cli.main(["run", "-q", "x"])
    # a plain ValueError from deep inside is a bug too, not "bad input"
    monkeypatch.setattr(run_cli, "run_command", _raising(ValueError("bug")))
    with pytest.raises(ValueError):
        cli.main(["run", "-q", "x"])


def test_debug_shows_the_traceback_of_our_errors(monkeypatch):
    monkeypatch.setattr(run_cli, "run_command", _raising(ContextOverflow("too long")))
    with pytest.raises(ContextOverflow):
        cli.main(["--debug", "run", "-q", "x"])


@pytest.mark.slow
def test_a_context_smaller_than_a_batch_just_works(tmp_path):
    """llama.cpp caps its batch at the n_ctx asked for; feeding 512-token batches aborted the process."""
    doc = tmp_path / "notes.txt"
    doc.write_text("The lighthouse keeper, Mara Quint, painted the sign at the entrance in 1911.\n")
    proc = subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", "--doc", str(doc), "-q", "hi",
                           "--n-ctx", "10", "--max-tokens", "3"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "GGML_ASSERT" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_run_decodes_plainly_by_default_and_fast_or_exact_when_asked(tmp_path):
    import json
    import models
    from dysco_edge import Model
    from dysco_edge.heads.maps import dump_head_map
    prompt = "Name three colours of the rainbow and say which is first."
    with Model(models.smollm2_q4_1(), n_ctx=512, n_threads=2) as model:
        # the first strength at which fast, exact and plain answer this prompt differently, so that the
        # test tells them apart (4 on an AVX-512 CPU; where they round otherwise, another)
        for strength in (4.0, 8.0, 2.0, 16.0):
            auto = model.resolve_dysco("auto").replace(strength=strength)
            expected = {mode: model.generate(prompt, dysco=auto.replace(mode=mode), max_new_tokens=16).text
                        for mode in ("fast", "exact")}
            expected["off"] = model.generate(prompt, dysco=None, max_new_tokens=16).text
            if len(set(expected.values())) == 3:
                break
        assert len(set(expected.values())) == 3, expected
        data = json.loads(dump_head_map(model.head_map()))
        data["config"]["strength"] = strength
        (tmp_path / "map.json").write_text(json.dumps(data))
    for flags, mode in (([], "off"), (["--dysco", "fast"], "fast"), (["--dysco", "exact"], "exact"),
                        (["--no-dysco"], "off"), (["--compare"], "fast")):
        proc = subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", str(models.smollm2_q4_1()), "-p", prompt,
                               "--max-tokens", "16", "--n-ctx", "512", "--head-map", str(tmp_path / "map.json"), *flags],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout.rstrip("\n").split("--- DySCO:\n")[-1]  # --compare: plain's answer first
        assert shown == expected[mode]
        assert (f"DySCO mode: {mode}" in proc.stderr) == (mode != "off")


def _run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["-q", ""], "the question is empty (question 1: -q '')"),
    (["-q", "Who?", "-q", " \t"], "question 2: -q ' \\t'"),
    (["--doc", "no-such-file.pdf", "-q", "Who?"], "document not found: no-such-file.pdf"),
    (["--threads", "0", "-q", "Who?"], "--threads must be >= 1, got 0"),
    (["--stop-on-repeat", "-1", "-q", "Who?"], "--stop-on-repeat must be >= 0"),
    (["-p", "hello", "--doc", "x.txt"], "takes no --doc or -q"),
])
def test_bad_input_is_refused_before_the_model_loads(args, words, tmp_path):
    """An empty question was refused only after the document's prefill (81 s on a long PDF)."""
    proc = _run_cli(str(tmp_path / "model-that-is-not-there.gguf"), *args, timeout=60)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "prefill" not in proc.stderr  # one line, no work done


def test_help_shows_the_defaults_of_the_generation_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--max-tokens", f"default {run_cli.MAX_TOKENS}"),
                          ("--stop-on-repeat", f"default {run_cli.STOP_ON_REPEAT}"),
                          ("--temperature", "default 0: greedy"), ("--seed", "default: a new one each run"),
                          ("--threads", "default: one per physical core")):
        assert flag in text and default in text


@pytest.mark.slow
def test_a_cold_run_says_it_saved_the_cells_and_the_next_one_loaded_them(tmp_path):
    import models
    doc = tmp_path / "notes.txt"
    doc.write_text("The lighthouse keeper, Mara Quint, painted the sign at the entrance in 1911.\n")
    args = (models.smollm2_q4_1(), "--doc", doc, "-q", "Who painted the sign?", "--max-tokens", "8",
            "--cache-dir", tmp_path / "kv")
    cold, warm = _run_cli(*args), _run_cli(*args)
    assert cold.returncode == warm.returncode == 0, cold.stderr + warm.stderr
    assert "prefilled in" in cold.stderr and "saved to the KV cache" in cold.stderr
    assert "loaded from the KV cache" in warm.stderr and "prefilled" not in warm.stderr.replace("not prefilled", "")
    assert cold.stdout == warm.stdout
