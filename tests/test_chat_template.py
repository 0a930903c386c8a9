"""Chat templates come with model files: rendered in Jinja's sandbox with a time and size budget,
and every failure of theirs is one ChatTemplateError line (the server answers it with a 400)."""
from __future__ import annotations

import sys
import threading
import time

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dysco_edge.errors import ChatTemplateError, DyscoEdgeError, TemplateBudgetError
from dysco_edge.runtime import chat
from dysco_edge.runtime.chat import ChatTemplate, compile_template

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
             "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, é ✓ {{ not code }}"}]


def template(source: str) -> ChatTemplate:
    # byte "tokens", none of them a control token: these tests are about rendering, not vocabularies
    return ChatTemplate(compile_template(source), "<s>", "</s>", lambda text, special=False: list(text.encode()),
                        lambda token: False, lambda token: chr(token))


def rendered_within(source: str, seconds: float, messages=MESSAGES, how=lambda t, m: t.render(m)):
    """What render gives (or raises), failing the test instead of hanging when it does not end."""
    outcome = []

    def render():
        try:
            outcome.append(how(template(source), messages))
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(e)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"rendering ran past {seconds} s")
    return outcome[0]


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5, raising=False)
    monkeypatch.setattr(chat, "MAX_TEMPLATE_CHARS", 1 << 20, raising=False)


@pytest.fixture
def size_budget(monkeypatch):
    """A small size budget and time enough for it to be what stops the template (on a busy machine too)."""
    monkeypatch.setattr(chat, "RENDER_SECONDS", 60, raising=False)
    monkeypatch.setattr(chat, "MAX_TEMPLATE_CHARS", 1 << 20, raising=False)


def test_long_numbers_in_messages_and_ordinary_formats_are_not_budget_errors(small_budget):
    messages = [{"role": "user", "content": "call 123456789012345 at 50% off; %099999999d {:>99999999}"}]
    source = ("{{ messages[0]['content'] | trim }} {{ '%5.1f%%' % 3.14159 }} {{ '{}-{:.2f}'.format(1, 2) }} "
              "{{ '%d' % 123456789012 ~ '!' ~ 7 }}{% autoescape true %} {{ '<b>' ~ messages[0]['role'] }}"
              "{% endautoescape %}")
    assert template(source).render(messages) == (
        "call 123456789012345 at 50% off; %099999999d {:>99999999}   3.1% 1-2.00 123456789012!7 &lt;b&gt;user")


def test_real_templates_render_as_jinjas_own_sandbox_renders_them():
    for source in (CHATML, NO_SYSTEM.replace("raise_exception('System role not supported')", "''")):
        plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        for add in (True, False):
            expected = plain.render(messages=MESSAGES, add_generation_prompt=add, bos_token="<s>", eos_token="</s>")
            assert template(source).render(MESSAGES, add_generation_prompt=add) == expected
    tracer = sys.gettrace()
    template(CHATML).render(MESSAGES)
    assert sys.gettrace() is tracer  # a debugger's or coverage's tracer is put back


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% for i in range(100000) %}{% endfor %}{{ f(n) if n else '' }}{% endmacro %}{{ f(5) }}",
])
def test_a_template_that_runs_without_end_stops_at_its_time_budget(small_budget, source):
    """Nested range(100000) loops ran for ever (the server's only worker with them)."""
    start = time.perf_counter()
    outcome = rendered_within(source, 30)
    assert isinstance(outcome, TemplateBudgetError) and "budget of 0.5 s" in str(outcome)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("source, what", [
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "an output"),
    ("{{ 'x' * 10**8 }}", "a repeated string or list"),
    ("{{ ['x'] * 10**8 }}", "a repeated string or list"),
    ("{{ 'x'.center(10**7) }}", "with a count of 10000000"),
    ("{{ 'x' | center(10**7) }}", "with a count of 10000000"),
    ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "a joined string or list"),
    ("{{ '%099999999d' % 1 }}", "with a format width past it"),
    ("{{ '%(a).99999999f' % {'a': 1.5} }}", "with a format width past it"),
    ("{{ '{:>99999999}'.format(1) }}", "with a format width past it"),
    ("{{ ('x' * 1000000) | list | join('ab') }}", "a string or list"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a joined string"),
    ("{% set ns = namespace(s='x') %}{% autoescape true %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{% endautoescape %}", "a joined string"),
    ("{{ 10 ** 100000000 }}", "computes a power"),
    ("{{ ((((3 ** 60) ** 60) ** 60) ** 60) ** 60 }}", "computes a power"),
])
def test_a_template_building_huge_values_stops_at_its_size_budget(size_budget, source, what):
    outcome = rendered_within(source, 120)
    assert isinstance(outcome, TemplateBudgetError) and what in str(outcome), outcome


@pytest.mark.parametrize("source, messages, text", [
    (NO_SYSTEM, MESSAGES, "System role not supported"),
    ("{{ messages[0].content.nope() }}", MESSAGES, "UndefinedError"),
    ("{{ 1 + messages[0]['content'] }}", MESSAGES, "TypeError"),
    ("{{ messages[5]['content'] }}", MESSAGES, "UndefinedError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", MESSAGES, "RecursionError"),
    ("{{ messages.__class__.__mro__ }}", MESSAGES, "SecurityError"),
    ("{{ messages[0]['content'] // 0 }}", [{"role": "user", "content": 1}], "ZeroDivisionError"),
])
def test_template_failures_are_one_line_chat_template_errors(source, messages, text):
    with pytest.raises(ChatTemplateError, match=text) as caught:
        template(source).render(messages)
    assert "\n" not in str(caught.value) and isinstance(caught.value, (DyscoEdgeError, ValueError))


@pytest.mark.parametrize("source", ["{% for %}", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "{% endif %}"])
def test_a_template_that_does_not_compile_is_one_line(source):
    with pytest.raises(ChatTemplateError, match="does not compile") as caught:
        compile_template(source)
    assert "\n" not in str(caught.value)


def test_role_markers_skip_a_refused_role_but_not_a_runaway_template(small_budget):
    assert template(NO_SYSTEM).role_markers() == [list(b"<start_of_turn>user\n"), list(b"<start_of_turn>assistant\n")]
    runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    assert isinstance(rendered_within(runaway, 30, how=lambda t, m: t.role_markers()), TemplateBudgetError)


def test_jinja_itself_is_not_changed():
    """The budget lives in our environment subclass; Jinja's own sandbox still builds values freely."""
    env = ImmutableSandboxedEnvironment()
    assert len(env.from_string("{{ 'x' * 3000 }}").render()) == 3000
    assert not isinstance(jinja2.TemplateError("x"), DyscoEdgeError)
