"""Turn an evaluation prompt into the token ids one model sees (its chat template, or plain
"User:/Assistant:" text for a base model) and count them for length fitting."""
from __future__ import annotations

from dataclasses import dataclass

from .tasks import Prompt
from ..errors import InputError

BASE_STOP = "\nUser:"  # a base model writing the next user turn has finished its answer


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    answer_warmup: int       # generation prompt + answer prefix tokens: intervention warmup "auto"
    stop: tuple[str, ...]

    def __post_init__(self):
        if not self.ids or self.answer_warmup < 0:
            raise InputError(f"a rendered prompt needs ids and answer_warmup >= 0, got {len(self.ids)} ids, "
                             f"answer_warmup {self.answer_warmup}")


class PromptRenderer:
    """Renders prompts for one Model (anything with .chat, .prompt_ids and .tokenize)."""

    def __init__(self, model):
        self.model = model

    def _tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def count(self, prompt: Prompt) -> int:
        """Tokens of the rendered prompt (cheaper than render: no generation-prompt measurement)."""
        if self.model.chat is None:
            return len(self.model.prompt_ids(_base_text(prompt))[0])
        return len(self.model.chat.prompt_ids(prompt.messages())) + len(self._prefix(prompt))

    def render(self, prompt: Prompt, stop: tuple[str, ...] = ()) -> Rendered:
        if self.model.chat is None:
            ids, warmup = self.model.prompt_ids(_base_text(prompt))
            prefix = self._tokens(" " + prompt.answer_prefix) if prompt.answer_prefix else []
            return Rendered(ids, warmup + len(prefix), tuple(stop) + (BASE_STOP,))
        ids, warmup = self.model.prompt_ids(messages=prompt.messages())
        prefix = self._prefix(prompt)
        return Rendered(ids + prefix, warmup + len(prefix), tuple(stop))

    def _prefix(self, prompt: Prompt) -> list[int]:
        return self._tokens(prompt.answer_prefix) if prompt.answer_prefix else []


def _base_text(prompt: Prompt) -> str:
    """A conversation as plain text for a model without a chat template."""
    turns = [f"{role.capitalize()}: {content}" for role, content in prompt.turns]
    answer = f" {prompt.answer_prefix}" if prompt.answer_prefix else ""
    return "\n\n".join(turns) + "\n\nAssistant:" + answer

