"""DySCO decoding options: the inputs of DYSCO_SPEC.md, validated once, at construction.

Three ways in: our own key names (`from_dict`, the JSON of head maps and of the
API), the authors' flat YAML configs (`from_dysco_yaml`), and QRHead's
`"8-21,8-14,..."` head lists (`from_qrhead_heads`). Every invalid value raises
`ConfigError` with one message that names the field and the value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .flat_yaml import FlatYamlError, parse_flow_list, parse_scalar, read_flat_yaml, unquote
from .errors import ConfigError
from .limits import INT32_MAX, is_int as _is_int, is_real as _is_real, shown

__all__ = [
    "AUTO",
    "EXACT",
    "FAST",
    "MODES",
    "HARD_MASK_STRENGTH",
    "ConfigError",
    "DyscoConfig",
    "parse_head_pairs",
    "parse_layer_head_list",
]

AUTO = "auto"
EXACT, FAST = "exact", "fast"
MODES = (EXACT, FAST)
# plain decoding: the default of `run` and `serve`, since DySCO measured no gain at the sizes we run
# and costs a few percent of speed (README "Where DySCO helps")
OFF = "off"
HARD_MASK_STRENGTH = 99.0  # the spec: strength >= 99 means "hard mask"

HeadPair = tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class DyscoConfig:
    """The spec's inputs. Defaults are the values of the authors' DySCO configs.

    qr_heads: (layer, head) pairs, 0-based, head = query head in Hugging Face order.
    top_p / top_k: nucleus mass / count for the selection; at least one is set,
        both set means hybrid (nucleus, capped to the top_k largest).
    strength: s > 0; the bias is log(s); s >= 99 masks everything unselected.
    decay: gamma in [0, 1), the weight of the previous importance in each update.
    context_warmup / intervention_warmup: Wc, and Wi or "auto" (the length of
        the chat template's generation prompt, resolved at run time).
    template_sequences: token-id sequences whose prompt occurrences are never
        up-weighted (filled from the chat template at run time when empty).
    dynamic: re-select every step (True) or once (False, "static").
    mode: "exact" (the spec: a probe over layers 0..l_max before every full pass) or
        "fast" (no probe: the QR heads' attention in each full pass selects for the next
        token; the selection is one token older and its queries saw the bias).
    """

    qr_heads: tuple[HeadPair, ...]
    top_p: float | None = 0.975
    top_k: int | None = 4096
    strength: float = 2.0
    decay: float = 0.75
    context_warmup: int = 8
    intervention_warmup: int | str = AUTO
    template_sequences: tuple[tuple[int, ...], ...] = ()
    dynamic: bool = True
    mode: str = EXACT

    def __post_init__(self) -> None:
        # Store canonical immutable values (tuples, plain int/float); frozen, hence object.__setattr__.
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name), name))
        if self.top_p is None and self.top_k is None:
            raise ConfigError("top_p/top_k: at least one must be set, got top_p=None and top_k=None")
        if self.mode == FAST and not self.dynamic:
            raise ConfigError("mode: 'fast' re-selects from every full pass; static DySCO (dynamic=false) "
                              "selects once and runs no probes already: use mode='exact'")

    @property
    def l_max(self) -> int:
        """The largest QR-head layer: the probe runs layers 0..l_max."""
        return max(layer for layer, _ in self.qr_heads)

    @property
    def hard_mask(self) -> bool:
        return self.strength >= HARD_MASK_STRENGTH

    def replace(self, **changes: Any) -> DyscoConfig:
        """A copy with some options changed, validated again."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, with our key names (the inverse of `from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["qr_heads"] = [list(pair) for pair in self.qr_heads]
        out["template_sequences"] = [list(seq) for seq in self.template_sequences]
        return out

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> DyscoConfig:
        """From our own key names (the field names); unknown keys are refused."""
        if not isinstance(options, Mapping):
            raise ConfigError(f"config: expected a mapping of options, got {type(options).__name__}")
        _refuse_unknown(options)
        if "qr_heads" not in options:
            raise ConfigError("qr_heads: missing (a list of [layer, head] pairs is required)")
        return cls(**options)

    @classmethod
    def from_dysco_yaml(cls, text: str) -> DyscoConfig:
        """From the authors' YAML config text; read without eval and without a YAML library.

        Keys read: selected_heads, top_k, top_p, strength, decay_factor,
        context_warmup_steps, intervention_warmup, template_sequences,
        dynamic_rescale. Other keys are ignored; missing ones take our defaults.
        """
        try:
            raw = read_flat_yaml(text)
        except FlatYamlError as err:
            raise ConfigError(str(err)) from None
        if "selected_heads" not in raw:
            raise ConfigError("selected_heads: missing from the DySCO config")
        heads = parse_head_pairs(raw["selected_heads"], field="selected_heads")
        options: dict[str, Any] = {"qr_heads": heads}
        for key, name in _DYSCO_YAML_KEYS.items():
            if key in raw:
                # Validate under the YAML key so the message names what the user wrote.
                options[name] = _CHECKS[name](_yaml_value(key, raw[key]), key)
        return cls(**options)

    @classmethod
    def from_qrhead_heads(cls, text: str, **options: Any) -> DyscoConfig:
        """From a QRHead head list (`"8-21,8-14,..."`); other options default or come from `options`."""
        _refuse_unknown(options)
        return cls(qr_heads=parse_layer_head_list(text), **options)


# The authors' YAML key -> our field (selected_heads is parsed on its own).
_DYSCO_YAML_KEYS = {
    "top_k": "top_k",
    "top_p": "top_p",
    "strength": "strength",
    "decay_factor": "decay",
    "context_warmup_steps": "context_warmup",
    "intervention_warmup": "intervention_warmup",
    "template_sequences": "template_sequences",
    "dynamic_rescale": "dynamic",
}

# at most 40 digits: a longer number is left over and refused by name (int() of 4301 digits raises)
_PAIR = re.compile(r"[(\[]\s*(\d{1,40})\s*,\s*(\d{1,40})\s*[)\]]")
_LAYER_HEAD = re.compile(r"(\d{1,40})-(\d{1,40})")


def parse_head_pairs(text: str, *, field: str = "qr_heads") -> tuple[HeadPair, ...]:
    """`"[(17, 24), (14, 31)]"` (or `[[17, 24], ...]`) -> ((17, 24), (14, 31)); never evaluated."""
    body = unquote(text)
    pairs = tuple((int(m.group(1)), int(m.group(2))) for m in _PAIR.finditer(body))
    leftover = _PAIR.sub("", body).strip("[](), \t\n")
    if leftover or not pairs:
        what = f"unexpected text {leftover!r}" if leftover else "no (layer, head) pairs"
        raise ConfigError(f"{field}: {what} in {text!r}; expected e.g. \"[(17, 24), (14, 31)]\"")
    return pairs


def parse_layer_head_list(text: str, *, field: str = "attn_head_set") -> tuple[HeadPair, ...]:
    """QRHead's `"8-21,8-14"` (commas and/or spaces; an `attn_head_set:` prefix is allowed)."""
    body = unquote(re.sub(r"^\s*attn_head_set\s*:", "", text))
    tokens = [tok for tok in re.split(r"[,\s]+", body) if tok]
    if not tokens:
        raise ConfigError(f"{field}: no layer-head pairs in {text!r}; expected e.g. \"8-21,8-14\"")
    pairs = []
    for tok in tokens:
        match = _LAYER_HEAD.fullmatch(tok)
        if match is None:
            raise ConfigError(f"{field}: cannot read {tok!r} as layer-head; expected e.g. \"8-21\"")
        pairs.append((int(match.group(1)), int(match.group(2))))
    return tuple(pairs)


def _yaml_value(key: str, raw: str) -> Any:
    try:
        return parse_scalar(raw, key=key) if key != "template_sequences" else parse_flow_list(raw, key=key)
    except FlatYamlError as err:
        raise ConfigError(str(err)) from None


def _refuse_unknown(options: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(DyscoConfig)}
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")


# ---- field checks: (value, name used in the message) -> canonical value ----

def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name}: expected {expected}, got {shown(value)}")


