"""A generated knowledge base of fictional people, organisations, cities and countries, its
documents, and the multi-hop questions it answers (issue 15, item 4).

Every name is built from syllables (`Zorava Kelt`, `Mirvane`, `Dolvex Institute`), so no
pretrained model can answer from memory: it has to search. Every name word is unique in the
KB and is never a substring of another name word, so a question that does not spell an entity
does not mention it (the 2-hop "bridge not in the question" guarantee is a substring test).

Facts (subject -relation-> object):
  person        born_in -> city, works_for -> organisation, born_year -> int
  organisation  located_in -> city, founded_by -> person, founded_year -> int
  city          in_country -> country, population -> int

Documents: one per fact, id `relation:subject-slug`, with a title. The title of a relation
fact's document is its OBJECT ("Dolvex Institute" for "Zorava Kelt works for Dolvex
Institute."), of an attribute fact's document its subject. Why: R-Search query DAGs fill `{A}`
with the title of the parent query's top passage (toolbox/search_dag.py), so a query for a
relation ("Zorava Kelt works for") must return a passage titled by the entity it leads to (the
bridge), which the child query then names ("{A} based in city").

Questions have three hop types: `one_hop` (one fact), `two_hop` (a chain of two facts whose
middle entity, the bridge, is not in the question) and `comparison` (one attribute of two
entities: earlier born, larger city, older organisation); each has an exact short answer, its
template name and the ids of its gold supporting documents. Entities are split train /
held-out (by `held_out` percent, per kind), and a question belongs to the split of its subject
entities (both, for a comparison), so held-out questions ask about entities no training
question asks about.

Deterministic in its arguments on any platform (`random.Random` seeded with a string).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Sequence

HOP_TYPES = ("one_hop", "two_hop", "comparison")
SPLITS = ("train", "held_out")

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th",
           "v", "z", "sh", "tr", "h", "j", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "th", "x", "m", "v")
_ORG_KINDS = ("Institute", "Group", "Works", "Foundation", "Company", "Guild", "Society",
              "Labs")
_COUNTRY_ENDS = ("ria", "land", "mar", "dova")


@dataclasses.dataclass(frozen=True)
class KBConfig:
  """Sizes and seed of a knowledge base; the defaults give 422 documents (3 per person and
  organisation, 2 per city), which MiniLM embeds in well under a minute on 2 CPU cores."""

  people: int = 100
  organisations: int = 30
  cities: int = 16
  countries: int = 5
  seed: int = 0
  held_out: int = 20   # percent of each entity kind held out

  def __post_init__(self) -> None:
    for field in ("people", "organisations", "cities", "countries"):
      if getattr(self, field) < 2:
        raise ValueError(f"KBConfig: field '{field}' must be >= 2, got {getattr(self, field)}")
    if self.cities > 400 or self.people > 5000:
      raise ValueError(f"KBConfig: at most 400 cities and 5000 people, got {self}")
    if not 0 < self.held_out < 100:
      raise ValueError(f"KBConfig: field 'held_out' must be a percentage in (0, 100), got "
                       f"{self.held_out}")


@dataclasses.dataclass(frozen=True)
class Document:
  """One fact as a retrievable passage (`id` unique, `title` an entity name)."""

  id: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class Question:
  """One question with its exact answer; `hops` are the (subject, relation, object) facts it
  needs, in order, and `gold_docs` their documents."""

  text: str
  answer: str
  hop_type: str                   # one of HOP_TYPES
  template: str                   # e.g. "works_for>located_in"
  subjects: tuple[str, ...]       # the entities the question names
  hops: tuple[tuple[str, str, str], ...]
  gold_docs: tuple[str, ...]
  bridge: str | None = None       # two_hop: the middle entity (never in `text`)


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
  """Entities by kind, facts as {relation: {subject: object}} (objects are names, or ints for
  born_year, founded_year and population), and each entity's split."""

  config: KBConfig
  people: tuple[str, ...]
  organisations: tuple[str, ...]
  cities: tuple[str, ...]
  countries: tuple[str, ...]
  facts: dict[str, dict[str, str | int]]
  held_out: frozenset[str]

  def split_of(self, entity: str) -> str:
    """"held_out" or "train"."""
    return "held_out" if entity in self.held_out else "train"

  def value(self, relation: str, subject: str) -> str | int:
    """The object of (subject, relation) (KeyError when the KB has no such fact)."""
    return self.facts[relation][subject]


