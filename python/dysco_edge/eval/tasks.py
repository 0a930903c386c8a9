"""Long-context evaluation tasks, generated locally from a seed at a requested length in tokens.

Five tasks answered in a few tokens: multi-key passkey retrieval in filler prose, key-value
lookup in a JSON object, path traversal (every city has one outgoing road; follow h hops),
MRCR-style multi-round coreference (reproduce the n-th of several similar requests), and
variable tracking. Three whose answers are long, the kind the paper's gains come from: route
listing (every city along a route, one per line), long-answer MRCR (reproduce a passage of
100-300 tokens) and chain tracing (follow assignments back step by step, then answer).

A task builder turns (rng, units) into a Draft; `make_case` picks the largest number of
units whose prompt, measured with the caller's tokenizer, leaves room for the answer inside
`length` tokens. A case's seed is a hash of (base seed, task, split, length, index), so dev
and test cases are drawn from disjoint seeds and never share an instance.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import words
from .scoring import SCORERS
from ..errors import InputError

SPLITS = ("dev", "test")
Gold = str | tuple[str, ...]
Measure = Callable[["Prompt"], int]  # prompt -> tokens the model sees, answer prefix included

FIT_TOLERANCE = 0.005  # stop searching once the prompt is within 0.5% under its budget


@dataclass(frozen=True)
class Prompt:
    """A conversation (role, content) and text the answer starts with (fed, not scored)."""
    turns: tuple[tuple[str, str], ...]
    answer_prefix: str = ""

    def __post_init__(self):
        if not self.turns or self.turns[-1][0] != "user":
            raise InputError(f"a prompt must end with a user turn, got roles {[r for r, _ in self.turns]}")
        for role, _ in self.turns:
            if role not in ("system", "user", "assistant"):
                raise InputError(f"unknown role {role!r}: use system, user or assistant")

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def text(self) -> str:
        """Every turn's content and the answer prefix, for checks that read the prompt."""
        return "\n".join(content for _, content in self.turns) + "\n" + self.answer_prefix


