"""Head maps: every shipped map loads and fits its shape; lookup and mismatch messages."""

import json

import pytest

from dysco_edge.config import DyscoConfig
from dysco_edge.heads.maps import (
    HeadMap,
    HeadMapError,
    HeadMapMismatch,
    ModelShape,
    check_head_map_fits,
    find_head_map,
    get_shipped_head_map,
    load_head_map,
    shipped_head_maps,
)

SHIPPED = {
    # name: (architecture, n_layer, n_head, n_head_kv, n_embd, number of heads, typical GGUF general.name)
    "Qwen3-8B": ("qwen3", 36, 32, 8, 4096, 16, "Qwen3 8B"),
    "Qwen3-4B": ("qwen3", 36, 32, 8, 2560, 16, "Qwen3-4B"),
    "Llama-3.1-8B-Instruct": ("llama", 32, 32, 8, 4096, 16, "Meta Llama 3.1 8B Instruct"),
    "Llama-3.2-1B-Instruct": ("llama", 16, 32, 8, 2048, 16, "Llama 3.2 1B Instruct"),
    "Llama-3.2-3B-Instruct": ("llama", 28, 24, 8, 3072, 16, "Llama-3.2-3B-Instruct"),
    "Qwen2.5-7B-Instruct": ("qwen2", 28, 28, 4, 3584, 16, "Qwen2.5 7B Instruct"),
    "Llama-3.1-70B-Instruct": ("llama", 80, 64, 8, 8192, 32, "Meta-Llama-3.1-70B-Instruct"),
    "SmolLM2-135M-Instruct": ("llama", 30, 9, 3, 576, 16, "Smollm2 135M 8k Lc100K Mix1 Ep2 | smollm2 135M"),
    "Gemma-3-270M": ("gemma3", 18, 4, 1, 640, 16, "Gemma 3 270m | gemma-3 270M"),
    "Qwen2.5-Coder-1.5B-Instruct": ("qwen2", 28, 12, 2, 1536, 16, "Qwen2.5 Coder 1.5B Instruct GGUF"),
}


def shape_of(name, model_name=None):
    arch, n_layer, n_head, n_head_kv, n_embd, _, gguf_name = SHIPPED[name]
    return ModelShape(
        architecture=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_embd=n_embd,
        name=gguf_name if model_name is None else model_name,
    )


def make_map(name="Test", heads=((1, 2),), n_layer=4, patterns=()):
    return HeadMap(
        name=name, source="test", qr_heads=heads, config={"top_k": 8},
        shape=ModelShape(architecture="llama", n_layer=n_layer, n_head=4, n_head_kv=2, n_embd=64),
        name_patterns=patterns,
    )


def test_every_shipped_map_loads_and_fits_its_shape():
    maps = {m.name: m for m in shipped_head_maps()}
    assert set(maps) == set(SHIPPED)
    for name, head_map in maps.items():
        config = head_map.to_config()
        assert isinstance(config, DyscoConfig)
        assert len(config.qr_heads) == SHIPPED[name][5]
        assert (config.top_k, config.top_p, config.strength, config.decay) == (4096, 0.975, 2.0, 0.75)
        assert (config.context_warmup, config.intervention_warmup) == (8, "auto")
        check_head_map_fits(head_map, shape_of(name))


def test_shipped_heads_match_the_published_lists():
    assert get_shipped_head_map("qwen3-8b").qr_heads[:3] == ((21, 31), (21, 18), (20, 15))
    assert get_shipped_head_map("Llama-3.1-8B-Instruct").qr_heads[-1] == (19, 3)
    assert get_shipped_head_map("Llama-3.1-70B-Instruct").qr_heads[26] == (64, 31)
    assert get_shipped_head_map("Qwen2.5-7B-Instruct").source == "QRHead (NQ)"


def test_find_head_map_by_shape_and_name():
    for name in SHIPPED:
        assert find_head_map(shape_of(name)).name == name
        assert find_head_map(shape_of(name, model_name="my fine-tune")).name == name
    smol = ModelShape(architecture="llama", n_layer=30, n_head=9, n_head_kv=3, n_embd=576, name="SmolLM2 135M")
    assert find_head_map(smol).name == "SmolLM2-135M-Instruct"
    other = ModelShape(architecture="llama", n_layer=22, n_head=32, n_head_kv=4, n_embd=2048, name="TinyLlama 1.1B")
    assert find_head_map(other) is None