# Relation -> (document text template, whether the title is the object).
_DOC_TEMPLATES: dict[str, tuple[str, bool]] = {
    "born_in": ("{s} was born in the city of {o}.", True),
    "works_for": ("{s} works for {o}.", True),
    "born_year": ("{s} was born in the year {o}.", False),
    "located_in": ("{s} is based in the city of {o}.", True),
    "founded_by": ("{s} was founded by {o}.", True),
    "founded_year": ("{s} was founded in the year {o}.", False),
    "in_country": ("{s} is a city in the country of {o}.", True),
    "population": ("{s} has a population of {o} people.", False),
}
RELATIONS = tuple(_DOC_TEMPLATES)


def slug(name: str) -> str:
  """"Zorava Kelt" -> "zorava-kelt"."""
  return "-".join(name.lower().split())


def doc_id(relation: str, subject: str) -> str:
  """The id of the document of the fact (subject, relation)."""
  return f"{relation}:{slug(subject)}"


class _Names:
  """Unique name words: none equal to, or a substring of, another (see the module docstring)."""

  def __init__(self, rng: random.Random) -> None:
    self.rng = rng
    self.used: list[str] = []

  def word(self, syllables: tuple[int, int], end: str = "") -> str:
    for _ in range(10_000):
      count = self.rng.randint(*syllables)
      parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(count)]
      word = ("".join(parts) + (end or self.rng.choice(_CODAS))).capitalize()
      low = word.lower()
      if len(word) >= 4 and not any(low in u or u in low for u in self.used):
        self.used.append(low)
        return word
    raise ValueError("KBConfig: ran out of unique names; use fewer entities")


@functools.lru_cache(maxsize=16)
def build(config: KBConfig = KBConfig()) -> KnowledgeBase:
  """The knowledge base of `config` (cached: the same config is the same object)."""
  rng = random.Random(f"multihop-kb-{config.seed}")
  names = _Names(rng)
  countries = tuple(names.word((1, 2), rng.choice(_COUNTRY_ENDS)) for _ in range(config.countries))
  cities = tuple(names.word((2, 3)) for _ in range(config.cities))
  people = tuple(f"{names.word((1, 2))} {names.word((1, 2))}" for _ in range(config.people))
  organisations = tuple(f"{names.word((2, 2))} {rng.choice(_ORG_KINDS)}"
                        for _ in range(config.organisations))
  facts: dict[str, dict[str, str | int]] = {r: {} for r in RELATIONS}
  # Every country has a city and every city an organisation while there are enough of them,
  # so no entity is an island the questions never reach.
  for i, city in enumerate(cities):
    facts["in_country"][city] = countries[i % len(countries)] if i < len(countries) else (
        rng.choice(countries))
  for population, city in zip(sorted(rng.sample(range(20_000, 2_000_000, 1000), len(cities))),
                              rng.sample(cities, len(cities))):
    facts["population"][city] = population
  for person in people:
    # Ties are possible; comparison questions skip them.
    facts["born_year"][person] = rng.randint(1890, 1975)
    facts["born_in"][person] = rng.choice(cities)
  for i, org in enumerate(organisations):
    facts["located_in"][org] = cities[i] if i < len(cities) else rng.choice(cities)
    founder = rng.choice(people)
    facts["founded_by"][org] = founder
    facts["founded_year"][org] = int(facts["born_year"][founder]) + rng.randint(25, 45)
  for i, person in enumerate(people):
    facts["works_for"][person] = (organisations[i] if i < len(organisations)
                                  else rng.choice(organisations))
  held_out: set[str] = set()
  for kind in (people, organisations, cities):
    k = max(1, round(len(kind) * config.held_out / 100))
    held_out.update(random.Random(f"multihop-split-{config.seed}-{kind[0]}").sample(kind, k))
  return KnowledgeBase(config, people, organisations, cities, countries, facts,
                       frozenset(held_out))


def documents(kb: KnowledgeBase) -> list[Document]:
  """One document per fact, in relation then subject order."""
  out = []
  for relation, (template, titled_by_object) in _DOC_TEMPLATES.items():
    for subject, obj in kb.facts[relation].items():
      title = str(obj) if titled_by_object else subject
      out.append(Document(doc_id(relation, subject), title, template.format(s=subject, o=obj)))
  return out


