"""Head maps: a model's QR heads, the DySCO config they go with, and how to recognise the model.

One JSON file per model (schema: head_maps/README.md). The shipped ones are
installed in the wheel at `dysco_edge/head_maps/`; in a source checkout they
are read from the repository's top-level `head_maps/`.

A head map is chosen for a model by its exact shape (architecture, layers,
heads, KV heads, embedding width); name patterns only break ties. A map never
applies to a model of another shape: `check_head_map_fits` says why not.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..config import ConfigError, DyscoConfig, HeadPair
from ..errors import HeadMapError, HeadMapMismatch

__all__ = [
    "HeadMap",
    "HeadMapError",
    "HeadMapMismatch",
    "ModelShape",
    "check_head_map_fits",
    "dump_head_map",
    "find_head_map",
    "get_shipped_head_map",
    "shipped_head_map_file",
    "head_maps_dir",
    "load_head_map",
    "shipped_head_maps",
]

_SHAPE_FIELDS = ("architecture", "n_layer", "n_head", "n_head_kv", "n_embd")
_MAP_KEYS = {"name", "source", "qr_heads", "config", "match", "notes", "qr_scores", "detection"}
_OPTIONAL_KEYS = {"notes", "qr_scores", "detection"}
_MATCH_KEYS = {*_SHAPE_FIELDS, "name_patterns"}
_SHAPE_WORDING = {  # how a mismatch of each field is worded
    "n_layer": "{} layers",
    "n_head": "{} attention heads",
    "n_head_kv": "{} KV heads",
    "n_embd": "embedding width {}",
}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What identifies a model for head-map purposes (from its GGUF metadata)."""

    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture.strip():
            raise HeadMapError(f"architecture: expected a non-empty string, got {self.architecture!r}")
        object.__setattr__(self, "architecture", self.architecture.strip().lower())
        for key in _SHAPE_FIELDS[1:]:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HeadMapError(f"{key}: expected an int >= 1, got {value!r}")
        if not isinstance(self.name, str):
            raise HeadMapError(f"name: expected a string, got {self.name!r}")

    @property
    def dims(self) -> tuple[str, int, int, int, int]:
        """Everything but the name: two models with equal dims can share a head map."""
        return tuple(getattr(self, key) for key in _SHAPE_FIELDS)  # type: ignore[return-value]

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> ModelShape:
        """From GGUF key/value metadata (values may be strings, as llama-cpp-python gives them)."""
        arch = str(_require(metadata, "general.architecture"))
        names = [str(metadata.get("general.name", "")).strip()]
        basename, size = metadata.get("general.basename", ""), metadata.get("general.size_label", "")
        names.append(f"{basename} {size}".strip())
        return cls(
            architecture=arch,
            n_layer=_gguf_int(metadata, f"{arch}.block_count"),
            n_head=_gguf_int(metadata, f"{arch}.attention.head_count"),
            n_head_kv=_gguf_int(metadata, f"{arch}.attention.head_count_kv"),
            n_embd=_gguf_int(metadata, f"{arch}.embedding_length"),
            name=" | ".join(dict.fromkeys(n for n in names if n)),  # unique, in order
        )


