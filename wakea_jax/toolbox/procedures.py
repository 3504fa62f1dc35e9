"""Procedural memory: standard operating procedures (SOPs) the model is shown or can look up.

A procedure is a JSON object; a file holds a list of them (or one), a directory every `*.json`
file below it, read in sorted path order:

  {"name": "multi-hop-search", "description": "Answer a question that needs two facts.",
   "trigger_words": ["who", "where", "born in"], "category": "search", "priority": 5,
   "steps": [{"action": "Search for the entity named in the question."},
             {"action": "Search for the bridge entity.", "condition": "the passage names one"}]}

Records are validated when loaded, and every error names the file, the record index and the
field (`sops.json: record 2: field 'steps[0].action' must be a non-empty string`), because
these files are written by hand and a silently skipped procedure is never noticed.

`ProcedureMemory.match(text, k)` ranks procedures for a task (see `MatchWeights` for the
formula); the matches are offered to the model either as a system-prompt section
(`render_section`) or through the `procedures` tool (`procedure_tool`), which the model calls
with a query or a procedure name.

  memory = ProcedureMemory.from_path(EXAMPLES_DIR, embedder=load_embedder())
  system = base_system + "\n\n" + render_section(memory.match(question, k=2))
  router = Router([procedure_tool(memory)])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from wakea_jax.retrieval.embed import Embedder
from wakea_jax.toolbox.router import Tool, ToolError

__all__ = ["EXAMPLES_DIR", "Match", "MatchWeights", "Procedure", "ProcedureMemory", "Step",
           "load_procedures", "parse_procedures", "procedure_tool", "render_section"]

# The small example set shipped with the package (multi-hop search, calculator, answer format).
EXAMPLES_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "assets" / "procedures"

RECORD_KEYS = ("name", "description", "trigger_words", "category", "priority", "steps")
STEP_KEYS = ("action", "condition")


@dataclasses.dataclass(frozen=True)
class Step:
  """One step: do `action`, only when `condition` holds if one is given."""

  action: str
  condition: str | None = None

  def render(self) -> str:
    """`action`, or "If condition: action"."""
    return self.action if self.condition is None else f"If {self.condition}: {self.action}"


@dataclasses.dataclass(frozen=True)
class Procedure:
  """A validated SOP. `source` ("file.json: record 3") is where it was read, for messages."""

  name: str
  description: str
  trigger_words: tuple[str, ...]
  category: str
  priority: int
  steps: tuple[Step, ...]
  source: str = dataclasses.field(default="", compare=False)

  def embedding_text(self) -> str:
    """What is embedded for similarity: the words a task description would share with it."""
    return f"{self.name}: {self.description} ({', '.join(self.trigger_words)})"

  def render(self, max_steps: int | None = None) -> str:
    """A compact block: "name (category): description" and numbered steps."""
    steps = self.steps if max_steps is None else self.steps[:max_steps]
    lines = [f"{self.name} ({self.category}): {self.description}"]
    lines += [f"  {i}. {step.render()}" for i, step in enumerate(steps, 1)]
    return "\n".join(lines)


# --- loading and validation -------------------------------------------------------------------


def _name_key(name: str) -> str:
  """Names compare case- and spacing-insensitively (the tool looks them up that way)."""
  return " ".join(name.split()).lower()


def _unknown_key_error(where: str, prefix: str, key: Any, known: Sequence[str],
                       what: str) -> ValueError:
  close = difflib.get_close_matches(str(key), known, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ""
  return ValueError(f"{where}: field '{prefix}{key}' is not a {what} field{hint}; "
                    f"{what} fields are {list(known)}")


def _string(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str) or not value.strip():
    got = repr(value) if isinstance(value, str) else type(value).__name__
    raise ValueError(f"{where}: field '{field}' must be a non-empty string, got {got}")
  return value.strip()


def _step(raw: Any, where: str, field: str) -> Step:
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: field '{field}' must be an object with 'action', "
                     f"got {type(raw).__name__}")
  for key in raw:
    if key not in STEP_KEYS:
      raise _unknown_key_error(where, f"{field}.", key, STEP_KEYS, "step")
  if "action" not in raw:
    raise ValueError(f"{where}: field '{field}.action' is missing")
  action = _string(raw["action"], where, f"{field}.action")
  condition = None
  if raw.get("condition") is not None:
    condition = _string(raw["condition"], where, f"{field}.condition")
  return Step(action, condition)


def _procedure(raw: Any, where: str) -> Procedure:
  """One record checked field by field; `where` is "file: record i"."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
  for key in raw:
    if key not in RECORD_KEYS:
      raise _unknown_key_error(where, "", key, RECORD_KEYS, "procedure")
  for key in RECORD_KEYS:
    if key not in raw:
      raise ValueError(f"{where}: field '{key}' is missing")
  name = _string(raw["name"], where, "name")
  description = _string(raw["description"], where, "description")
  category = _string(raw["category"], where, "category")
  priority = raw["priority"]
  # bool is an int in Python; `true` as a priority is a typo, not 1.
  if not isinstance(priority, int) or isinstance(priority, bool):
    raise ValueError(f"{where}: field 'priority' must be an integer, got "
                     f"{type(priority).__name__} {priority!r}")
  triggers = raw["trigger_words"]
  if not isinstance(triggers, list):
    raise ValueError(f"{where}: field 'trigger_words' must be a list of strings, got "
                     f"{type(triggers).__name__}")
  seen: dict[str, int] = {}
  for i, word in enumerate(triggers):
    word = _string(word, where, f"trigger_words[{i}]")
    key = " ".join(word.lower().split())
    if key in seen:
      raise ValueError(f"{where}: field 'trigger_words[{i}]' repeats trigger_words[{seen[key]}] "
                       f"{word!r}")
    seen[key] = i
  steps = raw["steps"]
  if not isinstance(steps, list):
    raise ValueError(f"{where}: field 'steps' must be a list of steps, got {type(steps).__name__}")
  if not steps:
    raise ValueError(f"{where}: field 'steps' is empty; a procedure needs at least one step")
  return Procedure(
      name=name, description=description,
      trigger_words=tuple(" ".join(w.split()) for w in triggers), category=category,
      priority=priority, steps=tuple(_step(s, where, f"steps[{i}]") for i, s in enumerate(steps)),
      source=where)


