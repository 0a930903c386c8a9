"""Head maps in GGUF metadata: the fast metadata reader, embed round trip, byte-identical tensors."""
from __future__ import annotations

import gguf
import pytest
from dysco_edge.heads.gguf import (
    embed_head_map,
    head_map_from_keys,
    head_map_keys,
    model_shape,
    read_embedded_head_map,
)
from dysco_edge.heads.gguf_meta import GGUFMetaError, read_gguf_metadata
from dysco_edge.heads.maps import HeadMapError, HeadMapMismatch, ModelShape
from heads_fixtures import SHAPE, head_map, tensor_bytes, write_gguf


@pytest.fixture
def model(tmp_path):
    return write_gguf(tmp_path / "model.gguf")


def test_metadata_reader_agrees_with_the_gguf_package(model):
    ours = read_gguf_metadata(model)
    reader = gguf.GGUFReader(str(model))
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value
    assert read_gguf_metadata(model, want=lambda k: k.startswith("llama.")) == {
        k: v for k, v in ours.items() if k.startswith("llama.")}
    assert model_shape(model).dims == SHAPE.dims


def test_metadata_reader_refuses_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(GGUFMetaError, match=r"x\.gguf: not a GGUF file"):
        read_gguf_metadata(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(4))
    with pytest.raises(GGUFMetaError, match=r"truncated"):
        read_gguf_metadata(tmp_path / "t.gguf")


def test_embed_round_trip_keeps_tensors_and_other_metadata(model, tmp_path):
    original = head_map()
    out = embed_head_map(model, original, tmp_path / "out.gguf")
    back = read_embedded_head_map(out)
    assert back == original and back.to_dict() == original.to_dict()
    assert back.qr_scores == original.qr_scores and back.config["top_p"] is None
    assert tensor_bytes(out) == tensor_bytes(model)
    before, after = read_gguf_metadata(model), read_gguf_metadata(out)
    assert {k: v for k, v in after.items() if not k.startswith("dysco.")} == before
    assert read_embedded_head_map(model) is None


def test_embedding_again_replaces_the_old_keys_in_place(model):
    embed_head_map(model, head_map(), model)
    smaller = head_map(name="Second", heads=((0, 1),), scores=False)
    embed_head_map(model, smaller, model)
    assert read_embedded_head_map(model) == smaller
    assert not any(k.startswith("dysco.qr_scores") for k in read_gguf_metadata(model))


def test_embed_refuses_a_map_of_another_shape_and_leaves_no_file(model, tmp_path):
    wide = ModelShape(architecture="llama", n_layer=4, n_head=16, n_head_kv=2, n_embd=128)
    with pytest.raises(HeadMapMismatch, match=r"cannot embed it in model\.gguf: .*expects 16 attention heads; "
                                              r"this model has 8"):
        embed_head_map(model, head_map(shape=wide), tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_failed_write_keeps_the_original(model, monkeypatch):
    before = model.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        embed_head_map(model, head_map(), model)
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.gguf"]


def test_embedded_keys_are_validated():
    keys = head_map_keys(head_map())
    assert keys["dysco.qr_heads.layer"] == [1, 3] and keys["dysco.config.top_p"] == "none"
    with pytest.raises(HeadMapError, match=r"m\.gguf: embedded head map has dysco\.version 2"):
        head_map_from_keys({**keys, "dysco.version": 2}, "m.gguf")
    with pytest.raises(HeadMapError, match=r"m\.gguf: embedded head map: unknown key dysco\.extra"):
        head_map_from_keys({**keys, "dysco.extra": 1}, "m.gguf")
    with pytest.raises(HeadMapError, match=r"qr_scores: expected 4 rows"):
        head_map_from_keys({**keys, "dysco.qr_scores": [0.5] * 8}, "m.gguf")
    with pytest.raises(HeadMapError, match=r"dysco\.qr_heads\.layer and dysco\.qr_heads\.head"):
        head_map_from_keys({**keys, "dysco.qr_heads.head": [1]}, "m.gguf")
    assert head_map_from_keys({"general.name": "x"}, "m.gguf") is None


def _nested_arrays_gguf(path, depth: int):
    """A GGUF whose second key is an array of arrays `depth` deep (then an empty array of uint32)."""
    import struct

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    body = struct.pack("<IQQ", 3, 0, 2) + text("general.architecture") + struct.pack("<I", 8) + text("llama")
    body += text("evil") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path.write_bytes(b"GGUF" + body)
    return path


@pytest.mark.parametrize("wanted", [True, False])  # decoded, or skipped past
def test_deeply_nested_arrays_are_a_clean_error(tmp_path, wanted):
    """5000-deep nested arrays made the metadata reader recurse until RecursionError."""
    path = _nested_arrays_gguf(tmp_path / "deep.gguf", 5000)
    with pytest.raises(GGUFMetaError, match=r"deep\.gguf: GGUF arrays nested more than"):
        read_gguf_metadata(path, want=lambda key: wanted)
    shallow = _nested_arrays_gguf(tmp_path / "shallow.gguf", 3)
    assert read_gguf_metadata(shallow)["evil"] == [[[[]]]]


def test_heads_show_on_deeply_nested_arrays_is_one_line(tmp_path, capsys):
    from dysco_edge import cli
    path = _nested_arrays_gguf(tmp_path / "deep.gguf", 5000)
    assert cli.main(["heads", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested more than" in err
