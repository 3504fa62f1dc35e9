"""Evaluation and serving records as the registry stores them: validation and summaries.

An evaluation is a list of rows {task, category, difficulty, accuracy, n} (serving/tracking.py
makes them: one per difficulty cell, plus one per category over all its difficulties, with
difficulty "all"); serving figures are a flat object of measurements (SERVING_FIGURES and any
other numbers or text, such as the machine they were measured on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Serving figures a version can record (record_serving); other numeric keys are kept too.
SERVING_FIGURES = ("p50_latency_ms", "p95_latency_ms", "tokens_per_s", "peak_memory_mb")


class RecordError(ValueError):
  """An evaluation or serving record that is malformed."""


def eval_rows(results: Any, where: str) -> list[dict[str, Any]]:
  """Validated evaluation rows {task, category, difficulty, accuracy, n} from a list of rows
  or a tracking result ({"rows": [...], ...})."""
  rows = results.get("rows") if isinstance(results, Mapping) else results
  if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
    raise RecordError(f"{where}: evaluation results must be a non-empty list of rows "
                        "{task, category, difficulty, accuracy, n} (or {'rows': [...]})")
  out = []
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise RecordError(f"{where}: rows[{i}] must be an object, got {type(row).__name__}")
    missing = [k for k in ("category", "accuracy", "n") if k not in row]
    if missing:
      raise RecordError(f"{where}: rows[{i}]: field(s) {missing} missing")
    accuracy, n = row["accuracy"], row["n"]
    if not isinstance(accuracy, int | float) or not 0.0 <= accuracy <= 1.0:
      raise RecordError(f"{where}: rows[{i}]: field 'accuracy' must be in [0, 1], got "
                          f"{accuracy!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
      raise RecordError(f"{where}: rows[{i}]: field 'n' must be an integer >= 0, got {n!r}")
    out.append({**row, "task": str(row.get("task", "")), "category": str(row["category"]),
                "difficulty": str(row.get("difficulty", "all")), "accuracy": float(accuracy)})
  return out


def row_key(row: Mapping[str, Any]) -> str:
  """"task/category/difficulty" of an evaluation row (the unit compared across versions)."""
  return f"{row.get('task', '')}/{row['category']}/{row.get('difficulty', 'all')}"


def cell_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The rows that partition the examples: per difficulty cells (not the per-category "all"
  totals that repeat them), or every row when there are no cells."""
  cells = [r for r in rows if r.get("difficulty", "all") != "all"]
  return cells or list(rows)


def overall_accuracy(eval_record: Mapping[str, Any] | None) -> float | None:
  """The overall accuracy of a recorded evaluation: its "overall" entry, else the n-weighted
  mean of its per-cell rows (difficulty other than "all"); None when nothing is recorded."""
  if not eval_record:
    return None
  overall = eval_record.get("overall")
  if overall and overall.get("n"):
    return float(overall["accuracy"])
  rows = cell_rows(eval_record.get("rows", ()))
  total = sum(r["n"] for r in rows)
  return sum(r["accuracy"] * r["n"] for r in rows) / total if total else None


def check_serving_figures(figures: Any, where: str) -> None:
  """Raises RecordError unless `figures` holds at least one of SERVING_FIGURES, each a
  number >= 0."""
  if not isinstance(figures, Mapping) or not set(SERVING_FIGURES) & set(figures):
    raise RecordError(f"{where}: figures must be a mapping with at least one of "
                      f"{', '.join(SERVING_FIGURES)}")
  for key in SERVING_FIGURES:
    value = figures.get(key)
    if key in figures and (not isinstance(value, int | float) or isinstance(value, bool)
                           or value < 0):
      raise RecordError(f"{where}: field {key!r} must be a number >= 0, got {value!r}")
