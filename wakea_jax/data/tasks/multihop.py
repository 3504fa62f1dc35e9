"""The bundled multi-hop search task (issue 15, item 4): RL prompts, evaluation labels and
teacher trajectories over the fictional knowledge base of `multihop_kb`.

  PROMPT_TASKS["multihop"]  `task:multihop?n=256&seed=7&split=1&hop=2&protocol=1`
  TASK_LABELS["multihop"]   {"category": hop type, "difficulty": template} per prompt
  TASKS["multihop"]         SFT teacher dialogues with the gold documents as the retrieved
                            passages (no index needed); toolbox/multihop.py runs the teacher
                            against the real index instead, and writes both protocols

Task options (integers, as every task spec's): `split` 0 train / 1 held-out; `hop` 0 all (the
three hop types in turn), 1 one_hop, 2 two_hop, 3 comparison; `protocol` 0 answer directly,
1 Search-R1, 2 R-Search (which system prompt the question gets); the KB's `people`, `orgs`,
`cities`, `countries`, `kb_seed` and `held_out` (percent). The KB, hence the corpus and its
index, depends only on those KB options, so the train and held-out prompts, and every `seed`,
share one index; `seed` only draws the questions.

Drawing: with `hop` 0 the i-th record is of hop type i % 3, so the three are balanced; within
a hop type the split's questions are walked in a seeded order, reshuffled when they run out,
so `n` up to the pool size gives distinct questions (the held-out 2-hop pool of the default KB
has 112).

Trajectory representation (why the retrieved text is never trained on). A teacher dialogue is
the system prompt, the question, and ONE assistant turn written as the rollout produces it
(sampling/protocols.py): the model's text up to `</search>`, the injected results, the
model's text again, ..., `<answer>`:

  assistant  I need the organisation Zorava Kelt works for.
             <search>Zorava Kelt works for</search>
             <information>Doc 1 (Title: Dolvex Institute) Zorava Kelt works for Dolvex ...
             ...</information>                                  <- injected
             Zorava Kelt works for Dolvex Institute. I need the city where ...
             <search>Dolvex Institute based in the city of</search>
             <information>...</information>                      <- injected
             ... <answer>Mirvane</answer>

The injected spans are named by the message's `injected` field (character ranges of its
content; data/chat.py): `chat.render` encodes them as untrusted text with loss_mask 0, so no
retrieved token is trained on, and the ids match a rollout's (model text, injected ids, model
text, all in one turn) rather than a multi-turn layout the rollout never produces. The
injected text is exactly what the protocols inject: `information_block` is SearchR1.render's
format (a test checks it against sampling/protocols.py), and R-Search's is "\n" + the
`search_render.search_response` blocks + "\n" (toolbox/multihop.py).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

from wakea_jax.data.tasks import multihop_kb as kb_lib
from wakea_jax.data.tasks.multihop_kb import KBConfig, Question

PROTOCOLS = ("direct", "search_r1", "rsearch")
HOPS = ("all", *kb_lib.HOP_TYPES)
DEFAULT_SOURCE = "Local"

# Short on purpose: every token of a system prompt is paid on every rollout of a small model.
SYSTEMS = {
    "direct": "Give the short final answer inside <answer>...</answer>.",
    "search_r1": "Search with <search>query</search>; the results follow inside "
                 "<information>...</information>. Search one fact at a time, then give the "
                 "short final answer inside <answer>...</answer>.",
    "rsearch": "Plan the searches as a query graph:\n<search>\nNodes:\nA: query (Local)\n"
               "B: query using {A} (Local)\nEdges:\nA -> B\n</search>\n{A} becomes the title "
               "of A's top result; the results follow in <r>...</r> blocks. Then give the short "
               "final answer inside <answer>...</answer>.",
}

# relation -> (search query, what the teacher says it looks for); {s} is the subject. The
# queries use the documents' wording (multihop_kb._DOC_TEMPLATES), as a good searcher would.
QUERIES: dict[str, tuple[str, str]] = {
    "born_in": ("{s} born in the city of", "I need the city where {s} was born."),
    "works_for": ("{s} works for", "I need the organisation {s} works for."),
    "born_year": ("{s} born in the year", "I need the year {s} was born."),
    "located_in": ("{s} based in the city of", "I need the city where {s} is based."),
    "founded_by": ("{s} was founded by", "I need who founded {s}."),
    "founded_year": ("{s} founded in the year", "I need the year {s} was founded."),
    "in_country": ("{s} is a city in the country of", "I need the country of {s}."),
    "population": ("population of {s}", "I need the population of {s}."),
}


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """One retrieved passage as a teacher sees it."""

  doc_id: str
  title: str
  text: str


# (query, k) -> passages, best first: the real index (toolbox/multihop.py) or `gold_searcher`.
Searcher = Callable[[str, int], Sequence[Retrieved]]


def kb_config(people: int = 100, orgs: int = 30, cities: int = 16, countries: int = 5,
              kb_seed: int = 0, held_out: int = 20) -> KBConfig:
  """The KBConfig of the task options (the defaults are KBConfig's)."""
  return KBConfig(people, orgs, cities, countries, kb_seed, held_out)


def kb_spec_options(kb: Any) -> str:
  """The KB options `kb` (a mapping of `kb_config`'s arguments) as a task spec's tail:
  {"people": 600, "orgs": 120} -> "&orgs=120&people=600"."""
  return "".join(f"&{k}={int(v)}" for k, v in sorted(dict(kb).items()))


def select(n: int, seed: int = 0, *, split: int = 0, hop: int = 0,
           config: KBConfig = KBConfig()) -> list[Question]:
  """`n` questions of `split` (0 train, 1 held-out) and `hop` (see the module docstring)."""
  if split not in (0, 1):
    raise ValueError(f"multihop: option 'split' must be 0 (train) or 1 (held-out), got {split}")
  if not 0 <= hop < len(HOPS):
    raise ValueError(f"multihop: option 'hop' must be 0 (all), 1 (one_hop), 2 (two_hop) or 3 "
                     f"(comparison), got {hop}")
  pools = kb_lib.questions(config)[kb_lib.SPLITS[split]]
  kinds = kb_lib.HOP_TYPES if hop == 0 else (HOPS[hop],)
  for kind in kinds:
    if not pools[kind]:
      raise ValueError(f"multihop: no {kind} questions in split {kb_lib.SPLITS[split]} of "
                       f"{config}; use a larger KB")
  streams = {kind: _Stream(pools[kind], f"multihop-{seed}-{split}-{kind}") for kind in kinds}
  return [streams[kinds[i % len(kinds)]].next() for i in range(n)]


class _Stream:
  """A pool in a seeded order, reshuffled each time it runs out."""

  def __init__(self, pool: Sequence[Question], name: str) -> None:
    self.pool, self.rng, self.order = list(pool), random.Random(name), []

  def next(self) -> Question:
    if not self.order:
      self.order = list(range(len(self.pool)))
      self.rng.shuffle(self.order)
      self.order.reverse()
    return self.pool[self.order.pop()]


def _protocol(protocol: int) -> str:
  if not 0 <= protocol < len(PROTOCOLS):
    raise ValueError(f"multihop: option 'protocol' must be 0 (direct), 1 (Search-R1) or 2 "
                     f"(R-Search), got {protocol}")
  return PROTOCOLS[protocol]


def prompt_messages(question: Question, protocol: str) -> list[dict[str, Any]]:
  """The system prompt of `protocol` and the question."""
  return [{"role": "system", "content": SYSTEMS[protocol]},
          {"role": "user", "content": question.text}]


def prompts(num_examples: int, seed: int = 0, *, split: int = 0, hop: int = 0,
            protocol: int = 1, people: int = 100, orgs: int = 30, cities: int = 16,
            countries: int = 5, kb_seed: int = 0, held_out: int = 20) -> list[dict[str, Any]]:
  """RL prompt records: {"messages", "answer", "hop_type", "template", "gold_docs"} (the
  extra fields reach the rewards as `meta`)."""
  config = kb_config(people, orgs, cities, countries, kb_seed, held_out)
  name = _protocol(protocol)
  return [{"messages": prompt_messages(q, name), "answer": q.answer, "hop_type": q.hop_type,
           "template": q.template, "gold_docs": list(q.gold_docs)}
          for q in select(num_examples, seed, split=split, hop=hop, config=config)]


def labels(num_examples: int, seed: int = 0, *, split: int = 0, hop: int = 0,
           protocol: int = 1, people: int = 100, orgs: int = 30, cities: int = 16,
           countries: int = 5, kb_seed: int = 0, held_out: int = 20) -> list[dict[str, str]]:
  """{"category": hop type, "difficulty": template} of each record of `prompts` and `generate`
  for the same arguments, in order."""
  _protocol(protocol)
  config = kb_config(people, orgs, cities, countries, kb_seed, held_out)
  return [{"category": q.hop_type, "difficulty": q.template}
          for q in select(num_examples, seed, split=split, hop=hop, config=config)]


# ------------------------------------------------------------------------------------------
# Teacher trajectories
# ------------------------------------------------------------------------------------------

def information_block(passages: Sequence[Retrieved], passage_chars: int = 400) -> str:
  """What a Search-R1 rollout injects after `</search>` (sampling/protocols.py SearchR1.render,
  default tags): "Doc i (Title: t) text" lines inside blank-line-separated information tags."""
  if not passages:
    return "\n\n<information>No results.</information>\n\n"
  lines = [f"Doc {i} (Title: {p.title}) {' '.join(p.text.split())[:passage_chars]}"
           for i, p in enumerate(passages, 1)]
  return "\n\n<information>" + "\n".join(lines) + "</information>\n\n"


def assistant_turn(segments: Sequence[tuple[str, bool]]) -> dict[str, Any]:
  """One assistant message from (text, injected) segments: the content is their
  concatenation and `injected` the character ranges of the injected ones (data/chat.py)."""
  content, injected = "", []
  for text, is_injected in segments:
    if is_injected and text:
      injected.append([len(content), len(content) + len(text)])
    content += text
  message: dict[str, Any] = {"role": "assistant", "content": content}
  if injected:
    message["injected"] = injected
  return message


def fact_text(question: Question, hop: int, config: KBConfig = KBConfig()) -> str:
  """The text of the gold document of `question.hops[hop]` (what the teacher read)."""
  subject, relation, _ = question.hops[hop]
  return gold_passage(kb_lib.doc_id(relation, subject), config).text


def gold_passage(doc_id: str, config: KBConfig = KBConfig()) -> Retrieved:
  """The document `doc_id` of the KB of `config` as a passage (KeyError when absent)."""
  docs = _documents(config)
  doc = docs[doc_id]
  return Retrieved(doc.id, doc.title, doc.text)


_DOCS: dict[KBConfig, dict[str, kb_lib.Document]] = {}


def _documents(config: KBConfig) -> dict[str, kb_lib.Document]:
  if config not in _DOCS:
    _DOCS[config] = {d.id: d for d in kb_lib.documents(kb_lib.build(config))}
  return _DOCS[config]


@dataclasses.dataclass
class TeacherStats:
  """How the teacher's searches went: searches run, hops whose gold document the search did
  not return (then retried with the question's words), and retries that failed too (then the
  gold document was put first: the only place the teacher does not show real results)."""

  searches: int = 0
  misses: int = 0
  gold_fallbacks: int = 0


def search_hop(question: Question, hop: int, search: Searcher, k: int, stats: TeacherStats,
               config: KBConfig = KBConfig()) -> tuple[str, list[Retrieved]]:
  """(query, passages) for hop `hop`: the relation's query; if the gold document is not among
  the `k` results, the question's own words plus the subject (counted in `stats.misses`); if
  still not, the second query's results with the gold document put first."""
  subject, relation, _ = question.hops[hop]
  gold = kb_lib.doc_id(relation, subject)
  query = QUERIES[relation][0].format(s=subject)
  passages = list(search(query, k))
  stats.searches += 1
  if any(p.doc_id == gold for p in passages):
    return query, passages
  stats.misses += 1
  query = f"{subject} {question.text}" if subject not in question.text else question.text
  passages = list(search(query, k))
  stats.searches += 1
  if not any(p.doc_id == gold for p in passages):
    stats.gold_fallbacks += 1
    passages = [gold_passage(gold, config), *passages[:k - 1]]
  return query, passages


def answer_text(question: Question, config: KBConfig = KBConfig()) -> str:
  """The teacher's text after its last search: the facts read, then the answer."""
  facts = " ".join(fact_text(question, i, config) for i in range(len(question.hops)))
  if question.hop_type == "comparison":
    facts += f" So the answer is {question.answer}."
  return f"{facts}\n<answer>{question.answer}</answer>"


def search_r1_dialogue(question: Question, search: Searcher, *, k: int = 3,
                       stats: TeacherStats | None = None, config: KBConfig = KBConfig()
                       ) -> dict[str, Any]:
  """A Search-R1 teacher dialogue: one search per fact (a 2-hop's second query names the
  bridge it read), each followed by its injected `<information>` block, then the answer."""
  stats = stats if stats is not None else TeacherStats()
  segments: list[tuple[str, bool]] = []
  read = ""
  for hop, (subject, relation, _) in enumerate(question.hops):
    query, passages = search_hop(question, hop, search, k, stats, config)
    thought = QUERIES[relation][1].format(s=subject)
    segments += [(f"{read}{thought}\n<search>{query}</search>", False),
                 (information_block(passages), True)]
    read = fact_text(question, hop, config) + " "
  segments.append((answer_text(question, config), False))
  return {"messages": [*prompt_messages(question, "search_r1"), assistant_turn(segments)]}


def dag_block(question: Question, source: str = DEFAULT_SOURCE) -> str:
  """The R-Search teacher's `<search>` block: one node per fact; a 2-hop's second node uses
  `{A}` (the title of A's top passage, the bridge) with the edge A -> B."""
  lines = ["<search>", "Nodes:"]
  for hop, (subject, relation, _) in enumerate(question.hops):
    name = "AB"[hop]
    if question.hop_type == "two_hop" and hop == 1:
      subject = "{A}"
    lines.append(f"{name}: {QUERIES[relation][0].format(s=subject)} ({source})")
  if question.hop_type == "two_hop":
    lines += ["Edges:", "A -> B"]
  return "\n".join(lines + ["</search>"])


def direct_dialogue(question: Question) -> dict[str, Any]:
  """A no-search dialogue (the answer at once): teaches the answer format only."""
  return {"messages": [*prompt_messages(question, "direct"),
                       {"role": "assistant", "content": f"<answer>{question.answer}</answer>"}]}


def gold_searcher(config: KBConfig = KBConfig()) -> Searcher:
  """A searcher that returns the gold document of the query's fact (found by its query text)
  and nothing else: the fallback teacher's "retrieval" when no index is at hand."""
  by_query = {QUERIES[r][0].format(s=s): kb_lib.doc_id(r, s)
              for r, facts in kb_lib.build(config).facts.items() for s in facts}

  def search(query: str, k: int) -> list[Retrieved]:
    del k
    return [gold_passage(by_query[query], config)] if query in by_query else []

  return search


def generate(num_examples: int, seed: int = 0, *, split: int = 0, hop: int = 0,
             protocol: int = 1, people: int = 100, orgs: int = 30, cities: int = 16,
             countries: int = 5, kb_seed: int = 0, held_out: int = 20) -> list[dict[str, Any]]:
  """SFT dialogues without an index: Search-R1 teacher dialogues whose `<information>` is the
  gold document alone (`protocol` 1), or direct answers (0). R-Search (2) renders `<r>` blocks
  by executing the DAG, which needs toolbox/multihop.py's `teacher_records`."""
  name = _protocol(protocol)
  if name == "rsearch":
    raise ValueError("task multihop: protocol=2 (R-Search) needs a search index; write the "
                     "dialogues with wakea_jax.toolbox.multihop.write_teacher_sft")
  config = kb_config(people, orgs, cities, countries, kb_seed, held_out)
  questions = select(num_examples, seed, split=split, hop=hop, config=config)
  if name == "direct":
    return [direct_dialogue(q) for q in questions]
  search = gold_searcher(config)
  return [search_r1_dialogue(q, search, k=1, config=config) for q in questions]
