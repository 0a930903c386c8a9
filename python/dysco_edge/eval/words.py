"""Seeded text pieces for the evaluation tasks: filler prose, made-up names, short "pieces".

Everything is drawn from a `random.Random` the caller seeds, so a task instance is a pure
function of its seed. Filler never holds a digit, a capitalised name or the words the tasks
ask about, so an answer can only come from the planted facts.
"""
from __future__ import annotations

import random
import string

ADJECTIVES = (
    "quiet", "bright", "narrow", "gentle", "heavy", "hollow", "patient", "silver", "crooked", "golden",
    "distant", "humble", "restless", "ancient", "careful", "bitter", "tender", "sudden", "wooden", "frozen",
    "dusty", "faded", "steady", "lonely", "mellow", "rustic", "spare", "vivid", "brisk", "solemn",
    "curious", "modest", "pale", "rough", "sleepy", "stubborn", "warm", "wild", "humid", "plain",
)
NOUNS = (
    "river", "lantern", "orchard", "window", "harbor", "meadow", "kettle", "bridge", "garden", "ladder",
    "village", "market", "forest", "cellar", "letter", "engine", "basket", "valley", "mirror", "candle",
    "blanket", "chimney", "compass", "fountain", "hammer", "island", "journal", "meadowlark", "notebook", "pillow",
    "quarry", "saddle", "teacup", "tunnel", "violin", "wagon", "workshop", "barn", "cliff", "drum",
)
VERBS = (
    "rests", "waits", "shines", "drifts", "leans", "hums", "settles", "wanders", "glows", "creaks",
    "sways", "lingers", "sleeps", "turns", "listens", "gathers", "fades", "returns", "echoes", "stays",
)
PLACES = (
    "the old road", "the hillside", "the quiet square", "the riverbank", "the station", "the courtyard",
    "the far shore", "the edge of town", "the empty field", "the stone wall", "the back porch", "the attic",
)
TIMES = (
    "in the morning", "at dusk", "after the rain", "before winter", "all afternoon", "late at night",
    "during the fair", "every spring", "on cloudy days", "at the end of summer",
)
TOPICS = (
    "rain", "the sea", "autumn", "a lighthouse", "bread", "a fox", "the moon", "trains",
    "a garden", "snow", "coffee", "a library",
)
KINDS = ("poem", "riddle", "slogan", "limerick")
VAULT_NAMES = (
    "amber", "cobalt", "crimson", "emerald", "indigo", "ivory", "jade", "lilac", "maroon", "ochre",
    "olive", "saffron", "scarlet", "teal", "umber", "violet",
)
_SYLLABLES = (
    "bar", "cel", "dor", "fen", "gal", "hob", "ist", "jor", "kel", "lum", "mar", "nev",
    "ost", "pel", "quin", "ros", "sal", "tor", "ulm", "vad", "wen", "yar", "zel", "bri",
)


def filler_sentence(rng: random.Random) -> str:
    """One sentence of harmless prose (no digits, no capitalised names after the first word)."""
    adj, noun, verb = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    shape = rng.randrange(4)
    if shape == 0:
        return f"The {adj} {noun} {verb} near {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if shape == 1:
        return f"Nobody remembers why the {adj} {noun} by {rng.choice(PLACES)} {verb}."
    if shape == 2:
        return f"A {adj} {noun} {verb} {rng.choice(TIMES)}, and the {rng.choice(NOUNS)} {rng.choice(VERBS)} too."
    return f"Near {rng.choice(PLACES)}, a {rng.choice(ADJECTIVES)} {noun} {verb} beside a {adj} {rng.choice(NOUNS)}."


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    return [filler_sentence(rng) for _ in range(count)]


def number(rng: random.Random, digits: int) -> str:
    """A random number with exactly `digits` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def distinct(rng: random.Random, draw, count: int, taken: set) -> list:
    """`count` values of draw(rng), none already in `taken` (which is updated)."""
    out = []
    while len(out) < count:
        value = draw(rng)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def city_name(rng: random.Random) -> str:
    parts = [rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))]
    return "".join(parts).capitalize()


def city_names_apart(rng: random.Random, count: int, taken: set) -> list[str]:
    """`count` city names that all start with different syllables (names alike confuse small
    models more than the task means to), none in `taken` (which is updated)."""
    out: list[str] = []
    for first in rng.sample(_SYLLABLES, count):
        out += distinct(rng, lambda r: (first + r.choice(_SYLLABLES)).capitalize(), 1, taken)
    return out


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def record_key(rng: random.Random) -> str:
    """A key like 'quiet-lantern-orchard' (no digits: values are the only numbers)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.choice(NOUNS)}"


def piece(rng: random.Random, kind: str, topic: str) -> str:
    """A one-line creative 'piece' of a kind about a topic, for the coreference task."""
    a, b = rng.sample(ADJECTIVES, 2)
    n1, n2 = rng.sample(NOUNS, 2)
    verb, place, time = rng.choice(VERBS), rng.choice(PLACES), rng.choice(TIMES)
    if kind == "poem":
        return f"{a.capitalize()} {topic} over the {n1}, / the {b} {n2} {verb} {time}."
    if kind == "riddle":
        return f"What is {a} like {topic} and {verb} by {place}? A {b} {n1} with a {n2}."
    if kind == "slogan":
        return f"{a.capitalize()} {topic}, {b} {n1}: {place} {verb} with your {n2}!"
    return f"There once was some {topic} so {a}, / it {verb} by a {b} {n1} {time}, / then slept in a {n2}."
