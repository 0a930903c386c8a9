"""Token ids of a request (text, chat messages or ids) and what DySCO derives from the
model's chat template: the intervention warmup 'auto' and the template sequences."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence


from ..config import AUTO, DyscoConfig
from ..errors import InputError
from ..limits import check_text, is_int, shown
from .chat import NO_TEMPLATE_WARMUP, ChatTemplate
from .engine import Engine

Messages = Sequence[Mapping[str, str]]


class Prompter:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.chat = ChatTemplate.from_engine(engine)
        self._markers: Optional[tuple[tuple[int, ...], ...]] = None

    def ids(self, prompt: Optional[str] = None, *, messages: Optional[Messages] = None,
            token_ids: Optional[Sequence[int]] = None) -> tuple[list[int], int]:
        """Token ids of the input and its intervention warmup for 'auto'."""
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise InputError("give exactly one of prompt, messages or token_ids")
        if token_ids is not None:
            return self.checked_ids(token_ids), NO_TEMPLATE_WARMUP
        if prompt is not None:
            check_text(prompt, "prompt")
        if prompt is not None and self.chat is None:
            return self.engine.tokenize(prompt, add_bos=True), NO_TEMPLATE_WARMUP
        messages = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
        if self.chat is None:
            raise InputError("this model has no chat template: pass prompt= text or token_ids=")
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    check_text(value, f"messages[{i}].{key}")
        # a template's own refusals (raise_exception, budgets) are ChatTemplateErrors (InputErrors)
        return self.chat.prompt_ids(messages), self.chat.generation_prompt_length(messages)

    def checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids a user gave, each an int in the vocabulary (llama.cpp asserts on others)."""
        if isinstance(token_ids, (str, bytes)):
            raise InputError(f"token_ids: expected a list of ints, got {shown(token_ids)}")
        ids = list(token_ids)
        n_vocab = self.engine.n_vocab
        bad = next((i for i, t in enumerate(ids) if not (is_int(t) and 0 <= t < n_vocab)), None)
        if bad is not None:
            raise InputError(f"token_ids[{bad}]: expected a token id in 0..{n_vocab - 1} (this model's "
                             f"vocabulary), got {shown(ids[bad])}")
        return [int(t) for t in ids]

    def with_template_sequences(self, config: Optional[DyscoConfig]) -> Optional[DyscoConfig]:
        """The config with the chat template's role markers as template sequences, unless it has some."""
        if config is None or config.template_sequences or self.chat is None:
            return config
        if self._markers is None:
            self._markers = tuple(map(tuple, self.chat.role_markers()))
        return config.replace(template_sequences=self._markers)

    @staticmethod
    def intervention_warmup(config: DyscoConfig, warmup_auto: int) -> int:
        return warmup_auto if config.intervention_warmup == AUTO else config.intervention_warmup
