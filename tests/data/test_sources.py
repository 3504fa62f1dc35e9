"""Data sources: formats, schemas, errors that name file, line and field; bundled tasks."""

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wakea_jax.data import chat, sources
from wakea_jax.data.tasks import TASKS, arithmetic

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path, lines):
  path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
  return path


def test_jsonl_json_parquet_load_the_same_records(tmp_path):
  records = [CHAT, {"prompt": "p", "response": "r"}]
  jsonl = sources.read_file(_jsonl(tmp_path / "a.jsonl", [records[0], "", records[1]]))
  (tmp_path / "a.json").write_text(json.dumps(records))
  from_json = sources.read_file(tmp_path / "a.json")
  pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}] * 3),
                 tmp_path / "a.parquet")
  parquet = sources.read_file(tmp_path / "a.parquet")
  assert jsonl.records == from_json.records and len(parquet) == 3
  assert jsonl.origins == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3"]  # blank line 2
  assert from_json.origins == [f"{tmp_path}/a.json[0]", f"{tmp_path}/a.json[1]"]
  assert parquet.origins[2] == f"{tmp_path}/a.parquet[2]"
  assert jsonl[0] == {"messages": CHAT["messages"], "tools": None, "num_prompt_messages": 0,
                      "origin": f"{tmp_path}/a.jsonl:1"}


def test_prompt_response_becomes_a_chat():
  record = sources.to_record({"prompt": "2+2?", "response": "4", "system": "Be brief."}, "x")
  assert record == {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}
  assert [m["role"] for m in sources.to_record({"prompt": "a", "response": "b"}, "x")["messages"]
          ] == ["user", "assistant"]


def test_parquet_chat_with_tool_calls_and_absent_keys(tmp_path):
  dialogue = arithmetic.generate(1, seed=3)[0]
  pq.write_table(pa.Table.from_pylist([dialogue, CHAT]), tmp_path / "t.parquet")
  # Parquet gives every message every key (null where absent); the source drops the nulls.
  assert sources.read_file(tmp_path / "t.parquet").records == [dialogue, CHAT]


def test_tools_field_is_kept_and_rendered(tmp_path):
  record = dict(CHAT, tools=[arithmetic.CALCULATOR_TOOL])
  source = sources.read_file(_jsonl(tmp_path / "t.jsonl", [record]))
  assert source[0]["tools"] == [arithmetic.CALCULATOR_TOOL]
  with pytest.raises(ValueError, match=r"t2.jsonl:1: field 'tools\[0\]' must be a JSON object"):
    sources.read_file(_jsonl(tmp_path / "t2.jsonl", [dict(CHAT, tools=["calculator"])]))


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "p"}', r"field 'completion' \(or 'response'\) is missing"),
    ('{"prompt": "p", "response": 3}', r"field 'response' must be a string, got int"),
    ('{"prompt": "p", "response": "r", "system": 1}', r"field 'system' must be a string"),
    ('{"prompt": "p", "response": "a<|im_end|>"}', r"field 'response' contains the turn"),
    ('{"messages": []}', r"field 'messages' must be a non-empty list"),
    ('{"messages": {"role": "user"}}', r"field 'messages' must be a list, got dict"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"field 'messages\[0\].role' must be"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}',
     r"field 'messages\[1\].content' is missing"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     ' "tool_calls": [{"arguments": {}}]}]}', r"field 'messages\[1\].tool_calls\[0\].name'"),
    ('{"messages": [{"role": "user", "content": "x"}]}',
     r"field 'messages' has no assistant message"),
    ('{"prompt": ', r"invalid JSON"),
    ('[1, 2]', r"a record must be a JSON object, got list"),
    ('{"text": "x"}', r"field 'text' \(TRL's standard language-modeling form\) is not supported"),
    ('{"input": "x"}', r"matches no record schema \(fields \['input'\]\); accepted: 'messages'"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, match):
  path = _jsonl(tmp_path / "bad.jsonl", [CHAT, CHAT, line])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: {match}"):
    sources.read_file(path)


