"""Head maps inside a GGUF file: written as `dysco.*` metadata keys, read back, checked.

Keys (layout version 1; the table is in head_maps/README.md):
  dysco.version                      int64   1
  dysco.name, dysco.source           string
  dysco.notes                        string  (optional)
  dysco.qr_heads.layer / .head       int32[] the QR heads, pair i = (layer[i], head[i])
  dysco.config.<option>              one key per DySCO option (int64/float64/bool/string; None is "none")
  dysco.match.<field>                the shape the map was made for; name_patterns a string[]
  dysco.qr_scores                    float64[] every head's QRScore, layer-major (optional)
  dysco.detection.<key>              facts about the detection run (optional)

Writing copies every other key and every tensor unchanged (tensor bytes are
identical) into a temporary file next to the output, renamed into place only
when complete: an error never leaves a half-written output or touches the input.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .gguf_meta import read_gguf_metadata
from .maps import (
    HeadMap,
    HeadMapError,
    HeadMapMismatch,
    ModelShape,
    check_head_map_fits,
)

__all__ = ["DYSCO_PREFIX", "embed_head_map", "head_map_from_keys", "head_map_keys", "read_embedded_head_map"]

DYSCO_PREFIX = "dysco."
FORMAT_VERSION = 1
_NONE = "none"  # GGUF has no null; an unset option (top_p None) is stored as this string


def head_map_keys(head_map: HeadMap) -> dict[str, Any]:
    """The `dysco.*` metadata of a head map: key -> plain value (typed by `_gguf_type`)."""
    data = head_map.to_dict()
    keys: dict[str, Any] = {"dysco.version": FORMAT_VERSION, "dysco.name": data["name"], "dysco.source": data["source"]}
    if data.get("notes"):
        keys["dysco.notes"] = data["notes"]
    keys["dysco.qr_heads.layer"] = [layer for layer, _ in head_map.qr_heads]
    keys["dysco.qr_heads.head"] = [head for _, head in head_map.qr_heads]
    for section in ("config", "match", "detection"):
        for name, value in (data.get(section) or {}).items():
            if value != []:  # GGUF refuses empty arrays; an absent list reads back as empty
                keys[f"dysco.{section}.{name}"] = _NONE if value is None else value
    if head_map.qr_scores is not None:
        keys["dysco.qr_scores"] = [score for row in head_map.qr_scores for score in row]
    return keys


def head_map_from_keys(keys: dict[str, Any], where: str) -> HeadMap | None:
    """The head map stored in `dysco.*` metadata (None when there is none); validated."""
    found = {k[len(DYSCO_PREFIX):]: v for k, v in keys.items() if k.startswith(DYSCO_PREFIX)}
    if not found:
        return None
    version = found.pop("version", None)
    if version != FORMAT_VERSION:
        raise HeadMapError(f"{where}: embedded head map has dysco.version {version!r}; this dysco-edge reads "
                           f"version {FORMAT_VERSION} (upgrade dysco-edge or embed the map again)")
    try:
        return HeadMap.from_dict(_json_form(found))
    except (HeadMapError, ValueError) as err:
        raise HeadMapError(f"{where}: embedded head map: {err}") from None


def read_embedded_head_map(path: str | Path) -> HeadMap | None:
    """The head map embedded in a GGUF file, or None."""
    keys = read_gguf_metadata(path, want=lambda key: key.startswith(DYSCO_PREFIX))
    return head_map_from_keys(keys, f"{Path(path).name}")


def model_shape(path: str | Path) -> ModelShape:
    """A GGUF's shape from its metadata (fast: tokenizer arrays are skipped)."""
    meta = read_gguf_metadata(path, want=lambda key: not key.startswith("tokenizer."))
    return ModelShape.from_gguf_metadata(meta)


def embed_head_map(src: str | Path, head_map: HeadMap, dst: str | Path) -> Path:
    """Write `dst`: `src` with `head_map` as its `dysco.*` keys (old ones replaced). dst may be src."""
    src, dst = Path(src), Path(dst)
    try:
        check_head_map_fits(head_map, model_shape(src))
    except HeadMapMismatch as err:
        raise HeadMapMismatch(f"cannot embed it in {src.name}: {err}") from None
    tmp = dst.with_name(f".{dst.name}.dysco-tmp-{os.getpid()}")
    try:
        _write_copy(src, tmp, head_map_keys(head_map))
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


# ---- helpers ----

def _json_form(found: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the head map's JSON form from key suffixes (e.g. "config.top_k")."""
    layers, heads = found.pop("qr_heads.layer", None), found.pop("qr_heads.head", None)
    if not isinstance(layers, list) or not isinstance(heads, list) or len(layers) != len(heads):
        raise HeadMapError("dysco.qr_heads.layer and dysco.qr_heads.head must be int arrays of equal length")
    data: dict[str, Any] = {"qr_heads": [list(pair) for pair in zip(layers, heads)], "config": {}, "match": {}}
    for key, value in found.items():
        section, _, name = key.partition(".")
        if section in ("config", "match", "detection") and name:
            data.setdefault(section, {})[name] = None if value == _NONE else value
        elif key in ("name", "source", "notes", "qr_scores"):
            data[key] = value
        else:
            raise HeadMapError(f"unknown key dysco.{key}")
    if "qr_scores" in data:
        data["qr_scores"] = _rows(data["qr_scores"], data["match"].get("n_head"))
    return data


def _rows(flat: Any, n_head: Any) -> Any:
    """Layer-major flat scores back into rows of n_head (left as is when they do not divide)."""
    if not isinstance(flat, list) or not isinstance(n_head, int) or n_head < 1 or len(flat) % n_head:
        return flat  # HeadMap's own check names the problem
    return [flat[i:i + n_head] for i in range(0, len(flat), n_head)]


def _gguf_type(value: Any):
    """(value type, array item type) for a plain value; ints are int64, floats float64 (exact)."""
    import gguf

    t = gguf.GGUFValueType
    scalar = {bool: t.BOOL, int: t.INT64, float: t.FLOAT64, str: t.STRING}
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        if kinds == {int, float}:  # JSON may write 1.0 as 1
            kinds = {float}
        if len(kinds) != 1 or next(iter(kinds)) not in scalar:
            raise HeadMapError(f"cannot store {value!r} in GGUF metadata: mixed or nested array")
        item = next(iter(kinds))
        return t.ARRAY, scalar[item] if item is not int else t.INT32
    if type(value) not in scalar:
        raise HeadMapError(f"cannot store {value!r} in GGUF metadata")
    return scalar[type(value)], None


def _write_copy(src: Path, dst: Path, new_keys: dict[str, Any]) -> None:
    """Copy src to dst with every `dysco.*` key replaced by new_keys; tensors copied as raw bytes."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", DYSCO_PREFIX)) or key == "general.architecture":
            continue  # GGUF.* are the reader's own entries; the writer adds the architecture itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in new_keys.items():
        vtype, sub_type = _gguf_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
