"""RL prompt sources: validation with locations, bundled tasks, and the resumable iterator."""

import json

import pytest

from wakea_jax.data.tasks import arithmetic
from wakea_jax.rl import prompts as prompts_lib


def _write(tmp_path, lines):
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_records_of_both_schemas_load_with_answers_and_meta(tmp_path):
  path = _write(tmp_path, [
      json.dumps({"prompt": "What is 2+2?", "system": "Be brief.", "answer": "4"}),
      "",
      json.dumps({"messages": [{"role": "user", "content": "Run the tests"}],
                  "tests": ["assert f() == 1"]}),
  ])
  records = prompts_lib.load_prompts(str(path))
  assert [m["role"] for m in records[0].messages] == ["system", "user"]
  assert records[0].answer == "4" and records[0].origin == f"{path}:1"
  assert records[1].answer is None and records[1].meta == {"tests": ["assert f() == 1"]}
  assert records[1].origin == f"{path}:3"


@pytest.mark.parametrize("line, message", [
    ('{"answer": "1"}', r"prompts.jsonl:1: field 'prompt' \(or 'messages'\) is missing"),
    ('{"prompt": ""}', r":1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "messages": []}', r":1: give either field 'messages' or field 'prompt'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r":1: field 'messages' must end before the assistant's answer"),
    ('{"messages": [{"role": "wizard", "content": "q"}]}', r":1: field 'messages'"),
    ('[1, 2]', r":1: a prompt record must be a JSON object, got list"),
    ('{"prompt": "a"', r":1: invalid JSON"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, line, message):
  with pytest.raises(ValueError, match=message):
    prompts_lib.load_prompts(str(_write(tmp_path, [line])))


def test_task_prompts_carry_exact_answers():
  records = prompts_lib.load_prompts("task:arithmetic?n=20&seed=3&max_operand=99&tools=0")
  assert len(records) == 20
  for record in records:
    assert record.messages[-1]["role"] == "user" and record.answer.lstrip("-").isdigit()
  # The answer is the value the dialogue generator's assistant states for the same question.
  dialogues = arithmetic.generate(20, 3, max_operand=99, tools=0)
  for record, dialogue in zip(records, dialogues):
    assert record.messages[-1] == dialogue["messages"][-2]
    assert record.answer in dialogue["messages"][-1]["content"]
  with pytest.raises(ValueError, match="unknown parameter"):
    prompts_lib.load_prompts("task:arithmetic?n=2&bogus=1")


def test_iterator_resumes_exactly_across_epochs():
  records = prompts_lib.load_prompts("task:arithmetic?n=10&seed=1&max_operand=9&tools=0")
  straight = prompts_lib.PromptIterator(records, batch_size=4, seed=7)
  seen = [next(straight) for _ in range(6)]   # 24 prompts: more than two epochs
  first = prompts_lib.PromptIterator(records, batch_size=4, seed=7)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = prompts_lib.PromptIterator(records, batch_size=4, seed=7)
  resumed.set_state(state)
  assert [next(resumed) for _ in range(3)] == seen[3:]
  # Every epoch visits every prompt once; epochs are reshuffled.
  flat = [r.origin for batch in seen for r in batch]
  assert sorted(flat[:10]) == sorted(r.origin for r in records)
  assert flat[:10] != flat[10:20]


def test_prompt_shards_draw_the_same_prompts_whatever_the_process_count():
  """Two processes owning one shard each draw, together, what one process owning both draws;
  the state moves between the layouts; a mismatched shard count is refused."""
  records = [prompts_lib.PromptRecord(messages=({"role": "user", "content": str(i)},))
             for i in range(10)]
  both = prompts_lib.PromptIterator(records, 4, seed=3, shards=2)
  halves = [prompts_lib.PromptIterator(records, 4, seed=3, shards=2, owned=[s]) for s in (0, 1)]
  for _ in range(4):   # past an epoch boundary of each 5-record shard
    together = [p.text for p in both.take(4)]
    assert together == [p.text for h in halves for p in h.take(4)]
  state = both.get_state()
  assert state["num_shards"] == 2 and set(state["shards"]) == {"0", "1"}
  resumed = prompts_lib.PromptIterator(records, 4, seed=3, shards=2, owned=[1])
  resumed.set_state(state)
  assert [p.text for p in resumed.take(4)] == [p.text for p in both.take(4)][2:]
  with pytest.raises(ValueError, match="data.shards"):
    prompts_lib.PromptIterator(records, 4, seed=3).set_state(state)
  with pytest.raises(ValueError, match="evenly"):
    both.take(3)
