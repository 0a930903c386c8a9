"""Where the nodes DySCO adds to the decode graphs run (native/dysco-placement.cpp), for
`dysco-edge devices --check`: a short plain, fast and exact decode and a head capture on one engine
with the placement log on. A DySCO node on the CPU while its layer's attention runs on a GPU costs a
copy to the host and back every step: that is a fallback, and the check fails on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import DyscoConfig
from .decode import dysco_tokens, plan_warmups
from .engine import Engine, Sampler
from .native import NodePlacement

# node-name prefixes of each part DySCO adds (dysco_<part>_<op>-<layer>, and the names its code sets)
PARTS = (("scores", ("dysco_score", "dysco_kq_range", "dysco_probs_range")),
         ("fold", ("dysco_fold", "dysco_importance_fold")),
         ("selection and bias", ("dysco_select", "dysco_sel", "dysco_kq_mask_biased")),
         ("head capture", ("dysco_capture", "dysco_heads_")))


def node_part(name: str) -> str:
    return next((part for part, prefixes in PARTS if name.startswith(prefixes)), "other")


@dataclass(frozen=True, order=True)
class PlacedOp:
    """One op of one part of DySCO on one backend, with the layers it ran for."""
    part: str
    op: str
    backend: str
    attention_backend: str
    layers: tuple[int, ...]
    cpu_fallback: bool


def summarize(nodes: Sequence[NodePlacement]) -> list[PlacedOp]:
    groups: dict[tuple, set[int]] = {}
    for n in nodes:
        key = (node_part(n.name), n.op, n.backend, n.attention_backend, n.cpu_fallback)
        groups.setdefault(key, set()).add(n.layer)
    return sorted(PlacedOp(part, op, backend, attn, tuple(sorted(layers)), fallback)
                  for (part, op, backend, attn, fallback), layers in groups.items())


def record_placement(engine: Engine, config: DyscoConfig, prompt: Sequence[int], new_tokens: int = 4) -> list[NodePlacement]:
    """Plain, fast and exact decodes of `prompt` and a head capture of its last rows, every DySCO node's
    placement recorded. Leaves the engine cleared."""
    native = engine.native
    native.set_placement_log(True)
    try:
        _plain(engine, prompt, new_tokens)
        for mode in ("fast", "exact"):
            engine.clear()
            warm = plan_warmups(len(prompt), 8, 4)
            for _ in dysco_tokens(engine, prompt, config.replace(mode=mode), warm, reuse=0, sampler=Sampler(),
                                  max_new_tokens=new_tokens, is_end=lambda t: False):
                pass
            native.set_capture(False)
        _capture(engine, prompt)
        return native.placement()
    finally:
        native.set_placement_log(False)
        engine.clear()


def _plain(engine: Engine, prompt: Sequence[int], new_tokens: int) -> None:
    engine.clear()
    engine.native.clear_heads()
    engine.decode(prompt, 0)
    sampler = Sampler()
    for pos in range(len(prompt), len(prompt) + new_tokens):
        engine.decode([sampler.sample(engine)], pos)


def _capture(engine: Engine, prompt: Sequence[int]) -> None:
    """All-heads capture (QR-head detection) of the prompt's last 4 rows."""
    engine.clear()
    n = len(prompt)
    engine.decode(prompt[:n - 4], 0, want_logits=False)
    engine.native.set_head_capture(n - 4, n)
    engine.decode(prompt[n - 4:], n - 4, want_logits=False)
    engine.native.clear_head_capture()