# Question templates: name -> (text with {s}, chain of relations).
ONE_HOP = {
    "born_in": ("Where was {s} born?", ("born_in",)),
    "works_for": ("Which organisation does {s} work for?", ("works_for",)),
    "born_year": ("In which year was {s} born?", ("born_year",)),
    "located_in": ("In which city is {s} based?", ("located_in",)),
    "founded_by": ("Who founded {s}?", ("founded_by",)),
    "founded_year": ("In which year was {s} founded?", ("founded_year",)),
    "in_country": ("In which country is the city of {s}?", ("in_country",)),
    "population": ("What is the population of {s}?", ("population",)),
}
TWO_HOP = {
    "works_for>located_in": ("In which city is the organisation that {s} works for based?",
                             ("works_for", "located_in")),
    "works_for>founded_by": ("Who founded the organisation that {s} works for?",
                             ("works_for", "founded_by")),
    "works_for>founded_year": ("In which year was the organisation that {s} works for founded?",
                               ("works_for", "founded_year")),
    "born_in>in_country": ("In which country was {s} born?", ("born_in", "in_country")),
    "born_in>population": ("What is the population of the city where {s} was born?",
                           ("born_in", "population")),
    "founded_by>born_in": ("Where was the founder of {s} born?", ("founded_by", "born_in")),
    "located_in>in_country": ("In which country is {s} based?", ("located_in", "in_country")),
}
# name -> (text with {a} and {b}, attribute, whether the smaller value wins)
COMPARISON = {
    "born_year": ("Who was born earlier, {a} or {b}?", "born_year", True),
    "population": ("Which city is larger, {a} or {b}?", "population", False),
    "founded_year": ("Which organisation is older, {a} or {b}?", "founded_year", True),
}


def _chain(kb: KnowledgeBase, subject: str, relations: Sequence[str]
           ) -> tuple[tuple[str, str, str], ...]:
  hops, entity = [], subject
  for relation in relations:
    obj = str(kb.value(relation, entity))
    hops.append((entity, relation, obj))
    entity = obj
  return tuple(hops)


def _chained(kb: KnowledgeBase, name: str, text: str, relations: Sequence[str], hop_type: str
             ) -> list[Question]:
  out = []
  for subject in kb.facts[relations[0]]:
    hops = _chain(kb, subject, relations)
    answer = hops[-1][2]
    if answer == subject:   # "who founded the organisation X works for?" -> X: no hop needed
      continue
    out.append(Question(text.format(s=subject), answer, hop_type, name, (subject,), hops,
                        tuple(doc_id(r, s) for s, r, _ in hops),
                        hops[0][2] if len(hops) == 2 else None))
  return out


def _comparisons(kb: KnowledgeBase, name: str) -> list[Question]:
  """Each entity with an attribute against the next two in a seeded order, within its split
  (so the count grows linearly, not quadratically)."""
  text, relation, smaller_wins = COMPARISON[name]
  out = []
  for split in SPLITS:
    entities = [e for e in kb.facts[relation] if kb.split_of(e) == split]
    random.Random(f"multihop-cmp-{kb.config.seed}-{name}-{split}").shuffle(entities)
    for i, a in enumerate(entities):
      for b in entities[i + 1:i + 3]:
        va, vb = int(kb.value(relation, a)), int(kb.value(relation, b))
        if va == vb:
          continue
        answer = a if (va < vb) == smaller_wins else b
        out.append(Question(text.format(a=a, b=b), answer, "comparison", name, (a, b),
                            ((a, relation, str(va)), (b, relation, str(vb))),
                            (doc_id(relation, a), doc_id(relation, b))))
  return out


@functools.lru_cache(maxsize=16)
def questions(config: KBConfig = KBConfig()) -> dict[str, dict[str, tuple[Question, ...]]]:
  """{split: {hop type: questions}}, every question of the KB once, in a fixed order."""
  kb = build(config)
  pools: dict[str, list[Question]] = {
      "one_hop": [q for name, (text, rels) in ONE_HOP.items()
                  for q in _chained(kb, name, text, rels, "one_hop")],
      "two_hop": [q for name, (text, rels) in TWO_HOP.items()
                  for q in _chained(kb, name, text, rels, "two_hop")],
      "comparison": [q for name in COMPARISON for q in _comparisons(kb, name)],
  }
  out: dict[str, dict[str, tuple[Question, ...]]] = {}
  for split in SPLITS:
    out[split] = {hop: tuple(q for q in pool if all(kb.split_of(s) == split for s in q.subjects))
                  for hop, pool in pools.items()}
  return out
