"""Training-data sources: local JSONL / JSON / Parquet files and bundled task generators.

Two record schemas are accepted:
  {"messages": [...]}                               chat, tool calls, reasoning (see chat.py)
  {"prompt": str, "response": str, "system"?: str}  turned into a system/user/assistant chat

Every record is validated when the source is loaded, so an error names the file, the line
(JSONL; the record index for JSON and Parquet) and the field:
  `data/x.jsonl:17: field 'response' must be a string`.
A malformed record raises by default; with `on_error="skip_and_count"` it is logged with its
location and counted in `Source.skipped` instead, never dropped silently.

Records are held in memory (a list): the sources here are fine-tuning sets of thousands to
a few hundred thousand examples. `Source` is a grain random-access data source.
"""

from __future__ import annotations

import json
import logging
import pathlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

from wakea_jax.data import chat
from wakea_jax.data.tasks import TASKS

_log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip_and_count")


class Source:
  """A list of validated chat records with their origins; grain RandomAccessDataSource."""

  def __init__(self, name: str, records: list[list[dict]], origins: list[str],
               skipped: list[str] | None = None):
    self.name = name
    self.records = records
    self.origins = origins
    self.skipped = skipped or []

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"messages": self.records[index], "origin": self.origins[index]}

  def __repr__(self) -> str:
    return f"Source({self.name!r}, {len(self)} records, {len(self.skipped)} skipped)"


def to_messages(record: Any, where: str) -> list[dict]:
  """Validates one raw record and returns its chat messages; errors start with `where`."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list")
  elif "prompt" in record or "response" in record:
    for field in ("prompt", "response"):
      if field not in record:
        raise ValueError(f"{where}: field '{field}' is missing")
      if not isinstance(record[field], str):
        raise ValueError(f"{where}: field '{field}' must be a string")
    messages = [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    if record.get("system") is not None:
      if not isinstance(record["system"], str):
        raise ValueError(f"{where}: field 'system' must be a string")
      messages.insert(0, {"role": "system", "content": record["system"]})
  else:
    raise ValueError(f"{where}: needs field 'messages' or fields 'prompt' and 'response'")
  try:
    chat.render_text(messages)  # full structural validation of every message
  except ValueError as e:
    raise ValueError(f"{where}: field 'messages': {e}") from None
  if not any(m.get("role") == "assistant" for m in messages):
    raise ValueError(f"{where}: field 'messages' has no assistant message to train on")
  return messages


def _raw_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  """(location, raw record) pairs; JSON decoding errors are yielded as exceptions."""
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          yield where, json.loads(line)
        except json.JSONDecodeError as e:
          yield where, ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
  elif suffix == ".json":
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
      raise ValueError(f"{path}: a .json source must hold a list of records")
    for index, record in enumerate(data):
      yield f"{path}[{index}]", record
  elif suffix == ".parquet":
    import pyarrow.parquet as pq  # noqa: PLC0415  (only needed for parquet)
    try:
      table = pq.read_table(path)
    except Exception as e:
      raise ValueError(f"{path}: cannot read parquet ({e})") from None
    for index, record in enumerate(table.to_pylist()):
      yield f"{path}[row {index}]", _drop_nulls(record)
  else:
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _drop_nulls(value: Any) -> Any:
  """Parquet fills absent struct fields with None; drop them so validation sees JSON."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


def read_file(path: str | pathlib.Path, *, on_error: str = "raise") -> Source:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"data source {path} does not exist")
  records, origins, skipped = [], [], []
  for where, raw in _raw_records(path):
    try:
      if isinstance(raw, Exception):
        raise raw
      records.append(to_messages(raw, where))
      origins.append(where)
    except ValueError as e:
      if on_error == "raise":
        raise
      _log.warning("skipping malformed record: %s", e)
      skipped.append(str(e))
  if not records:
    raise ValueError(f"{path}: no valid records" + (f" ({len(skipped)} skipped)" if skipped
                                                     else ""))
  if skipped:
    _log.warning("%s: skipped %d malformed record(s)", path, len(skipped))
  return Source(str(path), records, origins, skipped)


def parse_task_spec(spec: str) -> tuple[str, int, int]:
  """`task:NAME?n=1000&seed=0` -> (NAME, n, seed)."""
  parsed = urllib.parse.urlparse(spec)
  name = parsed.path
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r} in source {spec!r}; tasks: {sorted(TASKS)}")
  query = dict(urllib.parse.parse_qsl(parsed.query))
  unknown = sorted(set(query) - {"n", "seed"})
  if unknown:
    raise ValueError(f"source {spec!r}: unknown parameter(s) {unknown}; use n and seed")
  try:
    return name, int(query.get("n", 1000)), int(query.get("seed", 0))
  except ValueError:
    raise ValueError(f"source {spec!r}: n and seed must be integers") from None


def load_source(spec: str, *, on_error: str = "raise") -> Source:
  """A file path (.jsonl/.json/.parquet) or a bundled task `task:NAME?n=..&seed=..`."""
  if spec.startswith("task:"):
    name, n, seed = parse_task_spec(spec)
    raw = TASKS[name](n, seed)
    records = [to_messages(r, f"{spec}[{i}]") for i, r in enumerate(raw)]
    return Source(spec, records, [f"{spec}[{i}]" for i in range(len(records))])
  return read_file(spec, on_error=on_error)


def write_jsonl(records: list[dict], path: str | pathlib.Path) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