def _index(value: Any) -> bool:
    """An int the C side can hold as an int32 index or count (>= 0)."""
    return _is_int(value) and 0 <= value <= INT32_MAX


def _items(value: Any, name: str, expected: str) -> tuple:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _bad(name, value, expected)
    return tuple(value)


def _check_qr_heads(value: Any, name: str) -> tuple[HeadPair, ...]:
    expected = "a non-empty list of (layer, head) pairs"
    pairs = tuple(_head_pair(item, name) for item in _items(value, name, expected))
    if not pairs:
        raise _bad(name, value, expected)
    seen: set[HeadPair] = set()
    for pair in pairs:
        if pair in seen:
            raise ConfigError(f"{name}: head {pair} is listed twice")  # it would count double in the mean
        seen.add(pair)
    return pairs


def _head_pair(item: Any, name: str) -> HeadPair:
    expected = f"(layer, head) pairs of ints in 0..{INT32_MAX}"
    if isinstance(item, (str, bytes)) or not isinstance(item, Iterable):
        raise _bad(name, item, expected)
    pair = tuple(item)
    if len(pair) != 2 or not all(_index(v) for v in pair):
        raise _bad(name, item, expected)
    return int(pair[0]), int(pair[1])


def _check_top_p(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not (_is_real(value) and 0 < value <= 1):
        raise _bad(name, value, "a number in (0, 1] or None")
    return float(value)


def _check_top_k(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not (_index(value) and value >= 1):
        raise _bad(name, value, f"an int in 1..{INT32_MAX} or None")
    return int(value)


def _check_strength(value: Any, name: str) -> float:
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise _bad(name, value, f"a finite number > 0 (>= {HARD_MASK_STRENGTH:g} means hard mask)")
    return float(value)


def _check_decay(value: Any, name: str) -> float:
    if not (_is_real(value) and 0 <= value < 1):
        raise _bad(name, value, "a number in [0, 1)")
    return float(value)


def _check_count(value: Any, name: str) -> int:
    if not _index(value):
        raise _bad(name, value, f"an int in 0..{INT32_MAX}")
    return int(value)


def _check_intervention_warmup(value: Any, name: str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if not _index(value):
        raise _bad(name, value, f"an int in 0..{INT32_MAX} or {AUTO!r}")
    return int(value)


def _check_template_sequences(value: Any, name: str) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    expected = f"a list of non-empty lists of token ids (ints in 0..{INT32_MAX})"
    sequences = []
    for seq in _items(value, name, expected):
        tokens = _items(seq, name, expected)
        if not tokens or not all(_index(tok) for tok in tokens):
            raise _bad(name, seq, expected)
        sequences.append(tuple(int(tok) for tok in tokens))
    return tuple(sequences)


def _check_dynamic(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "true or false")
    return value


def _check_mode(value: Any, name: str) -> str:
    if value not in MODES:
        raise _bad(name, value, " or ".join(repr(m) for m in MODES))
    return value


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "qr_heads": _check_qr_heads,
    "top_p": _check_top_p,
    "top_k": _check_top_k,
    "strength": _check_strength,
    "decay": _check_decay,
    "context_warmup": _check_count,
    "intervention_warmup": _check_intervention_warmup,
    "template_sequences": _check_template_sequences,
    "dynamic": _check_dynamic,
    "mode": _check_mode,
}