def test_json_and_parquet_errors_name_file_record_and_field(tmp_path):
  (tmp_path / "x.json").write_text(json.dumps([CHAT, {"prompt": "p", "response": None}]))
  with pytest.raises(ValueError, match=r"x.json\[1\]: field 'response' must be a string, got null"):
    sources.read_file(tmp_path / "x.json")
  (tmp_path / "broken.json").write_text('[\n{"prompt": "p",\n')
  with pytest.raises(ValueError, match=r"broken.json:3: invalid JSON"):
    sources.read_file(tmp_path / "broken.json")
  (tmp_path / "y.json").write_text("{}")
  with pytest.raises(ValueError, match=r"y.json: a .json source must hold a list of records"):
    sources.read_file(tmp_path / "y.json")
  rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": None}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "z.parquet")
  with pytest.raises(ValueError, match=r"z.parquet\[1\]: field 'completion' \(or 'response'\) is "
                                       r"missing"):
    sources.read_file(tmp_path / "z.parquet")
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match=r"junk.parquet: cannot read Parquet"):
    sources.read_file(tmp_path / "junk.parquet")


def test_file_level_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl: data source does not exist"):
    sources.read_file(tmp_path / "missing.jsonl")
  (tmp_path / "z.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported file type '.csv'"):
    sources.read_file(tmp_path / "z.csv")
  with pytest.raises(ValueError, match="on_error must be one of"):
    sources.read_file(tmp_path / "z.csv", on_error="ignore")
  (tmp_path / "u.jsonl").write_bytes(json.dumps(CHAT).encode() + b"\n\xff\xfe\n")
  with pytest.raises(ValueError, match=r"u.jsonl:2: not valid UTF-8"):
    sources.read_file(tmp_path / "u.jsonl")


def test_skip_and_count_reports_every_bad_record(tmp_path, caplog):
  path = _jsonl(tmp_path / "mixed.jsonl", [CHAT, '{"prompt": 1, "response": "r"}', CHAT, "oops"])
  with caplog.at_level(logging.WARNING):
    source = sources.read_file(path, on_error="skip_and_count")
  assert len(source) == 2 and len(source.skipped) == 2
  assert source.skipped[0].startswith(f"{path}:2: field 'prompt'")
  assert source.skipped[1].startswith(f"{path}:4: invalid JSON")
  assert f"{path}:2:" in caplog.text and f"{path}:4:" in caplog.text  # each one logged
  assert "skipped 2 malformed record(s), kept 2" in caplog.text
  with pytest.raises(ValueError, match=r"no valid records \(1 malformed, skipped\)"):
    sources.read_file(_jsonl(tmp_path / "all_bad.jsonl", ["{}"]), on_error="skip_and_count")


def test_task_specs():
  a = sources.load_source("task:arithmetic?n=5&seed=1")
  assert a.records == sources.load_source("task:arithmetic?seed=1&n=5").records and len(a) == 5
  assert a.records != sources.load_source("task:arithmetic?n=5&seed=2").records
  assert len(sources.load_source("task:smalltalk")) == 1000  # default n
  for spec, match in [("task:nope?n=3", "unknown task 'nope'"),
                      ("task:arithmetic?count=5", "unknown parameter"),
                      ("task:arithmetic?n=five", "'n' must be one integer"),
                      ("task:arithmetic?n=0", "'n' must be >= 1")]:
    with pytest.raises(ValueError, match=match):
      sources.load_source(spec)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_valid_and_written_as_jsonl(tmp_path, name):
  records = TASKS[name](50, 7)
  assert records == TASKS[name](50, 7) and records != TASKS[name](50, 8)
  sources.write_jsonl(records, tmp_path / "t.jsonl")
  assert sources.read_file(tmp_path / "t.jsonl").records == records


