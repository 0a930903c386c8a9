"""Calibration examples as token ids, with the positions QRScore needs.

The prompt is one user turn in the model's chat template (plain text when it
has none): an instruction, the documents, then `Question: ...`. It is
tokenized piece by piece so that every document's token span and the
question's tokens are known exactly; pieces break at spaces and newlines,
where tokenizers break anyway.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .calibration import CalibrationExample
from ..errors import InputError

__all__ = ["NULL_QUERY", "ExampleLayout", "PromptFormat"]

NULL_QUERY = "N/A"  # QRHead's null query, whose attention calibrates the question's
_SENTINEL = "\u2063dysco-content\u2063"
_INSTRUCTION = "Answer the question using the documents below.\n\n"
_PLAIN_TAIL = "\nAnswer:"

Tokenize = Callable[[str, bool], list[int]]  # (text, parse special tokens) -> ids, never a BOS


@dataclass(frozen=True)
class ExampleLayout:
    """prefix (template head, instruction, documents, "Question:"), then question or null, then suffix."""

    prefix: tuple[int, ...]
    question: tuple[int, ...]
    null: tuple[int, ...]
    suffix: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # each document's positions [start, end), inside prefix
    gold: int

    def __post_init__(self) -> None:
        if not self.question or not self.null:
            raise InputError("the question and the null query must have at least one token each")
        if not 0 <= self.gold < len(self.spans):
            raise InputError(f"gold must index a document span (0-{len(self.spans) - 1}), got {self.gold}")
        for start, end in self.spans:
            if not 0 <= start < end <= len(self.prefix):
                raise InputError(f"document span [{start}, {end}) is empty or outside the {len(self.prefix)}-token prefix")

    @property
    def prompt(self) -> tuple[int, ...]:
        """The whole prompt, up to where the answer starts."""
        return self.prefix + self.question + self.suffix


@dataclass(frozen=True)
class PromptFormat:
    """How one model's prompts are made: its tokenizer and the text around the user's content."""

    tokenize: Tokenize
    head: tuple[int, ...]  # ids before the content (template head, or just a BOS)
    tail: str              # text after the content (template end + generation prompt)

    @classmethod
    def from_engine(cls, engine, chat) -> PromptFormat:
        """For an Engine and its ChatTemplate (None: plain text with the model's BOS)."""
        def tokenize(text: str, special: bool) -> list[int]:
            return engine.tokenize(text, special=special)

        if chat is None:
            bos = engine.tokenize("", add_bos=True)  # [BOS] when the model wants one
            return cls(tokenize, tuple(bos), _PLAIN_TAIL)
        text = chat.render([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
        head, tail = text.split(_SENTINEL)
        return cls(tokenize, tuple(tokenize(head, True)), tail)

    def layout(self, example: CalibrationExample) -> ExampleLayout:
        ids, spans = list(self.head), []
        ids += self.tokenize(_INSTRUCTION, False)
        for i, (title, body) in enumerate(example.documents):
            ids += self.tokenize(f"Document {i + 1}:", False)
            start = len(ids)
            ids += self.tokenize(f" {title}\n{body}", False)
            spans.append((start, len(ids)))
            ids += self.tokenize("\n\n", False)
        ids += self.tokenize("Question:", False)
        return ExampleLayout(prefix=tuple(ids), question=tuple(self.tokenize(f" {example.question}", False)),
                             null=tuple(self.tokenize(f" {NULL_QUERY}", False)),
                             suffix=tuple(self.tokenize(self.tail, True)), spans=tuple(spans), gold=example.gold)

    def answer(self, example: CalibrationExample) -> tuple[int, ...]:
        """The answer's tokens as the model would write them right after the prompt."""
        space = " " if self.tail and not self.tail[-1].isspace() else ""  # after "Answer:", not after "\n"
        return tuple(self.tokenize(space + example.answer, False))

    def layouts(self, examples: Sequence[CalibrationExample]) -> list[ExampleLayout]:
        return [self.layout(example) for example in examples]
