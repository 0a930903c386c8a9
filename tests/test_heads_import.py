"""Importing the authors' head lists (DySCO YAML, QRHead attn_head_set) into head maps, and the CLI."""
from __future__ import annotations

import json

import pytest
from dysco_edge import cli
from dysco_edge.config import ConfigError
from dysco_edge.heads.importing import detect_format, import_head_map
from dysco_edge.heads.maps import ModelShape, get_shipped_head_map, load_head_map
from heads_fixtures import SHAPE, write_gguf
from test_config import DYSCO_YAML  # the authors' layout, with keys we ignore

LLAMA_1B = ModelShape(architecture="llama", n_layer=16, n_head=32, n_head_kv=8, n_embd=2048)
QRHEAD_1B = "8-21,8-14,7-22,6-31,8-28,10-26,10-0,5-5,8-3,6-30,8-0,7-26,7-25,7-23,11-4,8-20"

def test_qrhead_list_and_config_give_the_published_map():
    shipped = get_shipped_head_map("Llama-3.2-1B-Instruct")
    for text in (QRHEAD_1B, f'attn_head_set: "{QRHEAD_1B}"\n', f"model_base_class: x\nattn_head_set: {QRHEAD_1B}\n"):
        assert detect_format(text) == "qrhead"
        imported = import_head_map(text, LLAMA_1B, name=shipped.name, origin="qrhead.yaml")
        assert imported.qr_heads == shipped.qr_heads
        assert dict(imported.config) == dict(shipped.config)  # QRHead gives heads; options are DySCO's
        assert imported.source == "QRHead (imported from qrhead.yaml)"


def test_dysco_yaml_keeps_options_and_drops_template_ids():
    shape = ModelShape(architecture="llama", n_layer=32, n_head=32, n_head_kv=8, n_embd=4096)
    imported = import_head_map(DYSCO_YAML, shape, name="Llama-3.1-8B-Instruct", origin="llama.yaml")
    assert imported.qr_heads == ((17, 24), (14, 31), (17, 26))
    assert dict(imported.config) == {"top_k": 4096, "top_p": 0.975, "strength": 2.0, "decay": 0.75,
                                     "context_warmup": 8, "intervention_warmup": "auto"}
    assert imported.source == "DySCO config (imported from llama.yaml)"


def test_import_refuses_unreadable_text_and_heads_outside_the_shape():
    with pytest.raises(ConfigError, match="cannot tell the format"):
        detect_format("model: x\nheads: 1")
    with pytest.raises(ConfigError, match=r"attn_head_set: cannot read '8_21'"):
        import_head_map("8_21", LLAMA_1B, name="x", origin="f")
    with pytest.raises(ValueError, match=r"QR head \(40, 1\): layer 40 does not exist"):
        import_head_map("40-1", LLAMA_1B, name="x", origin="f")


def test_cli_import_with_a_gguf_and_with_shape_flags(tmp_path, capsys):
    model = write_gguf(tmp_path / "m.gguf")
    (tmp_path / "heads.txt").write_text("1-2, 3-7\n")
    out = tmp_path / "map.json"
    assert cli.main(["heads", "import", str(tmp_path / "heads.txt"), "--model", str(model), "-o", str(out)]) == 0
    head_map = load_head_map(out)
    assert head_map.name == "Synthetic Test Model" and head_map.shape.dims == SHAPE.dims
    flags = ["--arch", "llama", "--layers", "4", "--heads", "8", "--kv-heads", "2", "--embd", "128"]
    assert cli.main(["heads", "import", str(tmp_path / "heads.txt"), *flags, "--name", "N", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["qr_heads"] == [[1, 2], [3, 7]]
    capsys.readouterr()
    assert cli.main(["heads", "import", str(tmp_path / "heads.txt"), "--arch", "llama", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("dysco-edge: error: the model's shape is needed: pass --model "
                                               "MODEL.gguf, or --layers --heads --kv-heads --embd")
    assert cli.main(["heads", "import", str(tmp_path / "nope.txt"), *flags, "-o", str(out)]) == 2
    assert "nope.txt: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("selected_heads: [(1, 2)]\ntop_k: " + "9" * 5000 + "\n", "top_k: a number of 5000 digits"),
    ("selected_heads: [(1, " + "2" * 5000 + ")]\n", "selected_heads: unexpected text"),
    ("selected_heads: [(1, 2)]\ntemplate_sequences: [[" + "3" * 5000 + "]]\n",
     "template_sequences: a number of 5000 digits"),
    ("selected_heads: [(1, 2)]\ntemplate_sequences: " + "[" * 100_000 + "]" * 100_000 + "\n",
     "template_sequences: lists nested deeper"),
])
def test_hostile_yaml_numbers_and_nesting_are_one_line_naming_the_key(text, message):
    """int() of 5000 digits and json of 100k nested lists raised tracebacks."""
    with pytest.raises(ConfigError, match=message):
        import_head_map(text, LLAMA_1B, name="x", origin="f")
    with pytest.raises(ConfigError, match="attn_head_set: cannot read"):
        import_head_map("8-" + "1" * 5000, LLAMA_1B, name="x", origin="f")
