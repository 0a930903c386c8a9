"""Turn the authors' head lists into head maps for a given model shape.

Two formats are read:
- DySCO YAML configs: `selected_heads: "[(17, 24), ...]"` plus decoding options
  (top_k, top_p, strength, decay_factor, ...), read by `DyscoConfig.from_dysco_yaml`.
- QRHead head sets: `attn_head_set: "8-21,8-14,..."` (a config file, or the bare list).
  QRHead publishes heads only, so the map gets the DySCO configs' options.
"""
from __future__ import annotations

from typing import Any

from ..config import ConfigError, DyscoConfig, parse_layer_head_list
from ..flat_yaml import FlatYamlError, read_flat_yaml
from .maps import HeadMap, ModelShape

__all__ = ["detect_format", "import_head_map", "map_config"]

_MAP_OPTIONS = ("top_k", "top_p", "strength", "decay", "context_warmup", "intervention_warmup")


def map_config(config: DyscoConfig) -> dict[str, Any]:
    """A head map's `config`: the decoding options, without the heads and template ids.

    Template token ids belong to one tokenizer; dysco-edge fills them from the
    model's chat template at run time, so a map never carries them.
    """
    out = {key: getattr(config, key) for key in _MAP_OPTIONS}
    if not config.dynamic:
        out["dynamic"] = False
    return out


def detect_format(text: str) -> str:
    """"dysco-yaml" (has selected_heads) or "qrhead" (attn_head_set, or a bare "8-21,8-14" list)."""
    if "selected_heads" in text:
        return "dysco-yaml"
    if "attn_head_set" in text or ":" not in text:
        return "qrhead"
    raise ConfigError("cannot tell the format: expected a DySCO YAML config (with selected_heads) "
                      "or a QRHead head set (attn_head_set: \"8-21,8-14,...\")")


def import_head_map(text: str, shape: ModelShape, *, name: str, origin: str,
                    name_patterns: tuple[str, ...] = ()) -> HeadMap:
    """A head map for `shape` from a DySCO YAML or QRHead text; `origin` names the file in `source`."""
    kind = detect_format(text)
    config = DyscoConfig.from_dysco_yaml(text) if kind == "dysco-yaml" else _qrhead_config(text)
    source = "DySCO config" if kind == "dysco-yaml" else "QRHead"
    return HeadMap(name=name, source=f"{source} (imported from {origin})", qr_heads=config.qr_heads,
                   config=map_config(config), shape=ModelShape(**{**vars(shape), "name": name}),
                   name_patterns=name_patterns)


def _qrhead_config(text: str) -> DyscoConfig:
    if ":" not in text:  # the bare list
        return DyscoConfig(qr_heads=parse_layer_head_list(text))
    try:
        raw = read_flat_yaml(text)
    except FlatYamlError as err:
        raise ConfigError(str(err)) from None
    if "attn_head_set" not in raw:
        raise ConfigError("attn_head_set: missing from the QRHead config")
    return DyscoConfig(qr_heads=parse_layer_head_list(raw["attn_head_set"]))
