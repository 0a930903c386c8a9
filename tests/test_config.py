"""DyscoConfig: validation messages, our dict form, the authors' YAML, QRHead head lists."""

import json

import pytest

from dysco_edge.config import ConfigError, DyscoConfig, parse_head_pairs, parse_layer_head_list

HEADS = ((17, 24), (14, 31))


def test_defaults_are_the_dysco_config_values():
    config = DyscoConfig(qr_heads=HEADS)
    assert (config.top_k, config.top_p, config.strength, config.decay) == (4096, 0.975, 2.0, 0.75)
    assert (config.context_warmup, config.intervention_warmup, config.dynamic) == (8, "auto", True)
    assert config.template_sequences == ()


def test_values_are_normalised_to_tuples_and_plain_types():
    config = DyscoConfig(qr_heads=[[3, 4], (1, 2)], top_p=1, template_sequences=[[1, 2], (3,)])
    assert config.qr_heads == ((3, 4), (1, 2))
    assert config.template_sequences == ((1, 2), (3,))
    assert isinstance(config.top_p, float)
    assert hash(config) == hash(DyscoConfig(qr_heads=((3, 4), (1, 2)), top_p=1.0, template_sequences=((1, 2), (3,))))


def test_properties():
    config = DyscoConfig(qr_heads=[(2, 0), (9, 1), (4, 3)])
    assert config.l_max == 9
    assert not config.hard_mask
    assert config.replace(strength=99).hard_mask
    assert not config.replace(strength=98.9).hard_mask


