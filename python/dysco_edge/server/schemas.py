"""Request bodies of /v1/chat/completions and /v1/completions, and what they mean for
`Model.generate`: sampling options, the input, and DySCO per request.

Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change the
answer in a way we do not implement (n > 1, tools, log-probabilities, penalties, JSON
mode, echo) are refused with a 400 rather than silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import FAST, OFF, DyscoConfig
from ..errors import ConfigError, InputError
from .focus import FocusOptions

# when dysco is "auto" and the model has no QR heads: answered plainly, and said so
NO_HEADS_NOTE = "off; reason=no QR heads for this model"
SERVER_OFF_NOTE = "off; reason=the server's default (--dysco-mode off); send dysco true for DySCO"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_message(self) -> dict:
        """The message as chat templates take it (text parts joined; 'developer' is the system turn)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class GenerationBody(_Body):
    """Fields both routes share. Sampling defaults are Model.generate's (greedy)."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_progress: bool = False
    return_focus: Union[bool, FocusOptions] = False  # dysco.focus in the answer (server/focus.py)
    dysco: Any = "auto"
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    # the refused fields of both routes (check_fields=False: some exist only in one subclass)
    @field_validator("n", "best_of", check_fields=False)
    @classmethod
    def _only_one(cls, value):
        if value not in (None, 1):
            raise ValueError(f"only 1 is supported, got {value!r}")
        return value

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "tools", "echo", "suffix",
                     check_fields=False)
    @classmethod
    def _unsupported(cls, value):
        if value:  # None, false, 0, "" and empty lists or objects ask for nothing
            raise ValueError("not supported by this server")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max_tokens: int) -> dict:
        """Model.generate's keyword arguments for sampling and length."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "min_p": self.min_p, "seed": self.seed}
        return {**{k: v for k, v in given.items() if v is not None}, "stop": stops,
                "max_new_tokens": self._max_tokens() or default_max_tokens}

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None
    document: Optional[str] = None  # a registered document's id: put into the first user turn (documents.py)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type") != "text":
            raise ValueError(f"only {{\"type\": \"text\"}} is supported, got {value!r}")
        return value

    def _max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def inputs(self, model) -> dict:
        return {"messages": [m.as_template_message() for m in self.messages]}


class CompletionBody(GenerationBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("one prompt per request is supported (n = 1)")
            value = value[0]
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("the prompt is empty")
        return value

    def inputs(self, model) -> dict:
        """Raw text completion: the model's own BOS and special tokens, no chat template."""
        if isinstance(self.prompt, str):
            return {"token_ids": model.tokenize(self.prompt, add_bos=True, special=True)}
        return {"token_ids": list(self.prompt)}


# ---- DySCO per request ----

@dataclass(frozen=True)
class DyscoChoice:
    config: Optional[DyscoConfig]  # None: plain decoding
    header: str                    # the X-DySCO response header: "on", "off" or "off; reason=..."

    @property
    def applied(self) -> bool:
        return self.config is not None


def choose_dysco(model, value: Any, mode: str = OFF) -> DyscoChoice:
    """The body's `dysco`: "auto" (the server's default: with `mode` off plain, else DySCO when the
    model has QR heads, else plain, said so), true (DySCO, an error without heads), false/null/"off"
    (plain), or an object of DyscoConfig knobs over the model's head map (validated by DyscoConfig
    itself). `mode` is the server's --dysco-mode; true and knobs naming no mode run fast when it is off.
    A model with parallel slots batches dynamic DySCO (fast or exact): static DySCO asked for is an error."""
    choice = _choose(model, value, mode)
    if model.parallel > 1 and choice.applied and not choice.config.dynamic:
        raise InputError(f"dysco: this server decodes up to {model.parallel} requests in one batch "
                         f"(--parallel {model.parallel}), where DySCO runs dynamic only; static DySCO (dynamic "
                         f"false) needs --parallel 1")
    return choice


def _choose(model, value: Any, mode: str) -> DyscoChoice:
    if value is False or value is None or value == "off":
        return DyscoChoice(None, "off")
    if value == "auto" and mode == OFF:
        return DyscoChoice(None, SERVER_OFF_NOTE)
    mode = FAST if mode == OFF else mode
    if value == "auto" or value is True:
        found = model.head_map()
        if found is not None:
            return DyscoChoice(found.to_config(mode=mode), "on")
        if value is True:
            raise InputError("dysco: this model has no QR heads (give dysco.qr_heads, or start the server "
                             "with --head-map)")
        return DyscoChoice(None, NO_HEADS_NOTE)
    if isinstance(value, dict):
        # static DySCO has no fast mode: the server's mode applies to dynamic requests only
        defaults = {} if value.get("dynamic") is False else {"mode": mode}
        return DyscoChoice(_knobs(model, {**defaults, **value}), "on")
    raise InputError(f"dysco: expected \"auto\", true, false or an object of DySCO options, got {value!r}")


def _knobs(model, knobs: dict) -> DyscoConfig:
    found = model.head_map()
    if found is not None:
        return found.to_config(**knobs)
    if "qr_heads" not in knobs:
        raise ConfigError("qr_heads: this model has no QR heads, so dysco options must include qr_heads "
                          "(a list of [layer, head] pairs)")
    return DyscoConfig.from_dict(knobs)
