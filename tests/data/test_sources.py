"""Data sources: formats, schemas, and errors that name file, line and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wakea_jax.data import sources

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return path


def test_jsonl_json_parquet_and_prompt_response(tmp_path):
  a = sources.read_file(_jsonl(tmp_path / "a.jsonl", [CHAT, {"prompt": "p", "response": "r",
                                                             "system": "s"}]))
  assert len(a) == 2 and a.origins == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2"]
  assert [m["role"] for m in a[1]["messages"]] == ["system", "user", "assistant"]
  (tmp_path / "b.json").write_text(json.dumps([CHAT, CHAT]))
  assert len(sources.read_file(tmp_path / "b.json")) == 2
  pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}] * 3),
                 tmp_path / "c.parquet")
  assert len(sources.read_file(tmp_path / "c.parquet")) == 3


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "p"}', r"bad.jsonl:2: field 'response' is missing"),
    ('{"prompt": "p", "response": 3}', r"bad.jsonl:2: field 'response' must be a string"),
    ('{"messages": []}', r"bad.jsonl:2: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:2: field 'messages': .*"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"bad.jsonl:2: .*no assistant message"),
    ('{"prompt": ', r"bad.jsonl:2: invalid JSON"),
    ('[1, 2]', r"bad.jsonl:2: a record must be a JSON object"),
    ('{"text": "x"}', r"bad.jsonl:2: needs field 'messages'"),
])
def test_errors_name_file_line_and_field(tmp_path, line, match):
  path = _jsonl(tmp_path / "bad.jsonl", [CHAT, line])
  with pytest.raises(ValueError, match=match):
    sources.read_file(path)


def test_skip_and_count_reports_every_bad_record(tmp_path, caplog):
  path = _jsonl(tmp_path / "mixed.jsonl", [CHAT, '{"prompt": 1, "response": "r"}', CHAT, "oops"])
  source = sources.read_file(path, on_error="skip_and_count")
  assert len(source) == 2 and len(source.skipped) == 2
  assert "mixed.jsonl:2" in source.skipped[0] and "mixed.jsonl:4" in source.skipped[1]
  assert "skipped 2 malformed" in caplog.text


def test_json_and_file_errors(tmp_path):
  (tmp_path / "x.json").write_text(json.dumps([CHAT, {"prompt": "p"}]))
  with pytest.raises(ValueError, match=r"x.json\[1\]: field 'response' is missing"):
    sources.read_file(tmp_path / "x.json")
  (tmp_path / "y.json").write_text("{}")
  with pytest.raises(ValueError, match="list of records"):
    sources.read_file(tmp_path / "y.json")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.read_file(tmp_path / "missing.jsonl")
  (tmp_path / "z.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported file type '.csv'"):
    sources.read_file(tmp_path / "z.csv")
  with pytest.raises(ValueError, match="on_error"):
    sources.read_file(tmp_path / "z.csv", on_error="ignore")


def test_tasks_are_deterministic_and_valid():
  a = sources.load_source("task:arithmetic?n=5&seed=1")
  b = sources.load_source("task:arithmetic?n=5&seed=1")
  assert a.records == b.records and len(a) == 5
  with pytest.raises(ValueError, match="unknown parameter"):
    sources.load_source("task:arithmetic?count=5")
  from wakea_jax.data.tasks import arithmetic
  assert arithmetic.evaluate("12 * 3") == 36 and arithmetic.evaluate("5-9") == -4
