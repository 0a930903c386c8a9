"""The scripts in convert/, run as a user runs them (subprocesses), on a tiny GGUF and files in
the authors' formats. Oracles: the `gguf` package reading the files written, and the head
lists parsed here by a regular expression, independently of our importer."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf

from heads_fixtures import SHAPE, tensor_bytes, write_gguf

CONVERT = Path(__file__).resolve().parents[1] / "convert"
# the authors' DySCO YAML layout, for the synthetic shape (4 layers x 8 heads)
DYSCO_YAML = """\
model_name_or_path: some/model   # ignored
selected_heads: "[(1, 2), (3, 7), (0, 5)]"
top_k: 1024
top_p: 0.95
strength: 2.5
decay_factor: 0.5
context_warmup_steps: 4
intervention_warmup: auto
template_sequences: [[1, 2, 3]]
"""
QRHEAD = 'model_base_class: x\nattn_head_set: "2-1,0-7,3-3"\n'


def _script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT / name), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def _pairs(text: str) -> list[list[int]]:
    """(layer, head) pairs as the authors write them: "(17, 24)" tuples or "8-21" items."""
    found = re.findall(r"\((\d+),\s*(\d+)\)", text) or re.findall(r"(\d+)-(\d+)", text)
    return [[int(layer), int(head)] for layer, head in found]


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def test_authors_formats_to_head_map_for_the_ggufs_shape(tmp_path):
    model = write_gguf(tmp_path / "model.gguf")
    meta = _fields(model)
    for fmt, text in (("dysco.yaml", DYSCO_YAML), ("qrhead.yaml", QRHEAD)):
        (tmp_path / fmt).write_text(text)
        out = tmp_path / f"{fmt}.json"
        proc = _script("convert_authors_heads_to_map.py", tmp_path / fmt, "--model", model, "-o", out)
        assert proc.returncode == 0, proc.stderr
        written = json.loads(out.read_text())
        assert written["qr_heads"] == _pairs(text)
        assert written["match"]["n_layer"] == meta["llama.block_count"]
        assert written["match"]["n_head"] == meta["llama.attention.head_count"]
        assert written["match"]["n_head_kv"] == meta["llama.attention.head_count_kv"]
        assert written["name"] == meta["general.name"]
    dysco = json.loads((tmp_path / "dysco.yaml.json").read_text())["config"]
    assert (dysco["top_k"], dysco["top_p"], dysco["strength"], dysco["decay"], dysco["context_warmup"]) == \
        (1024, 0.95, 2.5, 0.5, 4)
    assert "template_sequences" not in dysco  # token ids of the authors' tokenizer stay behind


def test_head_map_into_gguf_metadata_leaves_the_rest_as_it_was(tmp_path):
    model = write_gguf(tmp_path / "model.gguf")
    (tmp_path / "heads.yaml").write_text(DYSCO_YAML)
    assert _script("convert_authors_heads_to_map.py", tmp_path / "heads.yaml", "--model", model,
                   "-o", tmp_path / "map.json").returncode == 0
    proc = _script("convert_head_map_to_gguf.py", model, tmp_path / "map.json", "-o", tmp_path / "out.gguf")
    assert proc.returncode == 0, proc.stderr
    before, after = _fields(model), _fields(tmp_path / "out.gguf")
    assert [list(p) for p in zip(after["dysco.qr_heads.layer"], after["dysco.qr_heads.head"])] == _pairs(DYSCO_YAML)
    assert after["dysco.config.top_k"] == 1024 and after["dysco.config.strength"] == 2.5
    assert after["dysco.match.n_layer"] == SHAPE.n_layer
    assert {k: v for k, v in after.items() if not k.startswith("dysco.")} == before
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(model)


def test_errors_are_one_line_and_leave_no_output(tmp_path):
    model = write_gguf(tmp_path / "model.gguf")
    (tmp_path / "map.json").write_text(json.dumps({"qr_heads": [[9, 0]]}))
    proc = _script("convert_head_map_to_gguf.py", model, tmp_path / "map.json", "-o", tmp_path / "out.gguf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("convert_head_map_to_gguf.py: error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out.gguf").exists()
    proc = _script("convert_authors_heads_to_map.py", tmp_path / "missing.yaml", "--model", model, "-o", tmp_path / "x")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "big.yaml").write_text('selected_heads: "[(4, 0)]"\n')  # layer 4 of a 4-layer model
    proc = _script("convert_authors_heads_to_map.py", tmp_path / "big.yaml", "--model", model, "-o", tmp_path / "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
