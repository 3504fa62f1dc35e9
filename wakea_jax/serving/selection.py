"""Role-based model selection by multi-criteria decision analysis (MCDA) on measured figures.

A role profile (JSON) names the criteria that matter for a role, each with a weight, a
direction and optionally a hard requirement:

  {"role": "chat-frontend",
   "description": "interactive chat: fast first, then accurate",
   "candidates": ["tiny", "tiny@production", "base:3"],        (optional; default: all)
   "criteria": {
     "latency_ms":   {"weight": 0.4, "max": 200},              (p95 by default)
     "accuracy":     {"weight": 0.4, "min": 0.5},              (overall, or "category": KEY)
     "memory_mb":    {"weight": 0.1},
     "tokens_per_s": {"weight": 0.1}}}

Criteria read a version's recorded figures: latency_ms the serving `p95_latency_ms` (or the
`figure` named, e.g. "p50_latency_ms"), memory_mb `peak_memory_mb`, tokens_per_s
`tokens_per_s`, accuracy the overall evaluation accuracy or one row's ("category":
"arithmetic/multiplication/all"). Directions default to min for latency and memory and max
for accuracy and throughput. Only measured figures count: a candidate without one a
criterion needs is excluded, and so is one that fails a requirement; each exclusion is listed
with its reason.

Scoring is a weighted sum of min-max normalised criteria (simple additive weighting): per
criterion, across the admitted candidates, the best value scores 1 and the worst 0, linear in
between (all equal: 1 each); the total is the weight-normalised sum. Min-max rather than
TOPSIS because each per-criterion score then reads directly ("1.0 on latency: the fastest
candidate") and the reasoning can say which criteria decided; TOPSIS's distances to ideal
and anti-ideal points mix all criteria into one geometric figure that explains less for the
same ranking on a handful of candidates. The known cost, shared by TOPSIS: adding or
removing a candidate can move the range of a criterion and so reorder the others.

The selection record (JSON and Markdown, into REGISTRY/selections/) holds the role, the
requirements, every candidate's value and score per criterion, the total, the ranking of
alternatives, the exclusions and a reasoning paragraph.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from wakea_jax.serving.registry import ModelVersion, Registry, atomic_write_text, now
from wakea_jax.serving.results import overall_accuracy, row_key

# criterion -> (serving figure it reads by default, default direction); accuracy is special.
CRITERIA = {"latency_ms": ("p95_latency_ms", "min"), "memory_mb": ("peak_memory_mb", "min"),
            "tokens_per_s": ("tokens_per_s", "max"), "accuracy": ("", "max")}
METHOD = "weighted sum of min-max normalised criteria (simple additive weighting)"


@dataclasses.dataclass(frozen=True)
class Criterion:
  """One criterion of a role profile."""

  name: str
  weight: float
  direction: str                   # "min" or "max": which end is better
  max_value: float | None = None   # hard requirement: value <= max_value
  min_value: float | None = None   # hard requirement: value >= min_value
  figure: str = ""                 # the serving figure read (latency_ms, memory, throughput)
  category: str = ""               # accuracy of this eval row ("task/category/difficulty")

  def value(self, version: ModelVersion) -> float | None:
    """This criterion's measured value for `version`, None when not recorded."""
    if self.name == "accuracy":
      if not self.category:
        return overall_accuracy(version.eval)
      rows = (version.eval or {}).get("rows", ())
      found = [r["accuracy"] for r in rows if row_key(r) == self.category]
      return float(found[0]) if found else None
    value = (version.serving or {}).get(self.figure)
    return float(value) if isinstance(value, int | float) else None

  def requirement(self) -> str:
    """The hard requirement as text ("" if none)."""
    parts = []
    if self.min_value is not None:
      parts.append(f">= {self.min_value:g}")
    if self.max_value is not None:
      parts.append(f"<= {self.max_value:g}")
    return " and ".join(parts)


