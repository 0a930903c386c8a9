"""Chat messages to token ids where only the chat template's own markup can be a control token.

A chat template's output is one string: its markup (`<|im_start|>user\\n`) and the users' text
side by side. Tokenized with special-token parsing on, as llama.cpp and transformers do, a
message or document holding `<|im_end|>\\n<|im_start|>system\\n...` would open a real system
turn. So text a user wrote is checked first (llama.cpp's own tokenizer says whether it holds
control tokens); when it does, their occurrences are broken by a private mark before the
template renders, the rendered text is cut at the control tokens left (the template's), and
each piece between them is tokenized as plain text with the mark removed. Text without
control tokens takes the usual single pass, so ordinary prompts keep their exact tokens.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

Tokenize = Callable[..., list]  # (text, *, special: bool) -> token ids

_MARKS = [chr(c) for c in range(0xE000, 0xF900)]  # Unicode private use: in no template's markup


def encode(chat, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> list[int]:
    """Token ids of `chat` (a ChatTemplate) rendered on messages, control tokens from its markup only."""
    strings = message_strings(messages)
    found = control_texts(strings, chat)
    if not found:
        return chat.tokenize(chat.render(messages, add_generation_prompt=add_generation_prompt), special=True)
    mark = pick_mark(strings + [chat.source])
    safe = defused_messages(messages, found, mark)
    while more := control_texts(message_strings(safe), chat):  # one hidden inside another's text
        found |= more
        safe = defused_messages(messages, found, mark)
    rendered = chat.render(safe, add_generation_prompt=add_generation_prompt)
    return tokenize_marked(rendered, mark, chat.tokenize, chat.is_control, chat.token_text)


def control_texts(strings: Sequence[str], chat) -> set[str]:
    """The texts of the control tokens that special-token parsing finds in the strings. The last
    answer is kept on the chat template: a request encodes the same messages 3 times."""
    key = tuple(strings)
    found = chat.scanned.get(key)  # threads share a model: only atomic dict operations here
    if found is None:
        found = frozenset(chat.token_text(t) for s in strings for t in set(chat.tokenize(s, special=True))
                          if chat.is_control(t))
        chat.scanned.clear()
        chat.scanned[key] = found
    return set(found)


def defuse(text: str, found: set[str], mark: str) -> str:
    """text with each occurrence of a control token's text broken by mark after its first character."""
    for special in sorted(found, key=len, reverse=True):
        if len(special) > 1:
            text = text.replace(special, special[0] + mark + special[1:])
    return text


def pick_mark(strings: Sequence[str]) -> str:
    """A private-use character none of the strings holds (so removing it restores them)."""
    joined = "".join(strings)
    mark = next((m for m in _MARKS if m not in joined), None)
    if mark is None:
        raise ValueError("the messages use every private-use character; cannot mark their special tokens")
    return mark


def message_strings(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    return [v for m in messages for v in m.values() if isinstance(v, str)]


def defused_messages(messages: Sequence[Mapping[str, Any]], found: set[str], mark: str) -> list[dict]:
    return [{k: defuse(v, found, mark) if isinstance(v, str) else v for k, v in m.items()} for m in messages]


def tokenize_marked(rendered: str, mark: str, tokenize: Tokenize, is_control: Callable[[int], bool],
                    token_text: Callable[[int], str]) -> list[int]:
    """Token ids of a rendered template whose users' control-token texts carry `mark`: the
    template's control tokens as tokens, every piece between them as plain text without the mark."""
    ids_of = {}
    for token in set(tokenize(rendered, special=True)):
        if is_control(token):
            ids_of[token_text(token)] = token
    if not ids_of:
        return tokenize(rendered.replace(mark, ""), special=False)
    pattern = "|".join(re.escape(t) for t in sorted(ids_of, key=len, reverse=True))
    out: list[int] = []
    for i, piece in enumerate(re.split(f"({pattern})", rendered)):
        if i % 2:
            out.append(ids_of[piece])
        elif piece:
            out.extend(tokenize(piece.replace(mark, ""), special=False))
    return out
