"""Decoding methods compared by the evaluation, written `kind[:key=value,...]`.

plain                     greedy decoding, no intervention
dysco[:knobs]             DySCO with the model's head map (its config, then the knobs)
static[:knobs]            the same with dynamic=False (select once, no probes)
fast[:knobs]              the same with mode=fast (no probe: each full pass selects for the next token)
random[:knobs,layers=..]  DySCO with as many heads as the map, drawn per case (seeded) from
                          layers 0..L_max of the map (layers=lmax, default) or all layers
                          (layers=all); never one of the map's own heads
attnts:factor=F           every attention logit multiplied by F (uniform temperature scaling)

knobs: strength, top_k, top_p (a number or none), decay, context_warmup, mode (exact or fast),
top_k_ratio (top_k = ratio x prompt tokens, for a budget that grows with the context).
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import AUTO, DyscoConfig
from ..heads.maps import HeadMap, ModelShape
from ..errors import InputError

KNOBS = ("strength", "top_k", "top_p", "decay", "context_warmup", "mode", "top_k_ratio")
OPTIONS = {"plain": (), "dysco": KNOBS, "static": KNOBS, "fast": KNOBS, "random": (*KNOBS, "layers"),
           "attnts": ("factor",)}
HEAD_KINDS = ("dysco", "static", "fast", "random")
# what each kind changes in the map's config before the knobs
_KIND_CHANGES = {"static": {"dynamic": False}, "fast": {"mode": "fast"}}
RANDOM_LAYERS = ("lmax", "all")


@dataclass(frozen=True)
class Method:
    kind: str
    options: tuple[tuple[str, Any], ...] = ()  # sorted by key

    def __post_init__(self):
        if self.kind not in OPTIONS:
            raise InputError(f"unknown method {self.kind!r}; known: {', '.join(OPTIONS)}")
        object.__setattr__(self, "options", tuple(sorted(self.options)))
        for key, value in self.options:
            _check_option(self.kind, key, value)
        if self.get("top_k") is not None and self.get("top_k_ratio") is not None:
            raise InputError(f"{self.kind}: give top_k or top_k_ratio, not both")
        knobs = {k: v for k, v in self.options if k in KNOBS and k != "top_k_ratio"}
        if knobs:  # the config's own checks, now rather than at the first case
            DyscoConfig(qr_heads=((0, 0),), **knobs)

    def check_complete(self) -> Method:
        """A bare 'attnts' parses (a tuned file may fill it) but cannot run without a factor."""
        if self.kind == "attnts" and self.get("factor") is None:
            raise InputError("attnts needs a factor, e.g. attnts:factor=1.2 (tune it on dev with "
                             "bench/research/eval_sweep.py, or give it in a --tuned file)")
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    @property
    def label(self) -> str:
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={_format(v)}" for k, v in self.options)

    @classmethod
    def parse(cls, text: str) -> Method:
        kind, _, rest = text.strip().partition(":")
        options = []
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise InputError(f"method {text!r}: option {item!r} is not key=value")
            options.append((key.strip(), _parse_value(value.strip())))
        return cls(kind.strip(), tuple(options))

    def with_tuned(self, tuned: Mapping[str, Mapping[str, Any]]) -> Method:
        """Options from a tuned file fill what the method does not set itself; random and static
        take dysco's tuned knobs unless the file has their own entry (the fair ablation); so does fast."""
        base = tuned.get(self.kind)
        if base is None and self.kind in ("random", "static", "fast"):
            base = tuned.get("dysco")
        merged = dict(base or {})
        if {"top_k", "top_k_ratio"} & set(dict(self.options)):  # the method's own budget wins whole
            merged.pop("top_k", None)
            merged.pop("top_k_ratio", None)
        merged.update(self.options)
        return Method(self.kind, tuple(merged.items()))


def parse_methods(text: str) -> tuple[Method, ...]:
    """'plain,dysco:strength=3,top_k=64,attnts:factor=1.2': a piece without ':' that holds '='
    continues the options of the method before it (';' also separates methods)."""
    groups: list[str] = []
    for piece in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        if "=" in piece and ":" not in piece and groups:
            groups[-1] += "," + piece
        else:
            groups.append(piece)
    methods = tuple(Method.parse(group) for group in groups)
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels) or not methods:
        raise InputError(f"methods must be a non-empty list without repeats, got {labels}")
    return methods


@dataclass(frozen=True)
class Decoding:
    """What one method does for one case: a DySCO config (or none) and the attention scale."""
    config: DyscoConfig | None = None
    attn_scale: float = 1.0


def resolve(method: Method, *, head_map: HeadMap | None, shape: ModelShape, n_prompt: int,
            answer_warmup: int, seed: int) -> Decoding:
    """The decoding of a method for a case of n_prompt tokens (seed: the case's, for random heads)."""
    if method.kind == "plain":
        return Decoding()
    if method.kind == "attnts":
        return Decoding(attn_scale=float(method.check_complete().get("factor")))
    if head_map is None:
        raise InputError(f"method {method.label} needs QR heads for this model ({shape.architecture}, "
                         f"{shape.n_layer} layers, {shape.n_head} heads) and none is shipped: pass --head-map FILE")
    config = head_map.to_config()
    if method.kind == "random":
        cap = config.l_max if method.get("layers", "lmax") == "lmax" else shape.n_layer - 1
        config = config.replace(qr_heads=random_heads(seed, len(config.qr_heads), shape.n_head, cap,
                                                      set(config.qr_heads)))
    config = config.replace(**_KIND_CHANGES.get(method.kind, {}))
    return Decoding(_apply_knobs(config, method, n_prompt, answer_warmup))


def random_heads(seed: int, count: int, n_head: int, max_layer: int, exclude: set) -> tuple[tuple[int, int], ...]:
    """count distinct (layer, head) pairs with layer <= max_layer, none in exclude (seeded)."""
    pool = [(layer, head) for layer in range(max_layer + 1) for head in range(n_head) if (layer, head) not in exclude]
    if len(pool) < count:
        raise InputError(f"only {len(pool)} heads in layers 0..{max_layer} are not QR heads, {count} wanted: "
                         f"use random:layers=all")
    return tuple(sorted(random.Random(f"random-heads|{seed}").sample(pool, count)))


def _apply_knobs(config: DyscoConfig, method: Method, n_prompt: int, answer_warmup: int) -> DyscoConfig:
    changes = {key: value for key, value in method.options if key in KNOBS and key != "top_k_ratio"}
    ratio = method.get("top_k_ratio")
    if ratio is not None:
        changes["top_k"] = max(1, round(ratio * n_prompt))
    if config.intervention_warmup == AUTO:  # the answer prefix is fed like the generation prompt
        changes["intervention_warmup"] = answer_warmup
    return config.replace(**changes)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return low


def _format(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _check_option(kind: str, key: str, value: Any) -> None:
    if key not in OPTIONS[kind]:
        allowed = ", ".join(OPTIONS[kind]) or "none"
        raise InputError(f"method {kind}: unknown option {key!r} (allowed: {allowed})")
    if key == "layers" and value not in RANDOM_LAYERS:
        raise InputError(f"random: layers must be one of {', '.join(RANDOM_LAYERS)}, got {value!r}")
    if key in ("factor", "top_k_ratio") and not (isinstance(value, (int, float)) and value > 0):
        raise InputError(f"{kind}: {key} must be a number > 0, got {value!r}")
    if key == "top_k_ratio" and value > 1:
        raise InputError(f"{kind}: top_k_ratio is a fraction of the prompt, in (0, 1], got {value!r}")