def test_arithmetic_dialogues_call_the_calculator_and_copy_its_result():
  ops = set()
  for record in arithmetic.generate(200, seed=0):
    messages = record["messages"]
    roles = [m["role"] for m in messages if m["role"] != "system"]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = messages[-3]["tool_calls"][0]
    assert call["name"] == "calculator" and set(call["arguments"]) == {"expression"}
    expr = call["arguments"]["expression"]
    result = messages[-2]["content"]
    assert result == str(arithmetic.evaluate(expr))
    assert result in messages[-1]["content"]
    ops |= {op for op in "+-*" if op in expr[1:]}
    # The rendered call parses back to the same call.
    assert chat.parse_tool_calls(chat.render_text(messages[-3:-2])) == [call]
  assert ops == {"+", "-", "*"}
  assert arithmetic.evaluate("12 * 3") == 36 and arithmetic.evaluate("5-9") == -4
  with pytest.raises(ValueError, match="not a generated expression"):
    arithmetic.evaluate("12")


def _check_steps(text: str) -> list[tuple[int, str, int, int]]:
  """Every "x op y = z" step of a worked answer, each checked to be right."""
  steps = [(int(x), op, int(y), int(z)) for x, op, y, z in
           re.findall(r"(-?\d+) ([+-]) (\d+) = (-?\d+)", text)]
  for x, op, y, z in steps:
    assert z == (x + y if op == "+" else x - y), text
  return steps


def test_arithmetic_chains_and_their_worked_answers():
  records = arithmetic.expert_traces(300, 3, max_operand=99, operands=3)
  prompts = arithmetic.prompts(300, 3, max_operand=99, tools=0, operands=3)
  assert [r["messages"] for r in records] == [p["messages"] for p in prompts]
  spoken = 0
  for record in records:
    question = record["messages"][-1]["content"]
    words = re.sub(r"\bplus\b", "+", re.sub(r"\bminus\b", "-", question))
    spoken += words != question
    terms = re.findall(r"\d+|[+-]", words)
    assert len(terms) == 5, question                       # three operands
    value = int(terms[0])
    for op, b in zip(terms[1::2], terms[2::2]):
      assert 1 <= int(b) <= 99
      value = value + int(b) if op == "+" else value - int(b)
      assert value >= 0, question                          # the running value stays >= 0
    assert record["answer"] == str(value)
    trace = record["trace"]
    assert trace.endswith(f"The answer is {value}.")
    steps = _check_steps(trace)
    # The steps walk the chain: each starts from the last one's result, and each operand
    # is added or taken in its tens, then its ones.
    assert steps[0][0] == int(terms[0]) and steps[-1][3] == value
    assert all(s[0] == prev[3] for prev, s in zip(steps, steps[1:]))
    assert all(x >= 0 for x, _, _, _ in steps)
  assert 30 < spoken < 120                                 # a quarter in words
  assert arithmetic.labels(2, 3, max_operand=99, tools=0, operands=3)[0]["category"] == "chain"
  # split=False: one step per operand, walking the chain the same way.
  whole = arithmetic.expert_traces(300, 3, max_operand=99, operands=3, split=False)
  for record, plain in zip(records, whole):
    assert plain["messages"] == record["messages"] and plain["answer"] == record["answer"]
    steps = _check_steps(plain["trace"])
    assert len(steps) == 2 and steps[1][0] == steps[0][3]
    assert plain["trace"].endswith(f"The answer is {record['answer']}.")
  # style="reduce": the expression reduced one operation at a time, tail carried along.
  reduced = arithmetic.expert_traces(300, 3, max_operand=99, operands=3, style="reduce")
  for record, red in zip(records, reduced):
    assert red["messages"] == record["messages"] and red["answer"] == record["answer"]
    body = red["trace"].removesuffix(f". The answer is {red['answer']}.")
    first, middle, last = body.split(" = ")
    a, op1, b, op2, c = first.split()
    ab = int(a) + int(b) if op1 == "+" else int(a) - int(b)   # independent of the code
    assert middle == f"{ab} {op2} {c}" and last == red["answer"]
  assert arithmetic.reduced_chain((5, "+", 6, "+", 7, "-", 3)) == (
      "5 + 6 + 7 - 3 = 11 + 7 - 3 = 18 - 3 = 15. The answer is 15.")
  with pytest.raises(ValueError, match="style must be one of"):
    arithmetic.expert_traces(2, 3, max_operand=99, operands=3, style="tree")
  with pytest.raises(ValueError, match="reduces chains"):
    arithmetic.expert_traces(2, 3, max_operand=99, style="reduce")
  # Two operands: the chain method is worked_answer itself.
  for a, op, b in ((47, "+", 85), (93, "-", 40), (12, "-", 7), (5, "+", 61)):
    assert arithmetic.worked_chain((a, op, b)) == arithmetic.worked_answer(a, op, b)
  assert arithmetic.worked_answer(47, "+", 85) == "47 + 80 = 127, 127 + 5 = 132. The answer is 132."
  assert arithmetic.worked_answer(93, "-", 40) == "93 - 40 = 53. The answer is 53."
  # Dialogues with worked=100 show the work; the SFT data's default (2 operands) is unchanged.
  worked = arithmetic.generate(20, 3, max_operand=99, tools=0, operands=3, worked=100)
  assert [d["messages"][-1]["content"] for d in worked] == [r["trace"] for r in records[:20]]
  assert arithmetic.generate(5, 0, max_operand=99, tools=0) == arithmetic.generate(
      5, 0, max_operand=99, tools=0, operands=2)
  assert sources.load_source("task:arithmetic?n=4&max_operand=99&tools=0&operands=3").records
  with pytest.raises(ValueError, match="tools=0 and max_operand > 0"):
    arithmetic.generate(2, 0, max_operand=99, operands=3)
  with pytest.raises(ValueError, match="operands must be >= 2"):
    arithmetic.generate(2, 0, max_operand=99, tools=0, operands=1)


