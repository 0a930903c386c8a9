"""A reader for the flat subset of YAML that the DySCO configs use.

Why not PyYAML: the configs are a dozen `key: value` lines, and a runtime that
decodes with them should not need a YAML dependency (nor ever `eval` a value).

Supported: top-level `key: value` lines, `#` comments, quoted scalars, flow
lists that span several lines, and block lists whose items are one line each
(`- [1, 2]`). Anything indented under a key that is not a list item (a nested
mapping) is kept as raw text: callers ignore unknown keys, and a known key with
such a value fails in the caller's own parser with the key named.
"""

from __future__ import annotations

import json
import re
from .errors import FlatYamlError

__all__ = ["FlatYamlError", "read_flat_yaml", "parse_scalar", "parse_flow_list", "unquote"]

_KEY = re.compile(r"^([A-Za-z_][\w.-]*)\s*:(?:\s+(.*)|\s*)$")
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
MAX_NUMBER_CHARS = 160  # no DySCO option comes near; int() of 4301 digits refuses with a traceback


def read_flat_yaml(text: str) -> dict[str, str]:
    """Map each top-level key to its raw value text.

    Comments are removed, a multi-line flow list is joined into one line, and a
    block list is rewritten as flow text (`[item, item]`). Values are not
    interpreted: use `parse_scalar` / `parse_flow_list` on them.
    """
    lines = [_strip_comment(line).rstrip() for line in text.splitlines()]
    result: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        match = _KEY.match(line)
        if match is None:
            raise FlatYamlError(f"line {i}: expected 'key: value' at the start of the line, got {line!r}")
        key, value = match.group(1), (match.group(2) or "").strip()
        if value == "":
            block, i = _take_block(lines, i)
            value = _block_to_flow(block)
        elif _depth(value) > 0:
            value, i = _join_flow(lines, i, value, key)
        result[key] = value
    return result


def _take_block(lines: list[str], i: int) -> tuple[list[str], int]:
    """Lines that belong to an empty-valued key: indented ones, or `- ` items at column 0."""
    block = []
    while i < len(lines):
        line = lines[i]
        if line.strip() and not (line[0].isspace() or line == "-" or line.startswith("- ")):
            break
        if line.strip():
            block.append(line.strip())
        i += 1
    return block, i


def _block_to_flow(block: list[str]) -> str:
    if all(item == "-" or item.startswith("- ") for item in block) and block:
        return "[" + ", ".join(item[1:].strip() for item in block) + "]"
    return "\n".join(block)  # empty (null) or a nested mapping, left raw


def _join_flow(lines: list[str], i: int, value: str, key: str) -> tuple[str, int]:
    """Append following lines to an open flow list until its brackets balance."""
    while _depth(value) > 0:
        if i >= len(lines):
            raise FlatYamlError(f"{key}: the list opened here is never closed")
        value, i = value + " " + lines[i].strip(), i + 1
    return value, i


def _strip_comment(line: str) -> str:
    quote = None
    for pos, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (pos == 0 or line[pos - 1].isspace()):
            return line[:pos]
    return line


def _depth(text: str) -> int:
    """Open brackets minus closed ones, outside quotes."""
    depth, quote = 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return depth


def unquote(raw: str) -> str:
    """The text without one pair of surrounding quotes, if it has them."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_scalar(raw: str, *, key: str = "value") -> None | bool | int | float | str:
    """null/None/~/empty -> None, true/false -> bool, numbers -> int/float; quoted text stays text."""
    text = raw.strip()
    if len(text) > MAX_NUMBER_CHARS and _FLOAT.fullmatch(text):
        raise FlatYamlError(f"{key}: a number of {len(text)} digits; no DySCO option is near that long")
    if unquote(text) != text:
        return unquote(text)
    lowered = text.lower()
    if lowered in ("", "null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _bounded_int(digits: str, key: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise FlatYamlError(f"{key}: a number of {len(digits)} digits; no DySCO option is near that long")
    return int(digits)


def parse_flow_list(raw: str, *, key: str) -> list | None:
    """A flow list such as `[[1, 2], (3,)]` (quoted or not) as Python lists, via json.

    Tuples become lists, single quotes become double quotes, trailing commas go.
    null/None/empty -> None.
    """
    text = unquote(raw)
    if text.strip().lower() in ("", "null", "none", "~"):
        return None
    normalised = text.replace("(", "[").replace(")", "]").replace("'", '"')
    normalised = _TRAILING_COMMA.sub(r"\1", normalised)
    try:
        value = json.loads(normalised, parse_int=lambda digits: _bounded_int(digits, key))
    except json.JSONDecodeError as err:
        raise FlatYamlError(f"{key}: cannot read {raw!r} as a list ({err.msg})") from None
    except RecursionError:
        raise FlatYamlError(f"{key}: lists nested deeper than Python parses") from None
    if not isinstance(value, list):
        raise FlatYamlError(f"{key}: expected a list, got {raw!r}")
    return value