@pytest.mark.parametrize(
    "field, value",
    [
        ("qr_heads", []),
        ("qr_heads", [(1, -2)]),
        ("qr_heads", [(1, 2, 3)]),
        ("qr_heads", [(1.5, 2)]),
        ("qr_heads", "17-24"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_p", True),
        ("top_k", 0),
        ("top_k", 4096.0),
        ("strength", 0),
        ("strength", -1.0),
        ("strength", float("inf")),
        ("decay", 1.0),
        ("decay", -0.1),
        ("context_warmup", -1),
        ("context_warmup", 2.5),
        ("intervention_warmup", "sometimes"),
        ("intervention_warmup", -3),
        ("template_sequences", [[]]),
        ("template_sequences", [[1, -2]]),
        ("template_sequences", ["<|im_start|>"]),
        ("dynamic", "yes"),
        ("dynamic", 1),
    ],
)
def test_each_bad_field_is_named_with_its_value(field, value):
    options = {"qr_heads": HEADS, field: value}
    with pytest.raises(ConfigError) as caught:
        DyscoConfig(**options)
    message = str(caught.value)
    assert message.startswith(f"{field}: "), message
    assert "got" in message


def test_bad_value_is_quoted_in_the_message():
    with pytest.raises(ConfigError, match=r"^top_p: expected a number in \(0, 1\] or None, got 1\.5$"):
        DyscoConfig(qr_heads=HEADS, top_p=1.5)


def test_top_p_and_top_k_cannot_both_be_unset():
    with pytest.raises(ConfigError, match=r"^top_p/top_k: at least one must be set"):
        DyscoConfig(qr_heads=HEADS, top_p=None, top_k=None)
    assert DyscoConfig(qr_heads=HEADS, top_p=None).top_k == 4096
    assert DyscoConfig(qr_heads=HEADS, top_k=None).top_p == 0.975


def test_duplicate_head_is_refused():
    with pytest.raises(ConfigError, match=r"^qr_heads: head \(1, 2\) is listed twice"):
        DyscoConfig(qr_heads=[(1, 2), (3, 4), (1, 2)])


def test_intervention_warmup_accepts_auto_and_ints():
    assert DyscoConfig(qr_heads=HEADS, intervention_warmup="AUTO").intervention_warmup == "auto"
    assert DyscoConfig(qr_heads=HEADS, intervention_warmup=0).intervention_warmup == 0


def test_replace_revalidates():
    config = DyscoConfig(qr_heads=HEADS)
    assert config.replace(top_k=64).top_k == 64
    assert config.top_k == 4096
    with pytest.raises(ConfigError, match=r"^decay: "):
        config.replace(decay=2.0)
    with pytest.raises(ConfigError, match=r"^topk: unknown option"):
        config.replace(topk=5)


def test_dict_round_trip_through_json():
    config = DyscoConfig(qr_heads=HEADS, top_p=None, template_sequences=[[1, 2]], dynamic=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["qr_heads"] == [[17, 24], [14, 31]]
    assert DyscoConfig.from_dict(data) == config


def test_from_dict_refuses_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"^decay_factor: unknown option"):
        DyscoConfig.from_dict({"qr_heads": HEADS, "decay_factor": 0.5})
    with pytest.raises(ConfigError, match=r"^qr_heads: missing"):
        DyscoConfig.from_dict({"top_k": 5})
    with pytest.raises(ConfigError, match=r"^config: expected a mapping"):
        DyscoConfig.from_dict([("qr_heads", HEADS)])


# ---- the authors' YAML ----

DYSCO_YAML = """\
# DySCO config for Llama-3.1-8B-Instruct
model_name_or_path: meta-llama/Llama-3.1-8B-Instruct   # ignored
selected_heads: "[(17, 24), (14, 31), (17, 26)]"
top_k: 4096
top_p: 0.975
strength: 2.0
decay_factor: 0.75
context_warmup_steps: 8
intervention_warmup: auto
dynamic_rescale: true
template_sequences: [[128006, 882, 128007], [128009]]
generation:
  max_new_tokens: 512
  temperature: 0.0
"""


def test_realistic_dysco_yaml():
    config = DyscoConfig.from_dysco_yaml(DYSCO_YAML)
    assert config == DyscoConfig(
        qr_heads=((17, 24), (14, 31), (17, 26)),
        top_k=4096,
        top_p=0.975,
        strength=2.0,
        decay=0.75,
        context_warmup=8,
        intervention_warmup="auto",
        template_sequences=((128006, 882, 128007), (128009,)),
        dynamic=True,
    )


def test_yaml_variants_null_numbers_block_and_multiline_lists():
    text = """\
selected_heads: '[[3, 1], [0, 2]]'
top_k: null
top_p: 0.9      # nucleus only
strength: 99
decay_factor: 0.5
intervention_warmup: 4
dynamic_rescale: False
template_sequences:
  - [1, 9690, 198]
  - [1, 4093, 198]
"""
    config = DyscoConfig.from_dysco_yaml(text)
    assert config.qr_heads == ((3, 1), (0, 2))
    assert (config.top_k, config.top_p, config.strength, config.decay) == (None, 0.9, 99.0, 0.5)
    assert config.hard_mask and config.intervention_warmup == 4 and config.dynamic is False
    assert config.template_sequences == ((1, 9690, 198), (1, 4093, 198))
    multiline = "selected_heads: \"[(1, 2)]\"\ntemplate_sequences: [\n  [5, 6],\n  [7],\n]\ntop_k: None\n"
    parsed = DyscoConfig.from_dysco_yaml(multiline)
    assert parsed.template_sequences == ((5, 6), (7,)) and parsed.top_k is None


def test_yaml_missing_keys_take_defaults():
    config = DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\n')
    assert config == DyscoConfig(qr_heads=((1, 2),))


def test_yaml_errors_name_the_yaml_key():
    with pytest.raises(ConfigError, match=r"^decay_factor: expected a number in \[0, 1\), got 1\.5"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\ndecay_factor: 1.5\n')
    with pytest.raises(ConfigError, match=r"^dynamic_rescale: expected true or false, got 'maybe'"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\ndynamic_rescale: maybe\n')
    with pytest.raises(ConfigError, match=r"^template_sequences: the list opened here is never closed"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\ntemplate_sequences: [[1, 2\n')
    with pytest.raises(ConfigError, match=r"^template_sequences: cannot read"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\ntemplate_sequences: [[1, 2], x]\n')
    with pytest.raises(ConfigError, match=r"^line 2: expected 'key: value'"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[(1, 2)]"\njust text\n')
    with pytest.raises(ConfigError, match=r"^selected_heads: missing"):
        DyscoConfig.from_dysco_yaml("top_k: 5\n")


def test_yaml_head_string_is_never_evaluated():
    with pytest.raises(ConfigError, match=r"^selected_heads: unexpected text"):
        DyscoConfig.from_dysco_yaml("selected_heads: \"__import__('os').system('true')\"\n")
    with pytest.raises(ConfigError, match=r"^selected_heads: no \(layer, head\) pairs"):
        DyscoConfig.from_dysco_yaml('selected_heads: "[]"\n')


def test_parse_head_pairs_forms():
    assert parse_head_pairs("[(17,24),(14,31)]") == ((17, 24), (14, 31))
    assert parse_head_pairs("[[17, 24], [14, 31]]") == ((17, 24), (14, 31))
    assert parse_head_pairs('"[(0, 0)]"') == ((0, 0),)


# ---- QRHead head lists ----


def test_qrhead_head_list():
    config = DyscoConfig.from_qrhead_heads("8-21,8-14,7-22", top_k=None)
    assert config.qr_heads == ((8, 21), (8, 14), (7, 22))
    assert config.top_k is None and config.top_p == 0.975
    assert parse_layer_head_list('attn_head_set: "8-21, 8-14"') == ((8, 21), (8, 14))
    assert parse_layer_head_list("8-21 8-14\n7-22") == ((8, 21), (8, 14), (7, 22))


def test_qrhead_head_list_errors():
    with pytest.raises(ConfigError, match=r"^attn_head_set: cannot read '8:21' as layer-head"):
        DyscoConfig.from_qrhead_heads("8-21,8:21")
    with pytest.raises(ConfigError, match=r"^attn_head_set: no layer-head pairs"):
        parse_layer_head_list("  ")
    with pytest.raises(ConfigError, match=r"^qr_heads: head \(8, 21\) is listed twice"):
        DyscoConfig.from_qrhead_heads("8-21,8-21")
