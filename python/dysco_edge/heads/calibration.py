"""The QR-head calibration set: seeded examples of short fictional documents and a question.

Each example holds several short encyclopedia-style entries about invented
people, places, objects, societies, plants and dishes (names made from
syllables, facts drawn at random), and one question about one entry: that
entry is the gold document. Only the entry's name links question and
document, so a head that attends from the question to the right entry is
doing query-focused retrieval. Written for dysco-edge; deliberately unlike the
evaluation tasks (no needles, passkeys, key-value lists, paths or variables).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from ..errors import InputError

__all__ = ["CalibrationExample", "make_examples"]

_SYLLABLES = ("ka", "vel", "dor", "mi", "ra", "then", "ol", "bri", "sen", "tor", "lu", "van", "is", "mar",
              "quen", "al", "bo", "rin", "tas", "el", "gor", "fen", "ny", "sul", "dra", "co", "we", "lin")
_PLACE_ENDS = ("holm", "wick", "mere", "ford", "vale", "by", "stead", "moor")
_PROFESSIONS = ("clockmaker", "glassblower", "cartographer", "beekeeper", "violin maker", "bookbinder",
                "astronomer", "potter", "lighthouse keeper", "botanist", "weaver", "stonemason")
_ANIMALS = ("parrot", "tortoise", "ferret", "goat", "owl", "hedgehog", "donkey", "cat")
_WORKS = ("a clock that runs backwards", "a map of the northern caves", "a set of copper bells",
          "a glass bridge model", "a catalogue of moths", "a song about the tides", "a wooden orrery",
          "a treatise on honey")
_GOODS = ("salted fish", "blue wool", "copper wire", "pickled plums", "slate tiles", "rope", "cheese",
          "paper lanterns", "amber beads", "barley")
_GEOGRAPHY = ("northern coast", "eastern plateau", "shore of a cold lake", "edge of a salt marsh",
              "slopes of a dormant volcano", "banks of a slow river", "southern islands", "high moorland")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MATERIALS = ("bronze", "oak", "silver", "whalebone", "granite", "brass", "walnut", "porcelain")
_OBJECTS = ("compass", "lantern", "chess set", "music box", "telescope", "drum", "chalice", "harp")
_TOPICS = ("weather lore", "old maps", "rare stamps", "kite design", "bird song", "river boats",
           "forgotten recipes", "star charts")
_COLOURS = ("violet", "pale yellow", "crimson", "white", "orange", "deep blue", "pink", "green")
_SMELLS = ("pepper", "rain", "lemons", "smoke", "vanilla", "pine resin", "honey", "sea salt")
_INGREDIENTS = ("lentils", "smoked eel", "chestnuts", "goat cheese", "leeks", "dried apricots",
                "mushrooms", "rye bread", "turnips", "walnuts")
_OCCASIONS = ("at weddings", "on the first day of spring", "to travellers", "after the harvest",
              "at funerals", "on market days")


@dataclass(frozen=True)
class CalibrationExample:
    """Documents (title, body), a question about documents[gold], and its answer."""

    documents: tuple[tuple[str, str], ...]
    question: str
    answer: str
    gold: int

    def __post_init__(self) -> None:
        if len(self.documents) < 2:
            raise InputError(f"a calibration example needs >= 2 documents, got {len(self.documents)}")
        if not 0 <= self.gold < len(self.documents):
            raise InputError(f"gold must index a document (0-{len(self.documents) - 1}), got {self.gold}")
        if not self.question.strip() or self.answer not in self.documents[self.gold][1]:
            raise InputError(f"the answer {self.answer!r} must appear in the gold document")


class _Names:
    """Invented names, unique within one example (so only the gold entry carries the asked name)."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def person(self) -> str:
        return self._unique(lambda: f"{_word(self.rng, self.rng.randint(2, 3))} {_word(self.rng, self.rng.randint(2, 3))}")

    def place(self) -> str:
        return self._unique(lambda: _word(self.rng, 2) + self.rng.choice(_PLACE_ENDS))

    def word(self) -> str:
        return self._unique(lambda: _word(self.rng, 2))

    def _unique(self, make: Callable[[], str]) -> str:
        while True:  # names are drawn from ~10^4 combinations: a repeat is rare
            name = make()
            if name not in self.taken:
                self.taken.add(name)
                return name


Entry = tuple[str, str, list[tuple[str, str]]]  # title, body, [(question, answer)]

# ---- one generator per kind of entry ----

