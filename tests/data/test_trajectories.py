"""Expert trajectories: the record schema, file formats, errors naming file:line and field."""

import json
import re

import pytest

from wakea_jax.data import trajectories as traj_lib

GOOD = {"problem": "Solve 2x + 3 = 7.",
        "steps": [{"action": "2x = 4", "reasoning": "Subtract 3 from both sides."},
                  {"action": "x = 2"}],
        "answer": "2", "meta": {"teacher": "programmatic", "attempts": 1}}


def _write(tmp_path, lines, name="t.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return path


def test_jsonl_loads_with_steps_meta_and_locations(tmp_path):
  other = {"problem": "p", "steps": [{"action": "a"}], "answer": 3.5, "id": 7}
  path = _write(tmp_path, [json.dumps(GOOD), "", json.dumps(other)])
  first, second = traj_lib.load_trajectories(str(path))
  assert first.steps == (traj_lib.Step("2x = 4", "Subtract 3 from both sides."),
                         traj_lib.Step("x = 2", None))
  assert first.answer == "2" and first.meta == GOOD["meta"] and first.origin == f"{path}:1"
  # Numbers stay numbers; unknown top-level fields (Hub ids) are ignored.
  assert second.answer == 3.5 and second.meta == {} and second.origin == f"{path}:3"


def test_solution_text_is_the_canonical_format():
  trajectory = traj_lib.to_trajectory(GOOD, "x")
  assert traj_lib.solution_text(trajectory) == (
      "<think>Subtract 3 from both sides.</think>\n"
      "Step 1: 2x = 4\n"
      "Step 2: x = 2\n"
      "<answer>2</answer>")
  assert traj_lib.solution_text(trajectory, reasoning=False) == (
      "Step 1: 2x = 4\nStep 2: x = 2\n<answer>2</answer>")


def test_write_then_load_round_trips_in_every_format(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  records = [GOOD, {"problem": "q", "steps": [{"action": "b", "reasoning": ""}], "answer": 1}]
  path = tmp_path / "out.jsonl"
  assert traj_lib.write_trajectories(records, path) == 2
  loaded = traj_lib.load_trajectories(path)
  assert [t.to_json() for t in loaded] == records
  (tmp_path / "t.json").write_text(json.dumps(records))
  pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "problem": "other"}]),
                 tmp_path / "t.parquet")
  from_json = traj_lib.load_trajectories(tmp_path / "t.json")
  from_parquet = traj_lib.load_trajectories(tmp_path / "t.parquet")
  assert [t.to_json() for t in from_json] == records
  assert from_json[1].origin == f"{tmp_path / 't.json'}[1]"
  # Parquet gives the second step a null reasoning: it is absent, not "None".
  assert from_parquet[0].to_json() == GOOD and from_parquet[1].problem == "other"
  # Written trajectories load back as they are (Trajectory objects too).
  traj_lib.write_trajectories(loaded, tmp_path / "again.jsonl")
  assert (tmp_path / "again.jsonl").read_text() == path.read_text()


def _bad(**changes):
  record = json.loads(json.dumps(GOOD))
  for key, value in changes.items():
    if value is None:
      record.pop(key)
    else:
      record[key] = value
  return json.dumps(record)


STEPS3 = [{"action": "a"}, {"action": "b"}]