@dataclass(frozen=True, kw_only=True)
class HeadMap:
    """A validated head map. `config` holds DyscoConfig options other than qr_heads."""

    name: str
    source: str
    qr_heads: tuple[HeadPair, ...]
    config: Mapping[str, Any] = field(hash=False)  # a read-only view: not hashable
    shape: ModelShape
    name_patterns: tuple[str, ...] = ()
    notes: str = ""
    qr_scores: tuple[tuple[float, ...], ...] | None = None  # every head's QRScore, [n_layer][n_head]
    detection: Mapping[str, Any] | None = field(default=None, hash=False)  # how a detected map was made

    def __post_init__(self) -> None:
        for key in ("name", "source"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise HeadMapError(f"{key}: expected a non-empty string, got {value!r}")
        if not isinstance(self.config, Mapping) or "qr_heads" in self.config:
            raise HeadMapError(f"config: expected a mapping of options without qr_heads, got {self.config!r}")
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "name_patterns", tuple(self.name_patterns))
        for pattern in self.name_patterns:
            if not isinstance(pattern, str):  # before the cached compile, which hashes it
                raise HeadMapError(f"match.name_patterns: expected regex strings, got {pattern!r}")
            _compile_pattern(pattern)
        try:  # the heads and options must make a valid DySCO config on their own
            object.__setattr__(self, "qr_heads", self.to_config().qr_heads)
        except ConfigError as err:
            raise HeadMapError(f"head map {self.name!r}: {err}") from None
        problems = heads_outside(self.qr_heads, self.shape)
        if problems:
            raise HeadMapError(f"head map {self.name!r} does not fit its own shape: {'; '.join(problems)}")
        if self.qr_scores is not None:
            object.__setattr__(self, "qr_scores", _check_qr_scores(self.qr_scores, self.shape))
        if self.detection is not None:
            object.__setattr__(self, "detection", MappingProxyType(_check_detection(self.detection)))

    def to_config(self, **overrides: Any) -> DyscoConfig:
        """The DySCO config of this map, with some options overridden (re-validated)."""
        return DyscoConfig.from_dict({**self.config, "qr_heads": self.qr_heads, **overrides})

    def matches_name(self, model_name: str) -> bool:
        return any(_compile_pattern(p).search(model_name) for p in self.name_patterns)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the inverse of `from_dict`)."""
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "qr_heads": [list(pair) for pair in self.qr_heads],
            "config": dict(self.config),
            "match": {f: getattr(self.shape, f) for f in _SHAPE_FIELDS},
        }
        out["match"]["name_patterns"] = list(self.name_patterns)
        if self.notes:
            out["notes"] = self.notes
        if self.qr_scores is not None:
            out["qr_scores"] = [list(row) for row in self.qr_scores]
        if self.detection is not None:
            out["detection"] = dict(self.detection)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadMap:
        """From the JSON form; missing and unknown keys are refused by name."""
        _require_keys(data, required=_MAP_KEYS - _OPTIONAL_KEYS, allowed=_MAP_KEYS, where="head map")
        match = data["match"]
        _require_keys(match, required=set(_SHAPE_FIELDS), allowed=_MATCH_KEYS, where="match")
        patterns = match.get("name_patterns", [])
        if isinstance(patterns, str) or not isinstance(patterns, Iterable):
            raise HeadMapError(f"match.name_patterns: expected a list of regexes, got {patterns!r}")
        return cls(
            name=data["name"],
            source=data["source"],
            qr_heads=data["qr_heads"],
            config=data["config"],
            shape=ModelShape(name=data["name"], **{f: match[f] for f in _SHAPE_FIELDS}),
            name_patterns=tuple(patterns),
            notes=data.get("notes", ""),
            qr_scores=data.get("qr_scores"),
            detection=data.get("detection"),
        )


def dump_head_map(head_map: HeadMap) -> str:
    """The JSON text of a head map: indented, with each list of numbers or strings on one line."""
    return _dump_json(head_map.to_dict(), "") + "\n"


def _dump_json(value: Any, indent: str) -> str:
    inner = indent + "  "
    if isinstance(value, Mapping) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dump_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (list, Mapping)) for v in value):
        return "[\n" + ",\n".join(inner + _dump_json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)  # a scalar, or a flat list kept on one line


class HugeNumber:
    """A JSON number too long to be any head-map value: kept as a placeholder, so that the check of
    the field it sits in refuses it by name (json.loads would fail on it without saying where)."""

    def __init__(self, text: str):
        self.digits = len(text)

    def __repr__(self) -> str:
        return f"a number of {self.digits} digits"


_MAX_DIGITS = 40  # any count, id or index a head map holds fits in far fewer
_MAX_MAP_BYTES = 64 << 20  # a shipped map with every head's scores is some kilobytes


def _number(text: str) -> int | HugeNumber:
    return int(text) if len(text) <= _MAX_DIGITS else HugeNumber(text)


def _real(text: str) -> float | HugeNumber:
    return float(text) if len(text) <= 4 * _MAX_DIGITS else HugeNumber(text)


def parse_head_map_json(text: str, where: str) -> Any:
    """JSON text as Python values, with overlong numbers as HugeNumber and nesting past what the
    parser recurses through refused in one line that names `where`."""
    try:
        return json.loads(text, parse_int=_number, parse_float=_real)
    except json.JSONDecodeError as err:
        raise HeadMapError(f"{where}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise HeadMapError(f"{where}: JSON nested deeper than Python parses; a head map nests 3 levels") from None


def load_head_map(path: str | Path | Traversable) -> HeadMap:
    """Read and validate one head-map JSON file; errors name the file."""
    source = Path(path) if isinstance(path, str) else path
    try:
        raw = source.read_bytes()
        if len(raw) > _MAX_MAP_BYTES:
            raise HeadMapError(f"{path}: {len(raw)} bytes, not a head map (they are kilobytes)")
        data = parse_head_map_json(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise HeadMapError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return HeadMap.from_dict(data)
    except (HeadMapError, ConfigError) as err:
        raise HeadMapError(f"{path}: {err}") from None


def head_maps_dir() -> Traversable:
    """The installed `dysco_edge/head_maps/`, else the source checkout's top-level `head_maps/`."""
    packaged = importlib.resources.files("dysco_edge") / "head_maps"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "head_maps"