def _person(rng: random.Random, names: _Names) -> Entry:
    name, job, town, year = names.person(), rng.choice(_PROFESSIONS), names.place(), str(rng.randint(1701, 1989))
    animal, pet, work = rng.choice(_ANIMALS), names.word(), rng.choice(_WORKS)
    body = (f"{name} is {_a(job)} from the town of {town}, born in {year}. {name.split()[0]} is best known "
            f"for {work}, and keeps a pet {animal} named {pet}.")
    return name, body, [(f"Which town is {name} from?", town), (f"In what year was {name} born?", year),
                        (f"What is the name of {name}'s pet {animal}?", pet),
                        (f"What is {name}'s profession?", job)]


def _place(rng: random.Random, names: _Names) -> Entry:
    name, goods, geo = names.place(), rng.choice(_GOODS), rng.choice(_GEOGRAPHY)
    month, people = rng.choice(_MONTHS), str(rng.randint(120, 9800))
    body = (f"{name} is a village on the {geo}, home to about {people} people. It trades mostly in "
            f"{goods}, and its lantern festival is held every {month}.")
    return name, body, [(f"What does {name} mostly trade in?", goods),
                        (f"In which month is the lantern festival of {name} held?", month),
                        (f"About how many people live in {name}?", people)]


def _object(rng: random.Random, names: _Names) -> Entry:
    thing, material, maker = rng.choice(_OBJECTS), rng.choice(_MATERIALS), names.person()
    title, year = f"The {names.word()} {thing}", str(rng.randint(1400, 1900))
    body = (f"{title} is made of {material} and was finished in {year} by {maker}. It is kept in the "
            f"town hall of {names.place()} and is shown to visitors once a year.")
    return title, body, [(f"What is {_lower_first(title)} made of?", material),
                         (f"Who made {_lower_first(title)}?", maker)]


def _society(rng: random.Random, names: _Names) -> Entry:
    day, topic, members = rng.choice(_WEEKDAYS), rng.choice(_TOPICS), str(rng.randint(12, 480))
    title, town = f"The {names.word()} Society", names.place()
    body = (f"{title} was founded in {town}. Its {members} members meet every {day} evening to "
            f"talk about {topic}.")
    return title, body, [(f"On which day do the members of {_lower_first(title)} meet?", day),
                         (f"What do the members of {_lower_first(title)} talk about?", topic)]


def _plant(rng: random.Random, names: _Names) -> Entry:
    colour, smell, month, geo = rng.choice(_COLOURS), rng.choice(_SMELLS), rng.choice(_MONTHS), \
        rng.choice(_GEOGRAPHY)
    title = f"{names.word()} lily"
    body = (f"The {title} is {_a(colour)} flower that grows only on the {geo}. It opens in {month} "
            f"and smells faintly of {smell}.")
    return title, body, [(f"What colour is the {title}?", colour),
                         (f"What does the {title} smell of?", smell)]


def _dish(rng: random.Random, names: _Names) -> Entry:
    first, second = rng.sample(_INGREDIENTS, 2)
    occasion, town, title = rng.choice(_OCCASIONS), names.place(), f"{names.word()} stew"
    body = (f"{title.capitalize()} is a dish from {town}, cooked slowly with {first} and {second}. "
            f"It is traditionally served {occasion}.")
    return title, body, [(f"Which two ingredients go into {title}?", f"{first} and {second}"),
                         (f"When is {title} traditionally served?", occasion)]


_KINDS: tuple[Callable[[random.Random, _Names], Entry], ...] = (
    _person, _place, _object, _society, _plant, _dish)


def make_examples(count: int, *, seed: int, n_documents: int = 8) -> list[CalibrationExample]:
    """`count` examples, the same for the same seed; entry names are unique within an example."""
    if count < 1 or n_documents < 2:
        raise InputError(f"need count >= 1 and n_documents >= 2, got {count} and {n_documents}")
    rng = random.Random(seed)
    return [_example(rng, n_documents) for _ in range(count)]


def _example(rng: random.Random, n_documents: int) -> CalibrationExample:
    names = _Names(rng)
    documents, questions = [], []
    for _ in range(n_documents):
        title, body, qa = rng.choice(_KINDS)(rng, names)
        documents.append((title, body))
        questions.append(qa)
    gold = rng.randrange(n_documents)
    question, answer = rng.choice(questions[gold])
    return CalibrationExample(tuple(documents), question, answer, gold)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]