def test_shipped_name_patterns_match_typical_gguf_names():
    for name in SHIPPED:
        assert get_shipped_head_map(name).matches_name(SHIPPED[name][6])
    assert not get_shipped_head_map("Qwen3-8B").matches_name("Qwen3 4B")


def test_name_patterns_break_ties_and_ambiguity_is_an_error():
    first, second = make_map("First", patterns=["alpha"]), make_map("Second", patterns=["beta"])
    shape = first.shape
    assert find_head_map(ModelShape(**{**vars(shape), "name": "Beta 1B"}), head_maps=[first, second]).name == "Second"
    with pytest.raises(HeadMapError, match=r"several head maps fit this model's shape \(First, Second\)"):
        find_head_map(ModelShape(**{**vars(shape), "name": "gamma"}), head_maps=[first, second])


def test_shape_mismatch_is_named():
    qwen = get_shipped_head_map("Qwen3-8B")
    other = ModelShape(architecture="qwen3", n_layer=30, n_head=32, n_head_kv=8, n_embd=4096)
    with pytest.raises(HeadMapMismatch, match=r"head map 'Qwen3-8B' expects 36 layers; this model has 30"):
        check_head_map_fits(qwen, other)
    llama = ModelShape(architecture="llama", n_layer=36, n_head=32, n_head_kv=8, n_embd=4096)
    with pytest.raises(HeadMapMismatch, match=r"is for architecture 'qwen3'; this model is 'llama'"):
        check_head_map_fits(qwen, llama)


def test_heads_outside_the_model_are_named():
    head_map = make_map(heads=((40, 3), (2, 1)), n_layer=48)
    small = ModelShape(architecture="llama", n_layer=30, n_head=4, n_head_kv=2, n_embd=64)
    expected = r"^QR head \(40, 3\): layer 40 does not exist in this model \(30 layers, 0-29\)$"
    with pytest.raises(HeadMapMismatch, match=expected):
        check_head_map_fits(head_map, small, exact_shape=False)
    narrow = make_map(heads=((1, 3),))
    with pytest.raises(HeadMapMismatch, match=r"head 3 does not exist in this model \(2 heads per layer, 0-1\)"):
        check_head_map_fits(narrow, ModelShape(architecture="llama", n_layer=4, n_head=2, n_head_kv=2, n_embd=64), exact_shape=False)


def test_to_config_overrides_are_validated():
    head_map = get_shipped_head_map("Qwen3-4B")
    assert head_map.to_config(top_k=64, template_sequences=[[1, 2]]).top_k == 64
    with pytest.raises(ValueError, match=r"^strength: "):
        head_map.to_config(strength=-1)


def test_json_round_trip(tmp_path):
    head_map = get_shipped_head_map("Llama-3.2-3B-Instruct")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(head_map.to_dict()))
    assert load_head_map(path) == head_map


def write(tmp_path, data):
    path = tmp_path / "map.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_files_are_refused_with_file_and_field(tmp_path):
    good = get_shipped_head_map("Qwen3-8B").to_dict()
    with pytest.raises(HeadMapError, match=r"map\.json: not valid JSON"):
        load_head_map(write(tmp_path, "{"))
    with pytest.raises(HeadMapError, match=r"map\.json: head map: missing key 'source'"):
        load_head_map(write(tmp_path, {k: v for k, v in good.items() if k != "source"}))
    with pytest.raises(HeadMapError, match=r"map\.json: head map: unknown key 'heads'"):
        load_head_map(write(tmp_path, {**good, "heads": []}))
    with pytest.raises(HeadMapError, match=r"map\.json: match: missing key 'n_embd'"):
        load_head_map(write(tmp_path, {**good, "match": {k: v for k, v in good["match"].items() if k != "n_embd"}}))
    with pytest.raises(HeadMapError, match=r"head map 'Qwen3-8B': decay: expected"):
        load_head_map(write(tmp_path, {**good, "config": {**good["config"], "decay": 3}}))
    with pytest.raises(HeadMapError, match=r"does not fit its own shape: QR head \(40, 0\): layer 40"):
        load_head_map(write(tmp_path, {**good, "qr_heads": [[40, 0]]}))
    with pytest.raises(HeadMapError, match=r"is not a valid regex"):
        load_head_map(write(tmp_path, {**good, "match": {**good["match"], "name_patterns": ["("]}}))