@dataclasses.dataclass(frozen=True)
class RoleProfile:
  """A role: what it needs of a model and how much each criterion weighs."""

  role: str
  criteria: tuple[Criterion, ...]
  description: str = ""
  candidates: tuple[str, ...] = ()   # references; empty: every registered version

  @classmethod
  def from_dict(cls, data: Any, where: str = "role profile") -> RoleProfile:
    """Validates a profile; errors name `where` and the field."""
    if not isinstance(data, Mapping):
      raise ValueError(f"{where}: a role profile must be a JSON object")
    if not isinstance(data.get("role"), str) or not data["role"]:
      raise ValueError(f"{where}: field 'role' must be a non-empty string")
    raw = data.get("criteria")
    if not isinstance(raw, Mapping) or not raw:
      raise ValueError(f"{where}: field 'criteria' must be a non-empty object "
                       f"{{name: {{weight, ...}}}} with names from {sorted(CRITERIA)}")
    criteria = []
    for name, spec in raw.items():
      field = f"{where}: criteria.{name}"
      if name not in CRITERIA:
        raise ValueError(f"{field}: unknown criterion; use {sorted(CRITERIA)}")
      if not isinstance(spec, Mapping):
        raise ValueError(f"{field} must be an object {{weight, direction?, min?, max?}}")
      unknown = sorted(set(spec) - {"weight", "direction", "min", "max", "figure", "category"})
      if unknown:
        raise ValueError(f"{field}: unknown field(s) {unknown}")
      weight = spec.get("weight", 1.0)
      if not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"{field}.weight must be a number >= 0, got {weight!r}")
      figure, direction = CRITERIA[name]
      direction = spec.get("direction", direction)
      if direction not in ("min", "max"):
        raise ValueError(f"{field}.direction must be 'min' or 'max', got {direction!r}")
      bounds = {}
      for key in ("min", "max"):
        if spec.get(key) is not None and not isinstance(spec[key], int | float):
          raise ValueError(f"{field}.{key} must be a number, got {spec[key]!r}")
        bounds[key] = None if spec.get(key) is None else float(spec[key])
      if name == "accuracy" and "figure" in spec:
        raise ValueError(f"{field}: accuracy reads the evaluation; use 'category', not 'figure'")
      if name != "accuracy" and "category" in spec:
        raise ValueError(f"{field}: 'category' applies to accuracy only")
      criteria.append(Criterion(name, float(weight), direction, max_value=bounds["max"],
                                min_value=bounds["min"], figure=spec.get("figure", figure),
                                category=spec.get("category", "")))
    if not sum(c.weight for c in criteria) > 0:
      raise ValueError(f"{where}: field 'criteria': the weights sum to 0")
    candidates = data.get("candidates", ())
    if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
      raise ValueError(f"{where}: field 'candidates' must be a list of model references")
    return cls(role=data["role"], criteria=tuple(criteria),
               description=str(data.get("description", "")), candidates=tuple(candidates))

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> RoleProfile:
    """Reads a JSON role profile."""
    try:
      data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: cannot read the role profile: {e}") from None
    return cls.from_dict(data, str(path))


@dataclasses.dataclass(frozen=True)
class Selection:
  """The outcome: ranked candidates with per-criterion scores, exclusions and reasoning."""

  profile: RoleProfile
  ranking: tuple[dict[str, Any], ...]    # {"ref", "total", "criteria": {name: {...}}}
  excluded: tuple[dict[str, Any], ...]   # {"ref", "failed": [reason, ...]}
  reasoning: str
  created: str

  @property
  def selected(self) -> str | None:
    """The chosen version's reference (None: no candidate met the requirements)."""
    return self.ranking[0]["ref"] if self.ranking else None

  def to_json(self) -> dict[str, Any]:
    """The JSON selection record."""
    return {"role": self.profile.role, "description": self.profile.description,
            "created": self.created, "method": METHOD, "selected": self.selected,
            "criteria": [dataclasses.asdict(c) for c in self.profile.criteria],
            "ranking": list(self.ranking), "excluded": list(self.excluded),
            "reasoning": self.reasoning}

  def to_markdown(self) -> str:
    """The selection record as a Markdown document."""
    p = self.profile
    lines = [f"# Model selection: {p.role}", "", p.description, "" if p.description else None,
             f"- Date: {self.created}", f"- Method: {METHOD}",
             f"- Selected: **{self.selected or 'none'}**", "", "## Criteria", "",
             "| criterion | weight | better | requirement |", "|---|---|---|---|"]
    total = sum(c.weight for c in p.criteria)
    for c in p.criteria:
      what = c.category or c.figure or "overall accuracy"
      lines.append(f"| {c.name} ({what}) | {c.weight / total:.2f} | {c.direction} | "
                   f"{c.requirement() or '-'} |")
    lines += ["", "## Candidates (ranked)", "",
              "Each cell: the measured value (its score, 0 worst to 1 best of the candidates).", "",
              "| rank | version | " + " | ".join(c.name for c in p.criteria) + " | total |",
              "|---|---|" + "---|" * len(p.criteria) + "---|"]
    for rank, entry in enumerate(self.ranking, 1):
      cells = [f"{entry['criteria'][c.name]['value']:g} ({entry['criteria'][c.name]['score']:.2f})"
               for c in p.criteria]
      lines.append(f"| {rank} | {entry['ref']} | " + " | ".join(cells)
                   + f" | {entry['total']:.3f} |")
    if self.excluded:
      lines += ["", "## Excluded", ""]
      lines += [f"- {e['ref']}: {'; '.join(e['failed'])}" for e in self.excluded]
    lines += ["", "## Reasoning", "", self.reasoning, ""]
    return "\n".join(line for line in lines if line is not None)


def _candidates(registry: Registry, profile: RoleProfile) -> list[ModelVersion]:
  if profile.candidates:
    found = {v.ref: v for v in (registry.resolve(r) for r in profile.candidates)}
    return list(found.values())
  return registry.list()


