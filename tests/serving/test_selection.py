"""Role-based selection (MCDA) against a hand-computed example."""

import json

import pytest

from wakea_jax.serving import selection
from wakea_jax.serving.registry import Registry
from wakea_jax.serving.selection import RoleProfile

# name: (p95 latency ms, overall accuracy, peak memory MB); None: nothing recorded.
FIGURES = {"A": (100, 0.6, 500), "B": (150, 0.8, 300), "C": (180, 0.9, 200),
           "E": (250, 0.95, 100), "F": (90, 0.4, 100), "D": None}
PROFILE = {"role": "chat frontend", "description": "interactive chat",
           "criteria": {"latency_ms": {"weight": 3, "max": 200},
                        "accuracy": {"weight": 2, "min": 0.5},
                        "memory_mb": {"weight": 2}}}


def make_registry(tmp_path):
  reg = Registry(tmp_path / "reg")
  for name, figures in FIGURES.items():
    ck = tmp_path / name
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    reg.register(name, ck)
    if figures:
      latency, accuracy, memory = figures
      reg.record_serving(name, 1, {"p95_latency_ms": latency, "peak_memory_mb": memory,
                                   "tokens_per_s": 10.0})
      reg.record_eval(name, 1, [{"task": "t", "category": "c", "difficulty": "d",
                                 "accuracy": accuracy, "n": 10}])
  return reg


def test_select_matches_hand_computation(tmp_path):
  reg = make_registry(tmp_path)
  result = selection.select(reg, RoleProfile.from_dict(PROFILE))
  # Admitted A, B, C. Weights 3/7, 2/7, 2/7. Min-max over the admitted:
  #   latency 100..180 (min better): A 1, B 30/80 = 0.375, C 0
  #   accuracy 0.6..0.9 (max better): A 0, B 2/3, C 1
  #   memory 200..500 (min better): A 0, B 2/3, C 1
  #   A = 3/7 = 0.428571; B = (3 * 0.375 + 2 * 2/3 + 2 * 2/3) / 7 = 0.541667; C = 4/7
  assert [e["ref"] for e in result.ranking] == ["C:1", "B:1", "A:1"]
  totals = {e["ref"]: e["total"] for e in result.ranking}
  assert totals == pytest.approx({"C:1": 4 / 7, "B:1": 3.7916667 / 7, "A:1": 3 / 7})
  b = next(e for e in result.ranking if e["ref"] == "B:1")["criteria"]
  assert b["latency_ms"] == pytest.approx({"value": 150.0, "score": 0.375, "weight": 3 / 7,
                                           "weighted": 0.375 * 3 / 7})
  assert b["accuracy"]["score"] == pytest.approx(2 / 3)
  assert result.selected == "C:1"
  assert {e["ref"]: e["failed"] for e in result.excluded} == {
      "D:1": ["no recorded p95_latency_ms for latency_ms", "no recorded accuracy for accuracy",
              "no recorded peak_memory_mb for memory_mb"],
      "E:1": ["latency_ms 250 > 200"], "F:1": ["accuracy 0.4 < 0.5"]}
  assert result.reasoning.startswith("C:1 is selected for role 'chat frontend' with a total of "
                                     "0.571 out of 1; it is the best candidate on accuracy, "
                                     "memory_mb.")
  assert "The runner-up B:1 (0.542) loses most on accuracy (0.8 against 0.9)." in (
      result.reasoning)
  assert "It leads on latency_ms, by less weighted score" in result.reasoning
  assert "E:1 (latency_ms 250 > 200)" in result.reasoning


def test_candidates_category_criterion_and_records(tmp_path):
  reg = make_registry(tmp_path)
  profile = dict(PROFILE, candidates=["A", "B@production", "C:1"])
  with pytest.raises(ValueError, match="'B' has no stage 'production'"):
    selection.select(reg, RoleProfile.from_dict(profile))
  reg.promote("B", 1)
  profile["criteria"] = {"accuracy": {"weight": 1, "category": "t/c/d"},
                         "latency_ms": {"weight": 0, "max": 160}}
  result = selection.select(reg, RoleProfile.from_dict(profile))
  assert [e["ref"] for e in result.ranking] == ["B:1", "A:1"]   # C fails the latency cap
  json_path, md_path = selection.write_selection(reg, result)
  assert json_path.parent == reg.root / "selections" and md_path.suffix == ".md"
  record = json.loads(json_path.read_text())
  assert record["selected"] == "B:1" and record["method"].startswith("weighted sum")
  assert [e["ref"] for e in record["ranking"]] == ["B:1", "A:1"]
  assert record["excluded"] == [{"ref": "C:1", "failed": ["latency_ms 180 > 160"]}]
  text = md_path.read_text()
  assert "# Model selection: chat frontend" in text and "- Selected: **B:1**" in text
  assert "| 1 | B:1 | 0.8 (1.00) | 150 (0.00) | 1.000 |" in text
  assert "- C:1: latency_ms 180 > 160" in text and "## Reasoning" in text


def test_no_candidate_meets_the_requirements(tmp_path):
  reg = make_registry(tmp_path)
  profile = dict(PROFILE, criteria={"latency_ms": {"weight": 1, "max": 10}})
  result = selection.select(reg, RoleProfile.from_dict(profile))
  assert result.selected is None and result.ranking == ()
  assert result.reasoning.startswith("No candidate meets the requirements of role")


@pytest.mark.parametrize("data, message", [
    ([], "must be a JSON object"),
    ({"criteria": {"accuracy": {}}}, "field 'role' must be a non-empty string"),
    ({"role": "r"}, "field 'criteria' must be a non-empty object"),
    ({"role": "r", "criteria": {"speed": {}}}, r"criteria.speed: unknown criterion"),
    ({"role": "r", "criteria": {"accuracy": {"weight": -1}}}, r"accuracy.weight must be"),
    ({"role": "r", "criteria": {"accuracy": {"direction": "up"}}}, "direction must be"),
    ({"role": "r", "criteria": {"accuracy": {"max": "x"}}}, r"accuracy.max must be a number"),
    ({"role": "r", "criteria": {"accuracy": {"weight": 0}}}, "the weights sum to 0"),
    ({"role": "r", "criteria": {"accuracy": {"wieght": 1}}}, r"unknown field\(s\) \['wieght'\]"),
    ({"role": "r", "criteria": {"accuracy": {}}, "candidates": "A"}, "field 'candidates'"),
])
def test_profile_errors(data, message):
  with pytest.raises(ValueError, match=f"p.json: .*{message}"):
    RoleProfile.from_dict(data, "p.json")


def test_profile_from_file(tmp_path):
  (tmp_path / "p.json").write_text(json.dumps(PROFILE))
  profile = RoleProfile.from_file(tmp_path / "p.json")
  assert [c.name for c in profile.criteria] == ["latency_ms", "accuracy", "memory_mb"]
  assert profile.criteria[0].figure == "p95_latency_ms" and profile.criteria[0].direction == "min"
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json: cannot read the role profile"):
    RoleProfile.from_file(tmp_path / "bad.json")