def test_arithmetic_cue_marks_exactly_the_worked_chains():
  plain = arithmetic.generate(200, 3, max_operand=50, tools=0, operands=3, worked=50)
  cued = sources.load_source(
      "task:arithmetic?n=200&seed=3&max_operand=50&tools=0&operands=3&worked=50&cue=100"
  ).records
  shown = 0
  for p, c in zip(plain, cued):
    worked = bool(re.search(r"\d+ [+-] \d+ = \d+, ", p["messages"][-1]["content"]))
    # The cue is the only difference: same questions and answers, the system message added
    # to the worked dialogues and to no other.
    assert c["messages"][0] == {"role": "system", "content": "Show your work."} if worked else (
        c["messages"] == p["messages"])
    if worked:
      assert c["messages"][1:] == p["messages"]
    shown += worked
  assert 70 < shown < 130                                  # worked=50
  # The RL prompts of a cued source with worked=100 are the hard questions (phrased anew:
  # worked draws a number per dialogue) with the cue.
  asked = arithmetic.prompts(20, 3, max_operand=50, tools=0, operands=3, worked=100, cue=100)
  bare = arithmetic.prompts(20, 3, max_operand=50, tools=0, operands=3)
  numbers = lambda m: re.findall(r"\d+", m[-1]["content"])
  assert all(a["messages"][0]["content"] == "Show your work." for a in asked)
  assert [numbers(a["messages"]) for a in asked] == [numbers(b["messages"]) for b in bare]
  assert [a["answer"] for a in asked] == [b["answer"] for b in bare]
  # cue=P cues about P percent of the worked chains, the rest unchanged.
  some = arithmetic.generate(400, 3, max_operand=50, tools=0, operands=3, worked=100, cue=20)
  every = arithmetic.generate(400, 3, max_operand=50, tools=0, operands=3, worked=100)
  marked = [d["messages"][0]["role"] == "system" for d in some]
  assert 50 < sum(marked) < 110
  assert [d["messages"][m:] for d, m in zip(some, marked)] == [d["messages"] for d in every]
  with pytest.raises(ValueError, match="cue marks worked chains"):
    arithmetic.generate(2, 0, max_operand=99, tools=0, worked=30, cue=100)
  with pytest.raises(ValueError, match="percentage of the worked chains"):
    arithmetic.generate(2, 0, max_operand=99, tools=0, operands=3, cue=101)
