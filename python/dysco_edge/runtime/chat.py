"""Chat formatting with the model's own template, and what DySCO derives from it:
the generation prompt's length (intervention warmup "auto") and the role markers
(template sequences that are never up-weighted)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import user_text

NO_TEMPLATE_WARMUP = 2  # the spec's intervention warmup when no chat template is used
_SENTINEL = "\u2063dysco\u2063"


class _GenerationBlock(Extension):
    """Hugging Face templates mark the assistant's text with {% generation %}...{% endgeneration %},
    which only matters for training masks: render its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # as transformers renders it: non-ASCII kept, no HTML escaping
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """The chat template in a sandbox, with the options and helpers Hugging Face templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    # no strftime_now: templates then print their fixed default date, so a prompt is the same every day
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    template: jinja2.Template
    bos_token: str
    eos_token: str
    tokenize: Callable[..., list[int]]  # (text, *, special): special-token text parsed or not
    is_control: Callable[[int], bool]
    token_text: Callable[[int], str]
    source: str = ""
    scanned: dict = field(default_factory=dict, compare=False, repr=False)  # user_text.control_texts' last answer

    @classmethod
    def from_engine(cls, engine) -> "ChatTemplate | None":
        source = engine.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        return cls(compile_template(source), engine.special_text("bos"), engine.special_text("eos"),
                   engine.tokenize, engine.is_control, engine.token_text, source)

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered messages; special-token text is parsed in the template's markup
        only, never in what the messages say (runtime/user_text.py)."""
        return user_text.encode(self, messages, add_generation_prompt)

    def generation_prompt_length(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Tokens the template appends to open the assistant's turn (intervention warmup 'auto')."""
        with_prompt = self.prompt_ids(messages, add_generation_prompt=True)
        without = self.prompt_ids(messages, add_generation_prompt=False)
        return max(0, len(with_prompt) - len(without)) if with_prompt[:len(without)] == without else NO_TEMPLATE_WARMUP

    def role_markers(self) -> list[list[int]]:
        """The token ids that open each role's turn, e.g. '<|im_start|>user\\n'."""
        markers = []
        for role in ("system", "user", "assistant"):
            try:
                text = self.render([{"role": role, "content": _SENTINEL}], add_generation_prompt=False)
            except jinja2.TemplateError:  # templates that refuse a role (Gemma has no system turn)
                continue
            head = text.split(_SENTINEL)[0]
            eos = self.eos_token
            if eos and eos in head:  # drop a default system turn the template put first
                head = head[head.rfind(eos) + len(eos):]
            ids = self.tokenize(head.lstrip("\n"), special=True) if head.strip() else []
            if ids and ids not in markers:
                markers.append(ids)
        return markers