@dataclass(frozen=True)
class Draft:
    """One task instance before its length is known to fit."""
    prompt: Prompt
    gold: Gold
    scorer: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    evidence: tuple[str, ...] = ()  # prompt text the answer comes from (attention measurements)

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise InputError(f"unknown scoring rule {self.scorer!r}; known: {', '.join(SCORERS)}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Case:
    task: str
    split: str
    length: int
    index: int
    seed: int
    draft: Draft
    n_tokens: int  # the prompt as measured; n_tokens + draft.max_new_tokens <= length

    def __post_init__(self):
        check_split(self.split)
        if self.n_tokens + self.draft.max_new_tokens > self.length:
            raise InputError(f"case {self.task}@{self.length}#{self.index}: {self.n_tokens} prompt tokens + "
                             f"{self.draft.max_new_tokens} answer tokens exceed the length")


Builder = Callable[[random.Random, int], Draft]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Builder
    min_units: int
    about: str
    long_answer: bool = False
    knobs: tuple[tuple[str, int, int], ...] = ()  # difficulty options (name, low, high): "route:hops=8"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def case_seed(task: str, split: str, length: int, index: int, base_seed: int = 0) -> int:
    """A 63-bit seed from the case's identity; the split is part of it, so splits never share one."""
    check_split(split)
    key = f"dysco-edge-eval|{base_seed}|{task}|{split}|{length}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def insert_at_depths(items: Sequence[Any], needles: Sequence[Any], depths: Sequence[float]) -> list[Any]:
    """items with each needle inserted at depth*len(items); ties keep the needles' order."""
    slots = sorted(range(len(needles)), key=lambda i: (round(depths[i] * len(items)), i))
    out, taken = [], 0
    for i in slots:
        at = round(depths[i] * len(items))
        out.extend(items[taken:at])
        out.append(needles[i])
        taken = at
    out.extend(items[taken:])
    return out


def prose(sentences: Sequence[str], per_paragraph: int = 8) -> str:
    return "\n\n".join(" ".join(sentences[i:i + per_paragraph]) for i in range(0, len(sentences), per_paragraph))


# ---- the tasks ----

PASSKEYS = 4
HOPS = 3
MRCR_REPEATS = 3
VT_CHAIN, VT_CHAINS = 4, 2


def build_passkey(rng: random.Random, units: int) -> Draft:
    names = rng.sample(words.VAULT_NAMES, PASSKEYS)
    values = words.distinct(rng, lambda r: words.number(r, 6), PASSKEYS, set())
    depths = [rng.random() for _ in names]
    target = rng.randrange(PASSKEYS)
    needles = [f"The secret passkey of the {n} vault is {v}. Remember it." for n, v in zip(names, values)]
    body = prose(insert_at_depths(words.filler_sentences(rng, units), needles, depths))
    ask = f"What is the secret passkey of the {names[target]} vault?"
    content = (f"Several secret passkeys are hidden in the text below. Memorize them; you will be asked "
               f"for one.\n\n{body}\n\n{ask} Answer with the number only.")
    prompt = Prompt((("user", content),), f"The secret passkey of the {names[target]} vault is")
    return Draft(prompt, values[target], "first_number", 12, ("\n",),
                 {"depth": round(depths[target], 4), "keys": PASSKEYS})


def build_kv(rng: random.Random, units: int) -> Draft:
    keys: set[str] = set()
    values: set[str] = set()
    key, value = _record(rng, keys, values)
    depth = rng.random()
    records = [_json_line(*_record(rng, keys, values)) for _ in range(units)]
    lines = insert_at_depths(records, [_json_line(key, value)], [depth])
    lines[-1] = lines[-1].rstrip(",")
    ask = f'What is the value of the key "{key}" in the JSON object above?'
    content = "Here is a JSON object of key-value pairs.\n\n{\n" + "\n".join(lines) + f"\n}}\n\n{ask}"
    prompt = Prompt((("user", content),), f'The value of "{key}" is')
    return Draft(prompt, value, "first_number", 12, ("\n",), {"depth": round(depth, 4)})


def _record(rng: random.Random, keys: set, values: set) -> tuple[str, str]:
    """A key and a value, each unlike any drawn before (keys and values are looked up by identity)."""
    key = words.distinct(rng, words.record_key, 1, keys)[0]
    return key, words.distinct(rng, lambda r: words.number(r, 6), 1, values)[0]


def _json_line(key: str, value: str) -> str:
    return f'  "{key}": "{value}",'


def build_path(rng: random.Random, units: int) -> Draft:
    taken: set[str] = set()
    chain = words.distinct(rng, words.city_name, HOPS + 1, taken)
    depths = [rng.random() for _ in chain]
    pool, roads = list(chain), []
    for _ in range(units):  # every city gets one outgoing road, to a city named before it
        city = words.distinct(rng, words.city_name, 1, taken)[0]
        roads.append(_road(city, rng.choice(pool)))
        pool.append(city)
    links = [_road(chain[i], chain[(i + 1) % len(chain)]) for i in range(len(chain))]
    body = "\n".join(insert_at_depths(roads, links, depths))
    ask = (f"Every city above has exactly one outgoing one-way road. Start in {chain[0]} and follow the "
           f"roads for {HOPS} steps. Give the route as: city -> city -> city.")
    content = f"Here is a list of one-way roads between cities.\n\n{body}\n\n{ask}"
    prompt = Prompt((("user", content),), f"Route: {chain[0]} ->")
    return Draft(prompt, tuple(chain[1:]), "path_prefix", 24, ("\n",),
                 {"depth": round(depths[0], 4), "hops": HOPS})


def _road(a: str, b: str) -> str:
    return f"There is a one-way road from {a} to {b}."


def build_mrcr(rng: random.Random, units: int) -> Draft:
    kind, topic = rng.choice(words.KINDS), rng.choice(words.TOPICS)
    nth = rng.randrange(MRCR_REPEATS) + 1
    depths = sorted(rng.random() for _ in range(MRCR_REPEATS))
    targets = words.distinct(rng, lambda r: words.piece(r, kind, topic), MRCR_REPEATS, set())
    rounds = [_round(k, t, words.piece(rng, k, t)) for k, t in
              (_other_request(rng, kind, topic) for _ in range(units))]
    turns = [turn for pair in insert_at_depths(rounds, [_round(kind, topic, p) for p in targets], depths)
             for turn in pair]
    ask = (f"Reproduce the {_ORDINALS[nth]} {kind} about {topic} that you wrote in this conversation, "
           f"exactly as written, and nothing else.")
    prompt = Prompt(tuple(turns) + (("user", ask),))
    return Draft(prompt, targets[nth - 1], "sequence_ratio", 48, (),
                 {"depth": round(depths[nth - 1], 4), "nth": nth, "repeats": MRCR_REPEATS})


_ORDINALS = dict(enumerate(("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"), 1))


def _other_request(rng: random.Random, kind: str, topic: str,
                   kinds: tuple[str, ...] = words.KINDS) -> tuple[str, str]:
    while True:
        pair = (rng.choice(kinds), rng.choice(words.TOPICS))
        if pair != (kind, topic):
            return pair


def _round(kind: str, topic: str, text: str) -> tuple:
    return (("user", f"Write a {kind} about {topic}."), ("assistant", text))


def build_vt(rng: random.Random, units: int) -> Draft:
    taken: set[str] = set()
    values = words.distinct(rng, lambda r: words.number(r, 5), VT_CHAINS, set())
    statements, depths, chains = [], [], []
    for value in values:
        names = words.distinct(rng, words.variable_name, VT_CHAIN, taken)
        chains.append(names)
        statements += [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        depths += sorted(rng.random() for _ in names)
    body = prose(insert_at_depths(words.filler_sentences(rng, units), statements, depths))
    ask = (f"Find every variable that is assigned the value {values[0]}, directly or through other "
           f"variables, in the text above.")
    content = f"Memorize the variable assignments hidden in the text below.\n\n{body}\n\n{ask}"
    prompt = Prompt((("user", content),), f"The variables that hold the value {values[0]} are:")
    # no newline stop: models often start the list on a new line after the colon
    return Draft(prompt, tuple(chains[0]), "set_overlap", 40, (),
                 {"depth": round(depths[0], 4), "chain": VT_CHAIN})


# ---- tasks whose answers are long ----
# Defaults: the levels calibrated on the dev split for plain decoding of Qwen2.5-Coder-1.5B-Instruct
# at 8K (aim 20-70%; docs/eval/qwen15-long-calibration.md): route 0.32, passage 0.52, chain 0.15.

ROUTE_HOPS, ROUTE_DECOYS = 8, 1  # decoys: roads between other cities, per hop of the route
# 1: the route's roads come in route order, among the decoys (a travel log): a small model lists
# roads in the order it read them rather than following them (Qwen2.5-Coder-1.5B at 2K)
ROUTE_ORDERED = 1
PASSAGE_REPEATS = 3
PASSAGE_PIECES = (6, 12)  # lines per passage: 100-300 tokens
# what a passage is asked as -> the kind of its lines (words.piece)
PASSAGE_FORMS = {"poem": "poem", "list of slogans": "slogan", "set of riddles": "riddle", "song": "limerick"}
CHAIN_HOPS, CHAIN_DECOYS = 3, 2  # the easiest level tried; still below 20% at 8K


def build_route(rng: random.Random, units: int, hops: int = ROUTE_HOPS, decoys: int = ROUTE_DECOYS,
                ordered: int = ROUTE_ORDERED) -> Draft:
    taken: set[str] = set()
    route = words.city_names_apart(rng, hops + 1, taken)
    links = [_road(a, b) for a, b in itertools.pairwise(route)]
    others = _decoy_roads(rng, taken, hops * decoys)
    depths = [rng.random() for _ in links]
    depths = sorted(depths) if ordered else depths
    body = prose(insert_at_depths(words.filler_sentences(rng, units), links + others,
                                  depths + [rng.random() for _ in others]))
    ask = (f"Start in {route[0]} and follow the one-way roads for {hops} steps. List the cities you reach "
           f"as a numbered list, one per line (1. is the city one road away from {route[0]}), and nothing else.")
    content = f"The text below mentions one-way roads between cities.\n\n{body}\n\n{ask}"
    prompt = Prompt((("user", content),), "1.")  # the list started: no preamble to score around
    return Draft(prompt, tuple(route[1:]), "path_prefix", 6 * hops + 8, ("\n\n",),
                 {"hops": hops, "decoys": len(others), "ordered": ordered}, tuple(links))


def _decoy_roads(rng: random.Random, taken: set, count: int) -> list[str]:
    """Roads that never touch the route: a chain of other cities, so that following one from a
    route city is never ambiguous, yet the text holds more roads than the route."""
    cities = words.distinct(rng, words.city_name, count + 1, taken) if count else []
    return [_road(a, b) for a, b in itertools.pairwise(cities)]


def build_passage(rng: random.Random, units: int, repeats: int = PASSAGE_REPEATS) -> Draft:
    form, topic = rng.choice(list(PASSAGE_FORMS)), rng.choice(words.TOPICS)
    nth = rng.randrange(repeats) + 1
    depths = sorted(rng.random() for _ in range(repeats))
    targets = [_passage(rng, form, topic) for _ in range(repeats)]
    others = (_other_request(rng, form, topic, tuple(PASSAGE_FORMS)) for _ in range(units))
    rounds = [_round(f, t, _passage(rng, f, t)) for f, t in others]
    turns = [turn for pair in insert_at_depths(rounds, [_round(form, topic, p) for p in targets], depths)
             for turn in pair]
    ask = (f"Reproduce the {_ORDINALS[nth]} {form} about {topic} that you wrote in this conversation, "
           f"exactly as written, every line of it, and nothing else.")
    gold = targets[nth - 1]
    return Draft(Prompt(tuple(turns) + (("user", ask),)), gold, "sequence_ratio", len(gold) // 3 + 32, (),
                 {"depth": round(depths[nth - 1], 4), "nth": nth, "repeats": repeats,
                  "gold_chars": len(gold)}, (gold,))


def _passage(rng: random.Random, form: str, topic: str) -> str:
    """Lines of one kind and topic: passages asked for the same way differ only in their words."""
    return "\n".join(words.piece(rng, PASSAGE_FORMS[form], topic) for _ in range(rng.randint(*PASSAGE_PIECES)))


def build_chain(rng: random.Random, units: int, hops: int = CHAIN_HOPS, decoys: int = CHAIN_DECOYS) -> Draft:
    taken: set[str] = set()
    values = words.distinct(rng, lambda r: words.number(r, 5), decoys + 1, set())
    chains = [words.distinct(rng, words.variable_name, hops + 1, taken) for _ in values]
    facts = [line for names, value in zip(chains, values) for line in _assignments(names, value)]
    body = prose(insert_at_depths(words.filler_sentences(rng, units), facts, [rng.random() for _ in facts]))
    asked = chains[0][-1]
    ask = (f"What is the value of VAR {asked}? Work backwards: write each assignment you follow on its own "
           f"line, exactly as it appears in the text, until you reach a number; then write 'Answer: ' "
           f"and the number.")
    content = f"Variable assignments are hidden in the text below.\n\n{body}\n\n{ask}"
    prompt = Prompt((("user", content),), f"VAR {asked} = VAR")  # the first step written, not skipped
    # no blank-line stop: models often leave one before the answer line
    return Draft(prompt, values[0], "final_number", 12 * hops + 24, (),
                 {"hops": hops, "decoys": decoys}, tuple(_assignments(chains[0], values[0])))


def _assignments(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("passkey", build_passkey, 8, "multi-key passkey retrieval in filler prose"),
    TaskSpec("kv", build_kv, 8, "key-value lookup in a JSON object"),
    TaskSpec("path", build_path, 8, f"path traversal, {HOPS} hops, one outgoing road per city"),
    TaskSpec("mrcr", build_mrcr, 4, f"multi-round coreference: reproduce the n-th of {MRCR_REPEATS} requests"),
    TaskSpec("vt", build_vt, 8, f"variable tracking, chains of {VT_CHAIN}"),
    TaskSpec("route", build_route, 8, f"route listing: every city along {ROUTE_HOPS} hops, one per line", True,
             (("hops", 1, 16), ("decoys", 0, 8), ("ordered", 0, 1))),
    TaskSpec("passage", build_passage, 2, f"long-answer MRCR: reproduce the n-th of {PASSAGE_REPEATS} passages "
                                          f"of {PASSAGE_PIECES[0]}-{PASSAGE_PIECES[1]} lines", True,
             (("repeats", 1, 8),)),
    TaskSpec("chain", build_chain, 8, f"chain tracing: {CHAIN_HOPS} assignments followed back step by step, "
                                      f"then the value", True, (("hops", 1, 16), ("decoys", 0, 8))),
)}
LONG_TASKS = tuple(name for name, spec in TASKS.items() if spec.long_answer)


def task_spec(name: str) -> TaskSpec:
    """A task by name, with difficulty options where it has knobs: 'route', 'route:hops=8'."""
    base, _, rest = name.partition(":")
    try:
        spec = TASKS[base]
    except KeyError:
        raise InputError(f"unknown task {base!r}; known: {', '.join(TASKS)}") from None
    if not rest:
        return spec
    options = dict(_task_option(spec, item) for item in rest.split("+"))
    return replace(spec, name=name, build=functools.partial(spec.build, **options))


def _task_option(spec: TaskSpec, item: str) -> tuple[str, int]:
    key, _, value = item.partition("=")
    bounds = {name: (low, high) for name, low, high in spec.knobs}
    if key not in bounds:
        raise InputError(f"task {spec.name}: unknown option {key!r} (options: {', '.join(bounds) or 'none'})")
    low, high = bounds[key]
    if not value.isdigit() or not low <= int(value) <= high:
        raise InputError(f"task {spec.name}: {key} must be a whole number from {low} to {high}, got {value!r}")
    return key, int(value)


def make_case(task: str, *, split: str, length: int, index: int, measure: Measure, base_seed: int = 0) -> Case:
    """The case `index` of a task at a length: its prompt is as long as fits, never longer."""
    spec = task_spec(task)
    seed = case_seed(task, split, length, index, base_seed)
    sizes: dict[int, tuple[Draft, int]] = {}

    def size(units: int) -> int:
        if units not in sizes:
            draft = spec.build(random.Random(seed), units)  # same seed: more units only adds filler
            sizes[units] = (draft, measure(draft.prompt))
        return sizes[units][1]

    budget = length - spec.build(random.Random(seed), spec.min_units).max_new_tokens
    if size(spec.min_units) > budget:
        raise InputError(f"length {length} is too short for task {task}: its smallest prompt is "
                         f"{size(spec.min_units)} tokens plus the answer; use a longer length")
    units = fit_units(size, budget, spec.min_units)
    draft, n_tokens = sizes[units]
    return Case(task, split, length, index, seed, draft, n_tokens)


def fit_units(size: Callable[[int], int], budget: int, low: int) -> int:
    """The largest units with size(units) <= budget, to within FIT_TOLERANCE; size(low) must fit.

    Interpolates between the largest size known to fit and the smallest known not to (or the
    rate so far), since tokenizing a long prompt is the expensive part: 3-5 sizes at 32K tokens.
    """
    lo, hi = low, None
    rate = max(1e-6, (size(low + 8) - size(low)) / 8)
    while size(lo) < budget * (1 - FIT_TOLERANCE):
        if hi is None:
            guess = lo + max(1, int((budget - size(lo)) / rate))
        else:
            guess = lo + int((budget - size(lo)) * (hi - lo) / max(1, size(hi) - size(lo)))
            guess = min(max(guess, lo + 1), hi - 1)
        if hi is not None and hi - lo <= 1:
            break
        if size(guess) <= budget:
            lo = guess
            rate = max(1e-6, (size(lo) - size(low)) / (lo - low))
        else:
            hi = guess
    return lo