@functools.lru_cache(maxsize=1)
def shipped_head_maps() -> tuple[HeadMap, ...]:
    """Every shipped head map, sorted by name (read once; the objects are immutable)."""
    folder = head_maps_dir()
    files = [entry for entry in folder.iterdir() if entry.name.endswith(".json")]
    return tuple(sorted((load_head_map(entry) for entry in files), key=lambda m: m.name))


def shipped_head_map_file(stem: str) -> HeadMap | None:
    """head_maps/<stem>.json, or None when no such map is shipped (yet)."""
    entry = head_maps_dir() / f"{stem}.json"
    return load_head_map(entry) if entry.is_file() else None


def get_shipped_head_map(name: str) -> HeadMap:
    """A shipped head map by its name (case-insensitive), e.g. "Qwen3-8B"."""
    maps = shipped_head_maps()
    for head_map in maps:
        if head_map.name.lower() == name.strip().lower():
            return head_map
    known = ", ".join(m.name for m in maps)
    raise HeadMapError(f"no shipped head map named {name!r} (shipped: {known})")


def find_head_map(shape: ModelShape, *, head_maps: Iterable[HeadMap] | None = None) -> HeadMap | None:
    """The head map for a model: exact shape match required; name patterns break ties.

    Returns None when no map has this shape. Several maps of this shape that
    the model's name cannot tell apart are an error (choose one explicitly).
    """
    pool = shipped_head_maps() if head_maps is None else head_maps
    candidates = [m for m in pool if m.shape.dims == shape.dims]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    named = [m for m in candidates if m.matches_name(shape.name)]
    if len(named) == 1:
        return named[0]
    tied = ", ".join(m.name for m in (named or candidates))
    raise HeadMapError(
        f"several head maps fit this model's shape ({tied}) and its name {shape.name!r} "
        "does not pick one; choose one explicitly"
    )


def check_head_map_fits(head_map: HeadMap, shape: ModelShape, *, exact_shape: bool = True) -> None:
    """Raise HeadMapMismatch naming every way the map does not fit the model.

    With exact_shape=False only the QR heads must exist in the model (for a
    map deliberately applied to a model of another shape).
    """
    problems = _shape_differences(head_map, shape) if exact_shape else []
    outside = heads_outside(head_map.qr_heads, shape)
    problems += outside[:3]  # the rest would only repeat the point
    if len(outside) > 3:
        problems.append(f"and {len(outside) - 3} more QR heads outside the model")
    if problems:
        raise HeadMapMismatch("; ".join(problems))