def _reasoning(profile: RoleProfile, ranking: list[dict[str, Any]],
               excluded: list[dict[str, Any]]) -> str:
  """A paragraph saying why the winner won, what the runner-up lost on, what was excluded."""
  if not ranking:
    return (f"No candidate meets the requirements of role '{profile.role}'"
            + (": " + "; ".join(f"{e['ref']} ({', '.join(e['failed'])})" for e in excluded)
               if excluded else " (no candidates).") + ".")
  best = ranking[0]
  scored = [c for c in profile.criteria if c.weight > 0]
  leads = [c.name for c in scored if best["criteria"][c.name]["score"] == 1.0]
  text = [f"{best['ref']} is selected for role '{profile.role}' with a total of "
          f"{best['total']:.3f} out of 1"
          + (f"; it is the best candidate on {', '.join(leads)}" if leads else "") + "."]
  if len(ranking) > 1:
    second = ranking[1]
    diffs = {c.name: best["criteria"][c.name]["weighted"] - second["criteria"][c.name]["weighted"]
             for c in scored}
    # Rounded so that a tie in exact arithmetic goes to the profile's first criterion.
    decider = max(diffs, key=lambda name: round(diffs[name], 9))
    v1, v2 = best["criteria"][decider]["value"], second["criteria"][decider]["value"]
    text.append(f"The runner-up {second['ref']} ({second['total']:.3f}) loses most on "
                f"{decider} ({v2:g} against {v1:g}).")
    against = [n for n, d in diffs.items() if d < 0]
    if against:
      text.append(f"It leads on {', '.join(against)}, by less weighted score than it trails "
                  "on the rest.")
  if excluded:
    text.append("Excluded: " + "; ".join(f"{e['ref']} ({', '.join(e['failed'])})"
                                         for e in excluded) + ".")
  return " ".join(text)


def select(registry: Registry, profile: RoleProfile) -> Selection:
  """Scores the profile's candidates (see the module docstring) and ranks them."""
  admitted, excluded = [], []
  for version in _candidates(registry, profile):
    values, failed = {}, []
    for c in profile.criteria:
      value = c.value(version)
      if value is None:
        failed.append(f"no recorded {c.category or c.figure or 'accuracy'} for {c.name}")
        continue
      values[c.name] = value
      if c.max_value is not None and value > c.max_value:
        failed.append(f"{c.name} {value:g} > {c.max_value:g}")
      if c.min_value is not None and value < c.min_value:
        failed.append(f"{c.name} {value:g} < {c.min_value:g}")
    if failed:
      excluded.append({"ref": version.ref, "failed": failed})
    else:
      admitted.append((version, values))
  total_weight = sum(c.weight for c in profile.criteria)
  ranking = []
  for version, values in admitted:
    entry: dict[str, Any] = {"ref": version.ref, "criteria": {}, "total": 0.0}
    for c in profile.criteria:
      column = [v[c.name] for _, v in admitted]
      low, high = min(column), max(column)
      value = values[c.name]
      if high == low:
        score = 1.0
      else:
        score = (value - low) / (high - low) if c.direction == "max" else (high - value) / (
            high - low)
      weight = c.weight / total_weight
      entry["criteria"][c.name] = {"value": value, "score": score, "weight": weight,
                                   "weighted": weight * score}
      entry["total"] += weight * score
    ranking.append(entry)
  ranking.sort(key=lambda e: (-e["total"], e["ref"]))
  return Selection(profile=profile, ranking=tuple(ranking), excluded=tuple(excluded),
                   reasoning=_reasoning(profile, ranking, excluded), created=now())


def write_selection(registry: Registry, selection: Selection) -> tuple[pathlib.Path,
                                                                      pathlib.Path]:
  """Writes the record as JSON and Markdown into REGISTRY/selections/; returns both paths."""
  directory = registry.root / "selections"
  directory.mkdir(parents=True, exist_ok=True)
  stamp = re.sub(r"[^0-9T]", "", selection.created.split("+")[0]) + "Z"
  role = re.sub(r"[^A-Za-z0-9._-]+", "-", selection.profile.role).strip("-") or "role"
  stem = f"{stamp}-{role}-{uuid.uuid4().hex[:4]}"
  json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
  atomic_write_text(json_path, json.dumps(selection.to_json(), indent=2, default=str) + "\n")
  atomic_write_text(md_path, selection.to_markdown())
  return json_path, md_path


def candidates_table(selection: Selection) -> tuple[list[str], list[list[Any]]]:
  """(headers, rows) of the ranking for `registry.format_table`."""
  names = [c.name for c in selection.profile.criteria]
  rows = [[rank, e["ref"], *[e["criteria"][n]["value"] for n in names],
           *[e["criteria"][n]["score"] for n in names], e["total"]]
          for rank, e in enumerate(selection.ranking, 1)]
  return (["rank", "version", *names, *[f"{n} score" for n in names], "total"], rows)


def excluded_lines(selection: Selection) -> Sequence[str]:
  """One line per excluded candidate."""
  return [f"{e['ref']}: {'; '.join(e['failed'])}" for e in selection.excluded]