def test_unknown_shipped_name():
    with pytest.raises(HeadMapError, match=r"no shipped head map named 'Mistral-7B' \(shipped: "):
        get_shipped_head_map("Mistral-7B")


def test_model_shape_from_gguf_metadata():
    metadata = {
        "general.architecture": "qwen3",
        "general.name": "Qwen3 8B",
        "general.basename": "Qwen3",
        "general.size_label": "8B",
        "qwen3.block_count": "36",
        "qwen3.attention.head_count": "32",
        "qwen3.attention.head_count_kv": "8",
        "qwen3.embedding_length": "4096",
    }
    shape = ModelShape.from_gguf_metadata(metadata)
    assert shape.dims == ("qwen3", 36, 32, 8, 4096)
    assert shape.name == "Qwen3 8B"  # basename + size label is the same text: kept once
    assert find_head_map(shape).name == "Qwen3-8B"
    with pytest.raises(HeadMapError, match=r"missing 'qwen3.block_count'"):
        ModelShape.from_gguf_metadata({k: v for k, v in metadata.items() if k != "qwen3.block_count"})


def _with_raw(good: dict, path_in_config: str, raw: str) -> str:
    """The map's JSON text with one config value replaced by raw text (json.dumps cannot write a
    5000-digit number as a literal on purpose)."""
    marker = "__RAW__"
    return json.dumps({**good, "config": {**good["config"], path_in_config: marker}}).replace(f'"{marker}"', raw)


def test_hostile_numbers_and_nesting_are_one_line_naming_file_and_field(tmp_path):
    """5000-digit ints and 100k-deep JSON raised ValueError / RecursionError with tracebacks."""
    good = get_shipped_head_map("Qwen3-8B").to_dict()
    with pytest.raises(HeadMapError, match=r"map\.json: .*top_k: expected .*got a number of 5000 digits"):
        load_head_map(write(tmp_path, _with_raw(good, "top_k", "9" * 5000)))
    with pytest.raises(HeadMapError, match=r"map\.json: .*strength: expected .*got a number of 5002 digits"):
        load_head_map(write(tmp_path, _with_raw(good, "strength", "1" * 5000 + ".5")))
    huge_layers = json.dumps({**good, "match": {**good["match"], "n_layer": 7}}).replace(
        '"n_layer": 7', '"n_layer": ' + "7" * 5000)
    with pytest.raises(HeadMapError, match=r"map\.json: n_layer: expected an int >= 1, got a number of 5000"):
        load_head_map(write(tmp_path, huge_layers))
    with pytest.raises(HeadMapError, match=r"map\.json: match\.name_patterns: expected regex strings, got \[\]"):
        load_head_map(write(tmp_path, {**good, "match": {**good["match"], "name_patterns": [[]]}}))  # was TypeError
    with pytest.raises(HeadMapError, match=r"map\.json: JSON nested deeper than Python parses"):
        load_head_map(write(tmp_path, "[" * 100_000 + "]" * 100_000))
    with pytest.raises(HeadMapError, match=r"map\.json: .*qr_heads: expected"):
        load_head_map(write(tmp_path, json.dumps({**good, "qr_heads": "__RAW__"}).replace(
            '"__RAW__"', "[" * 500 + "]" * 500)))


@pytest.mark.parametrize("field, value", [("top_k", 2**31), ("context_warmup", 10**12),
                                          ("intervention_warmup", 10**12)])
def test_numbers_past_what_c_takes_are_refused_at_load_naming_file_and_field(tmp_path, field, value):
    """top_k >= 2**31 failed at the first decode; a warmup of 10**12 hung the decode loop. The ranges
    are config.py's (one validation layer, the harden-core branch): a head map goes through it."""
    good = get_shipped_head_map("Qwen3-8B").to_dict()
    with pytest.raises(HeadMapError, match=rf"map\.json: .*{field}: expected"):
        load_head_map(write(tmp_path, {**good, "config": {**good["config"], field: value}}))
