"""Which head map a model gets: user map > embedded > shipped > user folder; misfits refused."""
from __future__ import annotations

import json

import pytest
from dysco_edge import cli
from dysco_edge.heads.lookup import (
    locate_head_map,
    no_head_map_message,
    user_head_map_dirs,
)
from dysco_edge.heads.maps import (
    HeadMapError,
    HeadMapMismatch,
    ModelShape,
    dump_head_map,
)
from heads_fixtures import SHAPE, head_map, write_gguf

LLAMA_1B = ModelShape(architecture="llama", n_layer=16, n_head=32, n_head_kv=8, n_embd=2048)


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "user-maps"
    folder.mkdir()
    monkeypatch.setenv("DYSCO_HEAD_MAPS", str(folder))
    return folder


def test_embedded_beats_shipped_and_the_user_map_beats_both(tmp_path):
    plain = write_gguf(tmp_path / "plain.gguf", shape=LLAMA_1B)
    assert locate_head_map(LLAMA_1B, plain).describe() == "Llama-3.2-1B-Instruct (shipped head map)"
    mine = head_map(name="Mine", shape=LLAMA_1B, heads=((2, 30),))
    with_heads = write_gguf(tmp_path / "with-heads.gguf", shape=LLAMA_1B, embedded=mine)
    found = locate_head_map(LLAMA_1B, with_heads)
    assert (found.origin, found.head_map) == ("embedded", mine)
    assert found.describe() == "Mine (embedded in with-heads.gguf)"
    user = head_map(name="User", shape=LLAMA_1B, heads=((0, 0),))
    found = locate_head_map(LLAMA_1B, with_heads, user_map=user, user_map_path="u.json")
    assert (found.head_map.name, found.where) == ("User", "head map u.json")


def test_user_folder_is_last(tmp_path, user_dir):
    model = write_gguf(tmp_path / "m.gguf")
    assert locate_head_map(SHAPE, model) is None
    (user_dir / "synthetic.json").write_text(dump_head_map(head_map()))
    found = locate_head_map(SHAPE, model)
    assert found.origin == "user-dir" and found.describe() == f"Synthetic (user head map {user_dir / 'synthetic.json'})"
    shipped_shape = write_gguf(tmp_path / "s.gguf", shape=LLAMA_1B)
    (user_dir / "same-as-shipped.json").write_text(dump_head_map(head_map(name="Shadow", shape=LLAMA_1B)))
    assert locate_head_map(LLAMA_1B, shipped_shape).origin == "shipped"


def test_a_broken_user_map_is_named(tmp_path, user_dir):
    (user_dir / "broken.json").write_text("{")
    with pytest.raises(HeadMapError, match=r"broken\.json: not valid JSON .*fix or remove the file"):
        locate_head_map(SHAPE, write_gguf(tmp_path / "m.gguf"))


def test_misfitting_maps_are_refused_with_the_mismatch(tmp_path):
    wide = ModelShape(architecture="llama", n_layer=4, n_head=16, n_head_kv=2, n_embd=128)
    model = write_gguf(tmp_path / "m.gguf", embedded=head_map(shape=wide, heads=((1, 12),)))
    with pytest.raises(HeadMapMismatch, match=r"the head map embedded in m\.gguf does not fit it: .*expects 16 "
                                              r"attention heads; this model has 8.*--head-map"):
        locate_head_map(SHAPE, model)
    with pytest.raises(HeadMapMismatch, match=r"QR head \(1, 12\): head 12 does not exist"):
        locate_head_map(SHAPE, model, user_map=head_map(shape=wide, heads=((1, 12),)))


def test_no_map_message_says_how_to_detect_and_pass_heads(tmp_path, monkeypatch):
    message = no_head_map_message(SHAPE, tmp_path / "m.gguf")
    assert f"dysco-edge heads detect {tmp_path / 'm.gguf'} -o heads.json" in message
    assert "--head-map heads.json" in message and "dysco-edge heads embed" in message
    monkeypatch.delenv("DYSCO_HEAD_MAPS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert user_head_map_dirs() == [tmp_path / "cfg" / "dysco-edge" / "head_maps"]


def test_cli_show(tmp_path, capsys):
    model = write_gguf(tmp_path / "m.gguf", shape=LLAMA_1B)
    assert cli.main(["heads", "show", str(model)]) == 0
    out = capsys.readouterr().out
    assert "QR heads: Llama-3.2-1B-Instruct (shipped head map)" in out
    assert "probe cost: layers 0-11, (L_max+1)/L = 12/16 = 0.75 of a pass" in out
    bare = write_gguf(tmp_path / "bare.gguf")
    assert cli.main(["heads", "show", str(bare)]) == 1
    assert "dysco-edge heads detect" in capsys.readouterr().err
    (tmp_path / "map.json").write_text(json.dumps(head_map(shape=LLAMA_1B, heads=((10, 20),)).to_dict()))
    assert cli.main(["heads", "show", str(bare), "--head-map", str(tmp_path / "map.json")]) == 2
    err = capsys.readouterr().err
    assert err == "dysco-edge: error: QR head (10, 20): layer 10 does not exist in this model (4 layers, 0-3)\n"