@pytest.mark.parametrize("line, message", [
    (_bad(problem=None), "t.jsonl:1: field 'problem' is missing"),
    (_bad(problem="  "), "t.jsonl:1: field 'problem' must be a non-empty string"),
    (_bad(steps=None), "t.jsonl:1: field 'steps' is missing"),
    (_bad(steps=[]), "t.jsonl:1: field 'steps' must be a non-empty list of steps"),
    (_bad(steps="a; b"), "t.jsonl:1: field 'steps' must be a non-empty list of steps, got str"),
    (_bad(steps=[*STEPS3, {"action": ""}]),
     "t.jsonl:1: field 'steps[2].action' must be a non-empty string"),
    (_bad(steps=[*STEPS3, {"action": 4}]),
     "t.jsonl:1: field 'steps[2].action' must be a non-empty string, got int"),
    (_bad(steps=[*STEPS3, {"reasoning": "r"}]), "t.jsonl:1: field 'steps[2].action' is missing"),
    (_bad(steps=[*STEPS3, "c"]), "t.jsonl:1: field 'steps[2]' must be an object"),
    (_bad(steps=[{"action": "a\nb"}]), "field 'steps[0].action' must be a single line"),
    (_bad(steps=[{"action": "Step 1: x = 2"}]),
     "field 'steps[0].action' starts with the step label 'Step 1:'"),
    (_bad(steps=[{"action": "x <think> 2"}]), "field 'steps[0].action' contains the markup"),
    (_bad(steps=[{"action": "a", "reasonin": "r"}]),
     "field 'steps[0].reasonin' is not a step field (did you mean 'reasoning'?)"),
    (_bad(steps=[{"action": "a", "reasoning": 3}]),
     "field 'steps[0].reasoning' must be a string, got int"),
    (_bad(steps=[{"action": "a", "reasoning": "r</think>"}]),
     "field 'steps[0].reasoning' contains the markup '</think>'"),
    (_bad(answer=None), "t.jsonl:1: field 'answer' is missing"),
    (_bad(answer=True), "t.jsonl:1: field 'answer' must be a string or a number, got bool"),
    (_bad(answer="1\n2"), "field 'answer' must be a single line"),
    (_bad(answer="<answer>2</answer>"), "field 'answer' contains the markup '<answer>'"),
    (_bad(meta=[1]), "t.jsonl:1: field 'meta' must be an object, got list"),
    ("[1]", "t.jsonl:1: a trajectory record must be a JSON object, got list"),
    ('{"problem": ', "t.jsonl:1: invalid JSON"),
])
def test_malformed_records_name_the_location_and_field(tmp_path, line, message):
  path = _write(tmp_path, [line])
  with pytest.raises(ValueError, match=re.escape(message)):
    traj_lib.load_trajectories(str(path))


def test_skip_and_count_keeps_the_good_records_and_reports_the_rest(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD), _bad(answer=None), json.dumps(GOOD)])
  with pytest.raises(ValueError, match=r"t.jsonl:2: field 'answer' is missing"):
    traj_lib.load_trajectories(path)
  kept = traj_lib.load_trajectories(path, on_error="skip_and_count")
  assert [t.origin for t in kept] == [f"{path}:1", f"{path}:3"]
  only_bad = _write(tmp_path, [_bad(answer=None)], name="bad.jsonl")
  with pytest.raises(ValueError, match=r"no trajectory records \(1 malformed, skipped\)"):
    traj_lib.load_trajectories(only_bad, on_error="skip_and_count")


def test_write_refuses_a_malformed_record_and_writes_nothing(tmp_path):
  path = tmp_path / "out.jsonl"
  with pytest.raises(ValueError, match=r"records\[1\]: field 'steps\[0\].action' is missing"):
    traj_lib.write_trajectories([GOOD, {**GOOD, "steps": [{}]}], path)
  assert not path.exists()


def test_bundled_expert_task_specs():
  from wakea_jax.data.tasks import equations

  spec = "task:equations?n=6&seed=0&max_level=3"
  loaded = traj_lib.load_trajectories(spec)
  assert len(loaded) == 6 and loaded[2].origin == f"{spec}[2]"
  # The canonical text is the one the equations task trains SFT on.
  for t in loaded:
    assert traj_lib.solution_text(t) == equations.render_solution(
        [{"action": s.action, "reasoning": s.reasoning} for s in t.steps], t.answer)
  with pytest.raises(ValueError, match="unknown task 'arithmetic'"):
    traj_lib.load_trajectories("task:arithmetic?n=2")
