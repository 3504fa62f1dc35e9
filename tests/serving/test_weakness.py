"""Per-category breakdowns, weakness detection and targeted data from the real generators."""

import hashlib
import json

import pytest

from wakea_jax.data import sources
from wakea_jax.data.tasks import TASK_LABELS, arithmetic
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.serving import tracking, weakness
from wakea_jax.serving.weakness import Weakness

# A hand-made results table (accuracy, n) and its parent's; the generator options are those
# of the evaluation's prompts (tracking rows carry them).
OPTIONS = {"max_operand": 99, "tools": 0, "worked": 0}
VERSION = [
    {"task": "arithmetic", "category": "addition", "difficulty": "medium", "accuracy": 0.90,
     "n": 20, "options": OPTIONS},
    {"task": "arithmetic", "category": "subtraction", "difficulty": "medium", "accuracy": 0.70,
     "n": 20, "options": OPTIONS},
    {"task": "arithmetic", "category": "multiplication", "difficulty": "medium",
     "accuracy": 0.30, "n": 20, "options": OPTIONS},
    {"task": "arithmetic", "category": "multiplication", "difficulty": "easy", "accuracy": 0.0,
     "n": 2, "options": OPTIONS},
]
PARENT = [dict(VERSION[0], accuracy=0.92), dict(VERSION[1], accuracy=0.85),
          dict(VERSION[2], accuracy=0.20)]


def test_find_weaknesses_threshold_regression_min_n():
  found = weakness.find_weaknesses(VERSION, PARENT, threshold=0.5, regression_margin=0.1,
                                   min_n=5)
  assert [(w.key, w.reasons) for w in found] == [
      ("arithmetic/multiplication/medium", ("below_threshold",)),   # weakest first
      ("arithmetic/subtraction/medium", ("regressed",)),            # 0.85 -> 0.70
  ]
  assert found[1].parent_accuracy == 0.85
  assert "regressed from 0.850 by 0.150 (> margin 0.100)" in found[1].describe(0.5, 0.1)
  # Addition dropped 0.02 only: within the margin. The 2-example cell is below min_n.
  assert len(weakness.find_weaknesses(VERSION, PARENT, min_n=1, regression_margin=0.1)) == 3
  # No parent: thresholds only; a recorded evaluation ({"rows": ...}) works as well.
  assert [w.key for w in weakness.find_weaknesses({"rows": VERSION}, threshold=0.8)] == [
      "arithmetic/multiplication/easy", "arithmetic/multiplication/medium",
      "arithmetic/subtraction/medium"]
  with pytest.raises(ValueError, match="threshold must be in"):
    weakness.find_weaknesses(VERSION, threshold=2)


def test_labels_align_with_generated_records_and_leave_them_unchanged():
  options = dict(max_operand=99, tools=1)
  records = arithmetic.generate(200, 3, **options)
  labels = TASK_LABELS["arithmetic"](200, 3, **options)
  for record, label in zip(records, labels):
    expression = record["messages"][-3]["tool_calls"][0]["arguments"]["expression"]
    a, op, b = next((expression.replace(" ", "").partition(o)) for o in "*+-"
                    if o in expression.replace(" ", "")[1:])
    assert label["category"] == arithmetic.CATEGORIES[op]
    digits = len(str(max(int(a), int(b))))
    assert label["difficulty"] == arithmetic.DIFFICULTIES[min(digits, 3) - 1]
  # The records themselves are what they were before labels existed (hash taken then).
  digest = hashlib.sha256()
  for kw in [{}, {"max_operand": 99, "tools": 0, "worked": 30}, {"max_operand": 9, "tools": 0}]:
    for generate in (arithmetic.generate, arithmetic.prompts):
      digest.update(json.dumps(generate(300, 7, **kw), sort_keys=True).encode())
  assert digest.hexdigest() == "8de3cba3a1877c6b6740866f71a34fc47edf88f40b8ec7e61c11253aa7c5e111"


def test_prompt_labels_and_breakdown():
  spec = "task:arithmetic?n=60&seed=777&max_operand=99&tools=0"
  prompts = prompts_lib.load_prompts(spec)
  labels = [tracking.prompt_label(p) for p in prompts]
  expected = arithmetic.labels(60, 777, max_operand=99, tools=0)
  assert [(x["category"], x["difficulty"]) for x in labels] == [
      (e["category"], e["difficulty"]) for e in expected]
  assert labels[0]["options"] == {"max_operand": 99, "tools": 0, "worked": 0, "operands": 2,
                                  "cue": 0}
  correct = [1.0 if x["category"] == "addition" else 0.0 for x in labels]
  result = tracking.breakdown(correct, labels)
  rows = {(r["category"], r["difficulty"]): r for r in result["rows"]}
  assert rows[("addition", "all")]["accuracy"] == 1.0
  assert rows[("multiplication", "all")]["accuracy"] == 0.0
  assert sum(r["n"] for r in result["rows"] if r["difficulty"] == "all") == 60
  assert result["overall"] == {"accuracy": pytest.approx(sum(correct) / 60), "n": 60}
  # Records without a generator or labels are "unlabelled"; labelled files keep theirs.
  plain = prompts_lib.to_prompt_record({"prompt": "2+2?", "answer": "4"}, "f.jsonl:1")
  tagged = prompts_lib.to_prompt_record(
      {"prompt": "2+2?", "answer": "4", "task": "arithmetic", "category": "addition",
       "difficulty": "easy"}, "f.jsonl:2")
  assert tracking.prompt_label(plain)["category"] == "unlabelled"
  assert tracking.prompt_label(tagged) == {"task": "arithmetic", "category": "addition",
                                           "difficulty": "easy"}
  with pytest.raises(ValueError, match="2 correctness values for 1 labels"):
    tracking.breakdown([1.0, 0.0], labels[:1])


