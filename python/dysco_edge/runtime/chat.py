"""Chat formatting with the model's own template, and what DySCO derives from it:
the generation prompt's length (intervention warmup "auto") and the role markers
(template sequences that are never up-weighted).

A template comes with the model file, so it is run as foreign code: in Jinja's sandbox, with
a time budget (checked on every line the template executes) and a size budget on its output
and on every value it builds (by +, *, **, ~, a call or a filter; a count or a format width
past the budget is refused before the value is made). Any failure is one ChatTemplateError line
(an InputError: the server answers 400)."""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError, TemplateBudgetError
from . import user_text

NO_TEMPLATE_WARMUP = 2  # the spec's intervention warmup when no chat template is used
_SENTINEL = "\u2063dysco\u2063"
RENDER_SECONDS = 2.0  # templates render in milliseconds; one still running after this never ends
MAX_TEMPLATE_CHARS = 16 << 20  # of the output and of any string or list built (4x a 1M-token prompt)
_TEMPLATE_FILE = "<template>"  # the file name Jinja compiles from_string templates under
# widths and precisions of printf-style and str.format fields
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:[^{}\d]*(\d*)(?:[,_]?\.(\d+))?")


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


def _too_big(what: str) -> TemplateBudgetError:
    return TemplateBudgetError(f"the chat template builds {what}, over its budget of {MAX_TEMPLATE_CHARS} "
                               f"characters: a broken or hostile template")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_counts(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """A call such as center(10**10) or a filter's width would build the value before any check."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_TEMPLATE_CHARS:
            raise _too_big(f"with a count of {value}")


def _check_format(text: str, spec: re.Pattern) -> None:
    """The same for a format's width or precision ("%099999999d", "{:>99999999}")."""
    if any(int(n) > MAX_TEMPLATE_CHARS for found in spec.findall(text) for n in found if n):
        raise _too_big("with a format width past it")


def _checked_size(result: Any) -> Any:
    if _size(result) > MAX_TEMPLATE_CHARS:
        raise _too_big("a string or list")
    return result


def _counted(function: Callable) -> Callable:
    @functools.wraps(function)  # keeps Jinja's pass_context/pass_environment marks
    def checked(*args, **kwargs):
        _check_counts(args, kwargs)
        return _checked_size(function(*args, **kwargs))
    return checked


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame) -> None:
        """`a ~ b` joins through the environment, which checks the size first (in a loop, ~ doubles a
        string each time)."""
        self.write("environment.bounded_join((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("), context.eval_ctx)")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def bounded_join(parts: Sequence[Any], eval_ctx) -> str:
        if sum(_size(part) for part in parts) > MAX_TEMPLATE_CHARS:
            raise _too_big("a joined string")
        return (markup_join if eval_ctx.autoescape else str_join)(parts)

    def call_binop(self, context, operator, left, right):
        if operator == "%" and isinstance(left, str):
            _check_format(left, _PERCENT_SPEC)
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and abs(left).bit_length() * right > 1 << 20:  # a million-bit int takes seconds to make
            raise TemplateBudgetError(f"the chat template computes a power (a {abs(left).bit_length()}-bit number "
                                      f"to the {right}) past its budget: a broken or hostile template")
        if operator == "*":
            count = right if isinstance(right, int) else left if isinstance(left, int) else 1
            if abs(count) * max(_size(left), _size(right)) > MAX_TEMPLATE_CHARS:
                raise _too_big("a repeated string or list")
        result = super().call_binop(context, operator, left, right)
        if _size(result) > MAX_TEMPLATE_CHARS:
            raise _too_big("a joined string or list")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_counts(args, kwargs)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # Jinja wraps str.format
        if isinstance(owner, str):
            _check_format(owner, _FORMAT_SPEC)  # "{:099999999}".format(...)
        return _checked_size(super().call(__context, __obj, *args, **kwargs))


def compile_template(source: str) -> jinja2.Template:
    """The chat template in the bounded sandbox, with the options and helpers Hugging Face templates
    expect; a template that does not compile is one ChatTemplateError line."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _counted(f) for name, f in env.filters.items()})
    # no strftime_now: templates then print their fixed default date, so a prompt is the same every day
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"the model's chat template does not compile ({_one_line(e)})") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


@contextmanager
def _deadline(seconds: float):
    """Raise TemplateBudgetError in the template's own code once `seconds` have passed: a trace
    function sees every line it runs (and nothing else), in this thread only."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateBudgetError(f"the chat template ran past its budget of {seconds:g} s "
                                      f"(a loop without end?): a broken or hostile template")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_bounded(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    """The template's output within RENDER_SECONDS and MAX_TEMPLATE_CHARS; every failure of the
    template (its own raise_exception, an undefined name, a type error in its code) is one
    ChatTemplateError line."""
    chunks, size = [], 0
    try:
        with _deadline(RENDER_SECONDS):
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > MAX_TEMPLATE_CHARS:
                    raise _too_big("an output")
                chunks.append(chunk)
    except ChatTemplateError:
        raise
    except Exception as e:  # the template's code is foreign: whatever it raises is its failure
        raise ChatTemplateError(f"the chat template failed on these messages ({_one_line(e)})") from None
    return "".join(chunks)


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
        return render_bounded(self.template, dict(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                  bos_token=self.bos_token, eos_token=self.eos_token))

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
            except TemplateBudgetError:
                raise
            except ChatTemplateError:  # templates that refuse a role (Gemma has no system turn)
                continue
            head = text.split(_SENTINEL)[0]
            eos = self.eos_token
            if eos and eos in head:  # drop a default system turn the template put first
                head = head[head.rfind(eos) + len(eos):]
            ids = self.tokenize(head.lstrip("\n"), special=True) if head.strip() else []
            if ids and ids not in markers:
                markers.append(ids)
        return markers
