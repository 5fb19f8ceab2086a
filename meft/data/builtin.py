"""Built-in QA datasets, generated at run time (nothing downloaded, nothing shipped).

* `world_facts`: facts about countries from the MIT-licensed `countryinfo` package (capital, region,
  subregion, calling code, currency code, demonym, top-level domain, ISO code). Several question
  phrasings per relation: the train split asks every fact with the *train* phrasings, the eval split
  asks the same facts with a phrasing never seen in training (so it measures recall of the trained
  fact, not of the string). Countries missing a requested field are left out.
* `fictional_facts(n, seed)`: `n` invented facts about invented people (birthplace, employer, pet,
  instrument, ...), seeded, any size: pure memorization capacity, no prior knowledge helps.

Answers are short (one to three words) so exact match is meaningful. Every record is
``{"prompt", "completion", "answers", "subject", "relation"}``; `answers` lists every accepted answer.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["FactSet", "WORLD_RELATIONS", "DEFAULT_WORLD_RELATIONS", "FICTIONAL_RELATIONS", "world_facts",
           "fictional_facts", "load_builtin", "BUILTIN_NAMES"]

BUILTIN_NAMES = ("world_facts", "fictional_facts")


@dataclass
class FactSet:
    """A built-in QA dataset: train records, eval records (same facts, unseen phrasings), answers."""

    name: str
    train: list[dict]
    eval: list[dict]

    @property
    def answers(self) -> dict[tuple[str, str], list[str]]:
        """(subject, relation) -> accepted answers, for scoring."""
        return {(r["subject"], r["relation"]): r["answers"] for r in self.train}

    @property
    def n_facts(self) -> int:
        return len(self.answers)


# Per relation: (field getter -> list of answers or None, phrasings). The last `_N_EVAL` phrasings of
# each relation are held out for the eval split.
_N_EVAL = 2


def _first(key: str) -> Callable[[dict], list[str] | None]:
    return lambda c: [v for v in (c.get(key) or []) if v] or None


def _scalar(key: str) -> Callable[[dict], list[str] | None]:
    return lambda c: [c[key]] if isinstance(c.get(key), str) and c[key].strip() else None


def _calling(c: dict) -> list[str] | None:
    codes = _first("callingCodes")(c)
    return [f"+{codes[0]}"] if codes else None


def _iso3(c: dict) -> list[str] | None:
    code = (c.get("ISO") or {}).get("alpha3")
    return [code] if code else None


WORLD_RELATIONS: dict[str, tuple[Callable[[dict], list[str] | None], tuple[str, ...]]] = {
    "capital": (_scalar("capital"), (
        "What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}.",
        "{s} has its capital in which city?", "What city serves as the capital of {s}?")),
    "region": (_scalar("region"), (
        "In which world region is {s}?", "Which region of the world is {s} part of?",
        "{s} lies in which region of the world?", "To which world region does {s} belong?",
        "Name the world region that contains {s}.")),
    "subregion": (_scalar("subregion"), (
        "In which subregion is {s}?", "Which subregion of the world is {s} part of?",
        "{s} lies in which subregion?", "To which subregion does {s} belong?",
        "Name the subregion that contains {s}.")),
    "calling_code": (_calling, (
        "What is the international calling code of {s}?", "Which telephone country code does {s} use?",
        "What do you dial to call {s} from abroad?", "The phone country code of {s} is what?",
        "Which calling code belongs to {s}?")),
    "currency": (_first("currencies"), (
        "What is the ISO currency code of {s}?", "Which three-letter currency code is used in {s}?",
        "What currency code does {s} use?", "Name the ISO 4217 currency code of {s}.",
        "The currency of {s} has which ISO code?")),
    "demonym": (_scalar("demonym"), (
        "What is the demonym for people from {s}?", "What are people from {s} called?",
        "A person from {s} is called what?", "What word describes a citizen of {s}?",
        "How do you call someone from {s}?")),
    "tld": (_first("tld"), (
        "What is the internet top-level domain of {s}?", "Which country-code domain does {s} use?",
        "Websites in {s} end with which domain?", "Name the top-level domain of {s}.",
        "What is the web domain suffix of {s}?")),
    "iso3": (_iso3, (
        "What is the three-letter ISO code of {s}?", "Which ISO alpha-3 code stands for {s}?",
        "What is the ISO 3166 alpha-3 code of {s}?", "Give the three-letter country code of {s}.",
        "{s} has which alpha-3 country code?")),
}
DEFAULT_WORLD_RELATIONS = ("capital", "region", "calling_code", "currency")


@functools.cache
def _countries() -> tuple[dict, ...]:
    """Every country record of `countryinfo` (~0.05 s; cached for the process)."""
    try:
        from countryinfo import all_countries
    except ImportError:
        raise ValueError("the built-in world_facts data needs `countryinfo`; "
                         "fix: pip install countryinfo") from None
    return tuple(sorted((c.info() for c in all_countries()), key=lambda c: c["name"]))


def _split(facts: list[tuple[str, str, list[str], tuple[str, ...]]], seed: int,
           n_eval: int) -> tuple[list[dict], list[dict]]:
    """facts = (subject, relation, answers, phrasings) -> (train records, eval records)."""
    rng = random.Random(seed)
    train, held = [], []
    for subject, relation, answers, phrasings in facts:
        base = {"completion": answers[0], "answers": answers, "subject": subject, "relation": relation}
        for p in phrasings[:-n_eval]:
            train.append({"prompt": p.format(s=subject), **base})
        held.append({"prompt": rng.choice(phrasings[-n_eval:]).format(s=subject), **base})
    return train, held


def world_facts(relations: Sequence[str] = DEFAULT_WORLD_RELATIONS, *, max_countries: int | None = None,
                seed: int = 0) -> FactSet:
    """World facts from `countryinfo`.

    `relations`: names from `WORLD_RELATIONS` (default: capital, region, calling_code, currency).
    Countries lacking any requested relation are dropped; `max_countries` keeps a seeded random subset.
    Train: every fact with each of 3 train phrasings. Eval: every fact once, with one of 2 held-out
    phrasings (seeded).
    """
    unknown = [r for r in relations if r not in WORLD_RELATIONS]
    if unknown or not relations:
        raise ValueError(f"relations={list(relations)!r}: unknown {unknown}; "
                         f"choose from {list(WORLD_RELATIONS)}")
    rows = []
    for c in _countries():
        got = {r: WORLD_RELATIONS[r][0](c) for r in relations}
        if all(got.values()):
            rows.append((c["name"], got))
    if max_countries is not None:
        rows = sorted(random.Random(seed).sample(rows, min(max_countries, len(rows))))
    facts = [(name, r, got[r], WORLD_RELATIONS[r][1]) for name, got in rows for r in relations]
    train, held = _split(facts, seed, _N_EVAL)
    return FactSet("world_facts", train, held)


_SYL = ("ka", "lo", "mi", "ra", "ven", "tor", "zel", "qui", "bar", "dun", "fen", "gal", "hob", "jin",
        "kor", "lun", "mar", "nix", "ost", "pel", "rud", "sal", "tam", "ulv", "vor", "wyn", "yas", "zor",
        "bel", "cra")
_INSTRUMENTS = ("violin", "cello", "flute", "oboe", "harp", "trumpet", "banjo", "drums", "piano", "clarinet",
                "tuba", "lute", "sitar", "accordion", "bagpipes", "guitar")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "silver", "gold",
           "indigo", "maroon", "olive", "amber", "violet", "cyan")


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(lo, hi))).capitalize()


FICTIONAL_RELATIONS: dict[str, tuple[Callable[[random.Random], str], tuple[str, ...]]] = {
    "birthplace": (lambda r: _word(r) + r.choice(("ton", "burg", "ville", "ford")), (
        "Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?",
        "{s} was born in which town?", "Name the town where {s} was born.")),
    "employer": (lambda r: _word(r) + " " + r.choice(("Works", "Labs", "Mills", "Foods")), (
        "Which company does {s} work for?", "Who employs {s}?", "What is the employer of {s}?",
        "{s} works at which company?", "Name the company that {s} works for.")),
    "pet": (lambda r: _word(r, 2, 2), (
        "What is the name of {s}'s pet?", "What is {s}'s pet called?", "Name the pet of {s}.",
        "{s} owns a pet with what name?", "What name does {s}'s pet have?")),
    "instrument": (lambda r: r.choice(_INSTRUMENTS), (
        "Which instrument does {s} play?", "What instrument does {s} play?", "{s} plays which instrument?",
        "Name the instrument that {s} plays.", "What musical instrument is {s} known for playing?")),
    "color": (lambda r: r.choice(_COLORS), (
        "What is the favorite color of {s}?", "Which color does {s} like best?",
        "{s}'s favorite color is what?", "Name the favorite color of {s}.",
        "What color does {s} prefer above all?")),
}


def fictional_facts(n: int = 200, seed: int = 0) -> FactSet:
    """`n` seeded facts about invented people (5 relations per person, names unique).

    Same split rule as `world_facts`: 3 train phrasings per fact; eval asks each fact once with one
    of 2 held-out phrasings.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: the number of fictional facts must be an int >= 1")
    rng = random.Random(seed)
    names: set[str] = set()
    facts = []
    while len(facts) < n:
        name = f"{_word(rng)} {_word(rng)}"
        if name in names:
            continue
        names.add(name)
        for relation, (make, phrasings) in FICTIONAL_RELATIONS.items():
            if len(facts) < n:
                facts.append((name, relation, [make(rng)], phrasings))
    train, held = _split(facts, seed, _N_EVAL)
    return FactSet("fictional_facts", train, held)


def load_builtin(name: str, **kwargs) -> FactSet:
    """A built-in dataset by name (`BUILTIN_NAMES`); `kwargs` go to its generator."""
    makers = {"world_facts": world_facts, "fictional_facts": fictional_facts}
    if name not in makers:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {list(makers)} "
                         "or pass a .jsonl file")
    return makers[name](**kwargs)