@pytest.mark.parametrize("kind", ["prompts", "sft"])
def test_targeted_data_from_the_generators(tmp_path, kind):
  found = weakness.find_weaknesses(VERSION, PARENT, threshold=0.5, regression_margin=0.1,
                                   min_n=5)
  out = tmp_path / "targeted.jsonl"
  summary = weakness.targeted_data(found, out, n_per_category=12, seed=1, kind=kind,
                                   options=None if kind == "prompts" else {"max_operand": 99})
  assert summary["records"] == 24 and summary["counts"] == {
      "arithmetic/multiplication/medium": 12, "arithmetic/subtraction/medium": 12}
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["category"], r["difficulty"]) for r in records] == (
      [("multiplication", "medium")] * 12 + [("subtraction", "medium")] * 12)
  if kind == "prompts":
    # Valid RL prompt records, labelled through their metadata, with the eval's options
    # (tools=0: no calculator turn), exact answers.
    loaded = prompts_lib.load_prompts(str(out))
    assert all(tracking.prompt_label(p)["category"] == "multiplication" for p in loaded[:12])
    for p in loaded[:12]:
      a, b = p.messages[-1]["content"], p.answer
      assert "*" in a or "times" in a or "multiplied" in a, (a, b)
    assert all("tool_calls" not in m for p in loaded for m in p.messages)
  else:
    source = sources.load_source(str(out))   # valid SFT records (labels ignored)
    assert len(source.records) == 24 and set(source.records[0]) == {"messages"}
  # Deterministic; another seed gives other questions.
  again = tmp_path / "again.jsonl"
  weakness.targeted_data(found, again, n_per_category=12, seed=1, kind=kind,
                         options=None if kind == "prompts" else {"max_operand": 99})
  assert again.read_text() == out.read_text()


def test_targeted_data_stays_clear_of_eval_questions(tmp_path):
  w = Weakness("arithmetic", "addition", "all", 0.1, 50, ("below_threshold",),
               options={"max_operand": 99, "tools": 0})
  weakness.targeted_data([w], tmp_path / "t.jsonl", n_per_category=200)
  train = {json.loads(line)["messages"][-1]["content"]
           for line in (tmp_path / "t.jsonl").read_text().splitlines()}
  held_out = {p["messages"][-1]["content"] for p in arithmetic.prompts(
      256, 777, max_operand=99, tools=0)}
  # Distinct seeds; two-digit sums may still collide by chance, but not wholesale.
  assert len(train & held_out) < 20


def test_targeted_data_errors(tmp_path):
  hard = Weakness("arithmetic", "multiplication", "hard", 0.0, 9, ("below_threshold",),
                  options={"max_operand": 9})
  with pytest.raises(ValueError, match=r"only 0 of 4 examples .* \(is that difficulty reachable"):
    weakness.targeted_data([hard], tmp_path / "x.jsonl", n_per_category=4, max_draws=256)
  other = Weakness("smalltalk", "capital", "all", 0.0, 9, ("below_threshold",))
  with pytest.raises(ValueError, match="no labelled prompts generator for task 'smalltalk'"):
    weakness.targeted_data([other], tmp_path / "x.jsonl")
  with pytest.raises(ValueError, match="kind must be one of"):
    weakness.targeted_data([hard], tmp_path / "x.jsonl", kind="dpo")
  with pytest.raises(ValueError, match="no weaknesses"):
    weakness.targeted_data([], tmp_path / "x.jsonl")
  assert not (tmp_path / "x.jsonl").exists()


def test_follow_up_command(tmp_path):
  rl = weakness.follow_up_command("configs/grpo.py:arithmetic", tmp_path / "t.jsonl",
                                  init_from="/ck", workdir="/w", python="python")
  assert rl == ["python", "-m", "wakea_jax.train", "--config=configs/grpo.py:arithmetic",
                "--workdir=/w", "--config.init_from=/ck",
                f"--config.data.sources={tmp_path / 't.jsonl'}"]
  sft = weakness.follow_up_command("configs/sft.py:arithmetic", "t.jsonl", init_from="/ck",
                                   workdir="/w", kind="sft", python="python")
  assert sft[-1].startswith("--config.data.sources=((") and sft[-1].endswith(", 1.0),)")
  assert "'--config.data.sources=((" in weakness.shell_line(sft)
