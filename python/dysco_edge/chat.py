"""Chat formatting with the model's own template, and what DySCO derives from it:
the generation prompt's length (intervention warmup "auto") and the role markers
(template sequences that are never up-weighted)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from . import _llama  # noqa: F401
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

NO_TEMPLATE_WARMUP = 2  # the spec's intervention warmup when no chat template is used
_SENTINEL = "\u2063dysco\u2063"


@dataclass(frozen=True)
class ChatTemplate:
    formatter: Jinja2ChatFormatter
    tokenize: callable  # str -> list[int], special tokens parsed

    @classmethod
    def from_engine(cls, engine) -> "ChatTemplate | None":
        meta = engine.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            return None
        model = engine.llm._model  # the BOS/EOS strings the template expects
        bos = model.token_get_text(engine.llm.token_bos()) if engine.llm.token_bos() >= 0 else ""
        eos = model.token_get_text(engine.llm.token_eos()) if engine.llm.token_eos() >= 0 else ""
        formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)
        return cls(formatter, lambda text: engine.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        return self.formatter._environment.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self.formatter.bos_token, eos_token=self.formatter.eos_token)

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def generation_prompt_length(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Tokens the template appends to open the assistant's turn (intervention warmup 'auto')."""
        with_prompt = self.tokenize(self.render(messages, add_generation_prompt=True))
        without = self.tokenize(self.render(messages, add_generation_prompt=False))
        return max(0, len(with_prompt) - len(without)) if with_prompt[:len(without)] == without else NO_TEMPLATE_WARMUP

    def role_markers(self) -> list[list[int]]:
        """The token ids that open each role's turn, e.g. '<|im_start|>user\\n'."""
        markers = []
        for role in ("system", "user", "assistant"):
            try:
                text = self.render([{"role": role, "content": _SENTINEL}], add_generation_prompt=False)
            except Exception:  # templates that refuse a role (Gemma has no system turn)
                continue
            head = text.split(_SENTINEL)[0]
            eos = self.formatter.eos_token
            if eos and eos in head:  # drop a default system turn the template put first
                head = head[head.rfind(eos) + len(eos):]
            ids = self.tokenize(head.lstrip("\n")) if head.strip() else []
            if ids and ids not in markers:
                markers.append(ids)
        return markers