# ---- helpers ----

def _shape_differences(head_map: HeadMap, shape: ModelShape) -> list[str]:
    expected = head_map.shape
    problems = []
    if expected.architecture != shape.architecture:
        problems.append(
            f"head map {head_map.name!r} is for architecture {expected.architecture!r}; "
            f"this model is {shape.architecture!r}"
        )
    for key, words in _SHAPE_WORDING.items():
        want, have = getattr(expected, key), getattr(shape, key)
        if want != have:
            problems.append(
                f"head map {head_map.name!r} expects {words.format(want)}; this model has {words.format(have)}"
            )
    return problems


def heads_outside(qr_heads: Iterable[HeadPair], shape: ModelShape) -> list[str]:
    problems = []
    for layer, head in qr_heads:
        if layer >= shape.n_layer:
            where = f"layer {layer} does not exist in this model ({shape.n_layer} layers, 0-{shape.n_layer - 1})"
        elif head >= shape.n_head:
            where = f"head {head} does not exist in this model ({shape.n_head} heads per layer, 0-{shape.n_head - 1})"
        else:
            continue
        problems.append(f"QR head ({layer}, {head}): {where}")
    return problems


def _check_qr_scores(scores: Any, shape: ModelShape) -> tuple[tuple[float, ...], ...]:
    """One finite number per head: n_layer rows of n_head scores."""
    expected = f"{shape.n_layer} rows (layers) of {shape.n_head} numbers (heads)"
    rows = _sequence(scores, f"qr_scores: expected {expected}")
    if len(rows) != shape.n_layer:
        raise HeadMapError(f"qr_scores: expected {expected}, got {len(rows)} rows")
    out = []
    for layer, row in enumerate(rows):
        values = _sequence(row, f"qr_scores[{layer}]: expected {shape.n_head} numbers")
        if len(values) != shape.n_head or not all(_finite_number(v) for v in values):
            raise HeadMapError(f"qr_scores[{layer}]: expected {shape.n_head} finite numbers, got {row!r}")
        out.append(tuple(float(v) for v in values))
    return tuple(out)


def _check_detection(detection: Any) -> dict[str, Any]:
    """Free-form facts about a detection run; flat, JSON scalars only (they go into GGUF metadata too)."""
    if not isinstance(detection, Mapping):
        raise HeadMapError(f"detection: expected a JSON object, got {detection!r}")
    for key, value in detection.items():
        if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise HeadMapError(f"detection: key {key!r} must be lowercase letters, digits and _")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise HeadMapError(f"detection.{key}: expected a string, number, boolean or null, got {value!r}")
    return dict(detection)


def _sequence(value: Any, message: str) -> tuple:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise HeadMapError(f"{message}, got {value!r}")
    return tuple(value)


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=256)
def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise HeadMapError(f"match.name_patterns: {pattern!r} is not a valid regex ({err})") from None


def _require_keys(data: Any, *, required: set[str], allowed: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise HeadMapError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(required - set(data))
    unknown = sorted(str(k) for k in set(data) - allowed)
    if missing:
        raise HeadMapError(f"{where}: missing key {missing[0]!r}")
    if unknown:
        raise HeadMapError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise HeadMapError(f"GGUF metadata: missing {key!r}")
    return metadata[key]


def _gguf_int(metadata: Mapping[str, Any], key: str) -> int:
    """An integer GGUF field; a per-layer array is accepted when all its entries agree."""
    value = _require(metadata, key)
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        distinct = {int(v) for v in values}
    except (TypeError, ValueError):
        raise HeadMapError(f"GGUF metadata: {key} = {value!r} is not an integer") from None
    if len(distinct) != 1:
        raise HeadMapError(f"GGUF metadata: {key} = {value!r} varies per layer; head maps need one value")
    return distinct.pop()
