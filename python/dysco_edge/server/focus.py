"""The `dysco.focus` extension: where a DySCO answer looked, asked for with `"return_focus": true`
(or `{"top": N}`) on /v1/chat/completions and /v1/completions.

Its passages are character spans (Unicode code points) of the texts the client sent: of the
request's `document` when it names one, else of each message's content (`"message": i`), or of
a completion's `prompt`. Each carries its weight (the mean share of the QR heads' attention over
the answer's steps) and where it lies ("page 2", "section: Results"). Plain answers have
`"focus": null`: without DySCO nothing was traced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ..documents.focus import focus_passages

DEFAULT_TOP = 8


class FocusOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top: int = Field(DEFAULT_TOP, ge=1, le=100)  # passages returned, heaviest first


def focus_top(value) -> Optional[int]:
    """The body's `return_focus` (False, True or FocusOptions) as a passage count, or None."""
    if isinstance(value, FocusOptions):
        return value.top
    return DEFAULT_TOP if value else None


@dataclass(frozen=True)
class FocusPlan:
    """The texts a request's focus is located in, with the key each passage carries to name its text."""
    top: int
    texts: tuple[str, ...]
    keys: tuple[dict, ...]

    @classmethod
    def for_messages(cls, top: int, contents: list[str]) -> "FocusPlan":
        return cls(top, tuple(contents), tuple({"message": i} for i in range(len(contents))))

    def json(self, model, generation) -> Optional[dict]:
        """The response's `dysco.focus`: None for a plain answer."""
        if generation.dysco is None or generation.trace is None:
            return None
        passages = focus_passages(model, generation, self.texts, top=self.top)
        return {"steps": generation.trace.steps,
                "passages": [{**self.keys[p.region], "start": p.start, "end": p.end, "text": p.text,
                              "weight": round(p.weight, 6), "where": p.where} for p in passages]}