def parse_procedures(records: Any, source: str = "<procedures>") -> list[Procedure]:
  """Procedures from decoded JSON (a list of records, or one record); `source` names the file."""
  if isinstance(records, Mapping):
    records = [records]
  if not isinstance(records, list):
    raise ValueError(f"{source}: expected a list of procedures (or one procedure object), got "
                     f"{type(records).__name__}")
  procedures = [_procedure(raw, f"{source}: record {i}") for i, raw in enumerate(records)]
  _check_unique(procedures)
  return procedures


def _check_unique(procedures: Iterable[Procedure]) -> None:
  """Names are looked up case-insensitively by the tool, so they must differ in more than case."""
  first: dict[str, Procedure] = {}
  for procedure in procedures:
    key = _name_key(procedure.name)
    if key in first:
      where = procedure.source or f"procedure {procedure.name!r}"
      earlier = first[key]
      origin = (f"the procedure from {earlier.source}" if earlier.source
                else f"procedure {earlier.name!r}")
      raise ValueError(f"{where}: field 'name' {procedure.name!r} duplicates {origin}")
    first[key] = procedure


def load_procedures(path: str | os.PathLike[str]) -> list[Procedure]:
  """Procedures from a JSON file or from every `*.json` file under a directory (sorted).

  Raises FileNotFoundError for a missing path or a directory without JSON files, and ValueError
  naming the file, record index and field for anything malformed (JSON syntax errors give the
  line and column); names must be unique across all files.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*.json") if p.is_file())
    if not files:
      raise FileNotFoundError(f"{path}: no .json procedure files found")
  elif path.is_file():
    files = [path]
  else:
    raise FileNotFoundError(f"{path}: no such procedure file or directory")
  procedures = []
  for file in files:
    try:
      records = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    procedures += parse_procedures(records, str(file))
  _check_unique(procedures)
  return procedures


# --- matching -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatchWeights:
  """The matching score, a weighted sum of three terms in [0, 1]:

    score = trigger * min(hits, max_hits) / max_hits
          + similarity * max(cos(text, procedure), 0)
          + priority * (p - p_min) / (p_max - p_min)     (0 when all priorities are equal)

  `hits` counts distinct trigger words found in the text (whole words, case-insensitive),
  `cos` is the cosine of the embedder's vectors (0 without an embedder), and p_min / p_max
  range over the memory's procedures. A procedure is a candidate only when it has a trigger
  hit or cos >= `min_similarity`: priority ranks relevant procedures, it never makes an
  unrelated one relevant. The defaults make one more trigger hit (1/3) outweigh the whole
  priority range (0.2), while priority reorders procedures whose relevance is close.
  Ties (scores rounded to 1e-6, so float noise from the embedder cannot reorder them) go to
  the higher priority, then to the name in alphabetical order.
  """

  trigger: float = 1.0
  similarity: float = 1.0
  priority: float = 0.2
  max_hits: int = 3
  min_similarity: float = 0.35

  def __post_init__(self):
    if self.max_hits < 1:
      raise ValueError(f"MatchWeights.max_hits must be >= 1, got {self.max_hits}")
    for field in ("trigger", "similarity", "priority"):
      if getattr(self, field) < 0:
        raise ValueError(f"MatchWeights.{field} must be >= 0, got {getattr(self, field)}")


class Match(NamedTuple):
  """One ranked procedure; unpacks as `(procedure, score, why)`."""

  procedure: Procedure
  score: float
  why: str


def _trigger_pattern(word: str) -> re.Pattern[str]:
  # Word boundaries only where the trigger starts / ends with a word character: "sum" must not
  # fire inside "summary", but a symbol trigger ("+", "%") fires in "23+19" or "15%".
  body = r"\s+".join(re.escape(part) for part in word.split())
  start = r"(?<!\w)" if re.match(r"\w", word) else ""
  end = r"(?!\w)" if re.search(r"\w$", word) else ""
  return re.compile(start + body + end, re.IGNORECASE)


class ProcedureMemory:
  """Procedures with their trigger patterns and (given an embedder) their embeddings."""

  def __init__(self, procedures: Iterable[Procedure], embedder: Embedder | None = None,
               weights: MatchWeights = MatchWeights()):
    self.procedures: tuple[Procedure, ...] = tuple(procedures)
    _check_unique(self.procedures)
    self.embedder = embedder
    self.weights = weights
    self._by_name = {_name_key(p.name): p for p in self.procedures}
    self._patterns = [[(w, _trigger_pattern(w)) for w in p.trigger_words]
                      for p in self.procedures]
    priorities = [p.priority for p in self.procedures]
    low, high = (min(priorities), max(priorities)) if priorities else (0, 0)
    self._priority_terms = [(p - low) / (high - low) if high > low else 0.0 for p in priorities]
    self._vectors: np.ndarray | None = None
    if embedder is not None and self.procedures:
      self._vectors = np.asarray(
          embedder.embed([p.embedding_text() for p in self.procedures]), np.float32)

  @classmethod
  def from_path(cls, path: str | os.PathLike[str], embedder: Embedder | None = None,
                weights: MatchWeights = MatchWeights()) -> ProcedureMemory:
    """`load_procedures(path)` in a memory."""
    return cls(load_procedures(path), embedder, weights)

  def __len__(self) -> int:
    return len(self.procedures)

  def names(self) -> list[str]:
    """Procedure names in load order."""
    return [p.name for p in self.procedures]

  def get(self, name: str) -> Procedure | None:
    """The procedure called `name` (case-insensitive), or None."""
    return self._by_name.get(_name_key(name))

  def match(self, text: str, k: int = 3) -> list[Match]:
    """The best `k` candidate procedures for `text`, best first (see `MatchWeights`)."""
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    w = self.weights
    cosines = np.zeros(len(self.procedures), np.float64)
    if self._vectors is not None:
      query = np.asarray(self.embedder.embed([text]), np.float32)[0]
      cosines = (self._vectors @ query).astype(np.float64)
    matches = []
    for i, procedure in enumerate(self.procedures):
      hits = [word for word, pattern in self._patterns[i] if pattern.search(text)]
      cosine = float(cosines[i])
      if not hits and (self._vectors is None or cosine < w.min_similarity):
        continue
      score = (w.trigger * min(len(hits), w.max_hits) / w.max_hits
               + w.similarity * max(cosine, 0.0) + w.priority * self._priority_terms[i])
      why = [f"triggers {', '.join(hits)}" if hits else "no trigger"]
      if self._vectors is not None:
        why.append(f"similarity {cosine:.2f}")
      why.append(f"priority {procedure.priority}")
      matches.append(Match(procedure, round(score, 6), "; ".join(why)))
    matches.sort(key=lambda m: (-m.score, -m.procedure.priority, m.procedure.name))
    return matches[:k]


# --- offering procedures to the model ----------------------------------------------------------

SECTION_HEADER = "Procedures (follow the one that fits the task):"


def render_section(matches: Iterable[Match | Procedure], max_chars: int = 1200,
                   header: str = SECTION_HEADER) -> str:
  """A system-prompt section listing the matched procedures with their steps, best first.

  At most `max_chars` characters: whole procedures are added while they fit; the first one
  that does not is cut to the steps that fit (then "..."), and the rest are left out, so a long
  SOP cannot crowd the task out of a small model's context. "" when nothing matched.
  """
  procedures = [m.procedure if isinstance(m, Match) else m for m in matches]
  if not procedures:
    return ""
  if len(header) + 1 > max_chars:
    raise ValueError(f"render_section: max_chars={max_chars} leaves no room after the header")
  text = header
  for procedure in procedures:
    block = "\n" + procedure.render()
    if len(text) + len(block) <= max_chars:
      text += block
      continue
    # Cut this one at a step boundary and stop: a half procedure is still followable, a
    # fragment of a third one is not.
    for n in range(len(procedure.steps) - 1, -1, -1):
      block = "\n" + procedure.render(max_steps=n) + "\n  ..."
      if len(text) + len(block) <= max_chars:
        text += block
        break
    break
  return text


TOOL_PARAMETERS = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "the task or situation, to find procedures"},
        "name": {"type": "string", "description": "a procedure's name, to read its steps"},
        "k": {"type": "integer", "description": "number of procedures for a query (1-5)"},
    },
}


def procedure_tool(memory: ProcedureMemory, k: int = 2, max_chars: int = 1500) -> Tool:
  """The `procedures` tool: `query` returns the best-matching procedures with their steps,
  `name` one procedure's steps. An unknown name or an empty call is an error result listing
  the known names, so the model can recover in its next call."""

  def run(arguments: dict[str, Any]) -> str:
    name, query = arguments.get("name"), arguments.get("query")
    if name is not None:
      procedure = memory.get(name)
      if procedure is None:
        close = difflib.get_close_matches(name, memory.names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ToolError(f"no procedure named {name!r}{hint}; known: {', '.join(memory.names())}")
      return render_section([procedure], max_chars, header="Procedure:")
    if query is None or not query.strip():
      raise ToolError("give 'query' (the task) or 'name' (a procedure); known procedures: "
                      + ", ".join(memory.names()))
    count = max(1, min(int(arguments.get("k", k)), 5))
    section = render_section(memory.match(query, count), max_chars)
    return section or ("No procedure matches. Known procedures: " + ", ".join(memory.names()))

  return Tool(name="procedures",
              description="Look up standard operating procedures: the steps to follow for a "
                          "kind of task. Pass 'query' (the task) or 'name' (a procedure).",
              parameters=TOOL_PARAMETERS, run=run)
