import dataclasses
import json

import pytest

from wakea_jax.retrieval.store import Document
from wakea_jax.toolbox import search_dag as sd
from wakea_jax.toolbox import search_render
from wakea_jax.toolbox.search_sources import (
  OFFLINE_NOTE,
  HttpSource,
  Passage,
  SourceRegistry,
  bm25_source,
  build_sources,
  index_source,
)
from wakea_jax.toolbox.web import HttpSearchBackend

SOURCES = ("Local", "BM25", "Web", "News")

GOOD = """<search>
Nodes:
A: who founded Acme Corp (Local)
B: where was {A} born (Web)
Edges:
A -> B
</search>"""


def reason(text, sources=SOURCES, caps=sd.DAGCaps()):
  dag = sd.parse_dag(text)
  if isinstance(dag, sd.DAGError):
    return dag.reason
  error = sd.validate(dag, sources, caps)
  return None if error is None else error.reason


def block(*lines):
  return "<search>\n" + "\n".join(lines) + "\n</search>"


def test_parse_good_dag():
  dag = sd.parse_dag(GOOD)
  assert dag == sd.QueryDAG(
      (sd.QueryNode("A", "who founded Acme Corp", "Local"),
       sd.QueryNode("B", "where was {A} born", "Web")), (("A", "B"),))
  assert sd.validate(dag, SOURCES) is None
  # The inside of a block parses the same; sources match in any case; spaces are free.
  assert sd.parse_dag(GOOD.replace("<search>", "").replace("</search>", "")) == dag
  assert sd.validate(dag, ["local", "WEB"]) is None
  loose = sd.parse_dag("<search>\n  nodes :\n\n A :who founded Acme Corp( Local )\n"
                       "B: where was {A} born (Web)\nEDGES:\nA->B\nA -> B\n</search>")
  assert loose == dag   # the repeated edge counts once


def test_query_may_contain_parentheses_and_single_node_needs_no_edges():
  dag = sd.parse_dag(block("Nodes:", "X1: who founded Acme (the company) in 1990 (News)"))
  assert dag.nodes == (sd.QueryNode("X1", "who founded Acme (the company) in 1990", "News"),)
  assert dag.edges == ()
  assert sd.validate(dag, SOURCES) is None


BAD_DAGS = [
    ("no block here at all", "missing_nodes_section"),
    ("<search>\nNodes:\nA: q (Local)\n", "unclosed_search"),
    (block("A: q (Local)"), "missing_nodes_section"),
    (block("Let me search.", "Nodes:", "A: q (Local)"), "unexpected_text"),
    (block("Edges:", "Nodes:", "A: q (Local)"), "unexpected_text"),
    (block("Nodes:", "A: q (Local)", "Nodes:", "B: r (Local)"), "unexpected_text"),
    (block("Nodes:", "A: q (Local)", "Edges:", "Nodes:"), "unexpected_text"),
    (block("Nodes:", "A: who founded Acme"), "bad_node_line"),
    (block("Nodes:", "A who founded Acme (Local)"), "bad_node_line"),
    (block("Nodes:", "1A: q (Local)"), "bad_node_line"),
    (block("Nodes:", "A: q (Local) please"), "bad_node_line"),
    (block("Nodes:", "A: q (Local)", "Edges:", "A => B"), "bad_edge_line"),
    (block("Nodes:", "A: q (Local)", "Edges:", "A -> B -> C"), "bad_edge_line"),
    (block("Nodes:", "A: q (Local)", "A: r (Web)"), "duplicate_node"),
    (block("Nodes:", "Edges:"), "empty_nodes"),
    (block("Nodes:", "A: (Local)"), "empty_query"),
    (block("Nodes:", "A:    (Local)"), "empty_query"),
    (block("Nodes:", "A: q (Wikipedia)"), "unknown_source"),
    (block("Nodes:", "A: q ()"), "unknown_source"),
    (block("Nodes:", "A: q (Local)", "Edges:", "A -> B"), "undefined_node"),
    (block("Nodes:", "A: q {Z} (Local)"), "undefined_node"),
    (block("Nodes:", "A: q (Local)", "Edges:", "A -> A"), "self_loop"),
    (block("Nodes:", "A: q (Local)", "B: r {A} (Local)"), "reference_not_parent"),
    (block("Nodes:", "A: q (Local)", "B: r (Web)", "Edges:", "A -> B", "B -> A"), "cycle"),
    (block("Nodes:", "A: a (Local)", "B: b (Local)", "C: c (Local)", "D: d (Local)",
           "Edges:", "A -> B", "B -> C", "C -> D", "D -> B"), "cycle"),
]


@pytest.mark.parametrize("text, code", BAD_DAGS)
def test_each_reason_code(text, code):
  assert code in sd.REASONS
  assert reason(text) == code


def test_every_reason_code_is_tested_here():
  # A new reason needs a case: in BAD_DAGS, or in test_caps / the trajectory test below.
  elsewhere = {"too_many_nodes", "too_many_edges", "query_too_long", "no_search_block"}
  assert {code for _, code in BAD_DAGS} | elsewhere == set(sd.REASONS)


def test_caps():
  caps = sd.DAGCaps(max_nodes=2, max_edges=1, max_query_chars=10)
  assert reason(block("Nodes:", "A: a (Local)", "B: b (Local)"), caps=caps) is None
  assert reason(block("Nodes:", "A: a (Local)", "B: b (Local)", "C: c (Local)"),
                caps=caps) == "too_many_nodes"
  assert reason(block("Nodes:", "A: a (Local)", "B: b (Local)", "Edges:", "A -> B", "B -> A"),
                caps=caps) == "too_many_edges"
  assert reason(block("Nodes:", "A: 0123456789 (Local)"), caps=caps) is None
  assert reason(block("Nodes:", "A: 0123456789x (Local)"), caps=caps) == "query_too_long"
  with pytest.raises(ValueError, match="DAGCaps"):
    sd.DAGCaps(max_nodes=0)


def test_cycle_message_names_the_cycle_and_errors_never_raise_on_model_text():
  dag = sd.parse_dag(block("Nodes:", "A: a (Local)", "B: b (Local)", "C: c (Local)",
                           "Edges:", "A -> B", "B -> C", "C -> B"))
  error = sd.validate(dag, SOURCES)
  assert error.reason == "cycle" and "B, C" in error.message
  with pytest.raises(ValueError, match="cycle"):
    sd.topological_order(dag)
  for junk in ["", "<search></search>", "<search>\x00\n}{\n->\n:\n()", "Nodes:\n" + ":" * 10**4,
               "<search>" * 1000, "Nodes:\nA: " + "(" * 5000 + " (Local)",
               "Nodes:\nA: x" + " " * 1500 + "y" + " " * 400 + "(Local"]:
    assert isinstance(sd.parse_dag(junk), (sd.DAGError, sd.QueryDAG))
  long_line = "Nodes:\nA: x" + " " * 10**5 + "y (Local)"
  assert sd.parse_dag(long_line).reason == "query_too_long"
  with pytest.raises(ValueError, match="unknown reason"):
    sd.DAGError("nope", "")


def test_topological_order_breaks_ties_by_name():
  dag = sd.parse_dag(block("Nodes:", "D: d (Local)", "C: c (Local)", "B: b (Local)",
                           "A: a (Local)", "E: e (Local)",
                           "Edges:", "D -> A", "C -> A", "E -> B"))
  # Ready at the start: C, D, E (A waits on C and D; B on E).
  assert sd.topological_order(dag) == ("C", "D", "A", "E", "B")
  assert sd.topological_order(sd.parse_dag(GOOD)) == ("A", "B")


def test_trajectory_error_reads_every_block_and_ignores_results():
  good = GOOD + "\n<r>\nA (Local): q\n<search>\nbroken\n</search>\n</r>\n" + GOOD
  assert sd.trajectory_error(good, SOURCES) is None
  assert sd.trajectory_error("I know it. <answer>x</answer>", SOURCES).reason == \
      "no_search_block"
  bad_second = GOOD + "\n" + block("Nodes:", "A: q (Moon)")
  assert sd.trajectory_error(bad_second, SOURCES).reason == "unknown_source"
  assert sd.trajectory_error(GOOD + "<search>\nNodes:", SOURCES).reason == "unclosed_search"
  assert sd.search_blocks("x<search>a</search>y<search>b</search>") == [
      "<search>a</search>", "<search>b</search>"]


# ------------------------------------------------------------------------------------------
# Execution over sources
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeSource:
  name: str
  table: dict
  note: str = ""
  calls: list = dataclasses.field(default_factory=list)

  def search(self, query, k):
    self.calls.append((query, k))
    if query == "boom":
      raise ConnectionError("network down")
    return [Passage(t, f"text of {t}", 1.0 / (i + 1), self.name)
            for i, t in enumerate(self.table.get(query, []))][:k]


def fake_registry():
  local = FakeSource("Local", {"who founded Acme Corp": ["Jane Roe", "John Doe"],
                               "nothing": []})
  web = FakeSource("Web", {"where was Jane Roe born": ["Lisbon", "Porto", "Faro", "Braga"]},
                   note=OFFLINE_NOTE)
  return SourceRegistry([local, web]), local, web


def test_execute_substitutes_the_parents_top_title():
  registry, local, web = fake_registry()
  result = sd.execute(sd.parse_dag(GOOD), registry, k=3)
  assert result.order == ("A", "B")
  assert result.queries == {"A": "who founded Acme Corp", "B": "where was Jane Roe born"}
  assert [p.title for p in result.passages["B"]] == ["Lisbon", "Porto", "Faro"]  # k = 3
  assert local.calls == [("who founded Acme Corp", 3)]
  assert web.calls == [("where was Jane Roe born", 3)]
  assert result.errors == {} and result.num_searches == 2
  assert sd.top_title([Passage("  a\n b ", "", 0.0, "x")]) == "a b"
  assert sd.top_title([Passage("t" * 500, "", 0.0, "x")]) == "t" * sd.SUBSTITUTION_CHARS


def test_execute_skips_children_of_empty_parents_and_survives_failing_sources():
  registry, _, web = fake_registry()
  dag = sd.parse_dag(block("Nodes:", "A: nothing (Local)", "B: where was {A} born (web)",
                           "C: boom (WEB)", "D: plain child (Web)",
                           "Edges:", "A -> B", "A -> D"))
  result = sd.execute(dag, registry, k=2)
  assert result.order == ("A", "B", "C", "D")
  assert result.errors["B"] == "skipped: {A} has no result"
  assert result.errors["C"].startswith("search failed: ConnectionError: network down")
  assert "D" not in result.errors and result.passages["D"] == ()   # an edge alone: runs
  assert result.num_searches == 3   # B was never sent
  assert [q for q, _ in web.calls] == ["boom", "plain child"]
  # An invalid DAG is returned as its error, nothing is searched.
  error = sd.execute(sd.parse_dag(block("Nodes:", "A: q (News)")), registry)
  assert error.reason == "unknown_source"


def test_execute_over_a_real_bm25_source():
  docs = [Document("acme", "Acme Corp was founded in 1990 by Jane Roe.",
                   {"title": "Jane Roe"}),
          Document("roe", "Jane Roe was born in Lisbon and studied in Porto."),
          Document("other", "Beta Ltd was founded by Max Mole.")]
  registry = SourceRegistry([bm25_source("BM25", docs), FakeSource("Local", {})])
  dag = sd.parse_dag(block("Nodes:", "A: who founded Acme Corp (bm25)",
                           "B: where was {A} born (BM25)", "Edges:", "A -> B"))
  result = sd.execute(dag, registry, k=1)
  # "acme" carries the title metadata; "roe" has none, so its id is its title.
  assert [(p.title, p.source) for p in result.passages["A"]] == [("Jane Roe", "BM25")]
  assert result.queries["B"] == "where was Jane Roe born"
  assert [p.title for p in result.passages["B"]] == ["roe"]
  assert "Lisbon" in result.passages["B"][0].text


def test_index_directory_sources_dense_and_bm25(tmp_path):
  from wakea_jax.retrieval.embed import load_embedder
  from wakea_jax.retrieval.index import DenseIndex

  embedder = load_embedder("hash-256")   # numpy feature hashing; brute force below 10k docs
  docs = [Document("acme", "Acme Corp was founded by Jane Roe.", {"title": "Jane Roe"}),
          Document("roe", "Jane Roe was born in Lisbon."),
          Document("beta", "Beta Ltd sells pumps.")]
  directory = DenseIndex.build(docs, embedder).save(tmp_path / "idx")
  registry = SourceRegistry([index_source("Local", directory, "dense", embedder=embedder),
                             index_source("BM25", directory, "bm25")])
  dag = sd.parse_dag(block("Nodes:", "A: Acme Corp was founded by (Local)",
                           "B: {A} born (BM25)", "Edges:", "A -> B"))
  result = sd.execute(dag, registry, k=1)
  assert [p.title for p in result.passages["A"]] == ["Jane Roe"]   # the store's metadata
  assert result.queries["B"] == "Jane Roe born"
  assert [(p.title, p.source) for p in result.passages["B"]] == [("roe", "BM25")]


def test_http_source_keeps_titles_and_build_sources_checks_fields(tmp_path):
  source = HttpSource("News", HttpSearchBackend("http://localhost:1/search"))
  body = json.dumps({"results": [{"id": "u1", "title": "Acme news", "text": "t", "score": 2},
                                 {"url": "http://x", "snippet": "s"}]}).encode()
  assert source.parse(body) == [Passage("Acme news", "t", 2.0, "News"),
                                Passage("http://x", "s", 0.0, "News")]
  (tmp_path / "web.jsonl").write_text(json.dumps({"id": "w", "text": "acme web page"}) + "\n")
  registry = build_sources({"Web": {"corpus": str(tmp_path / "web.jsonl"), "offline": True},
                            "News": {"url": "http://localhost:1/news"}})
  assert registry.names == ("Web", "News") and "news" in registry and "Moon" not in registry
  assert registry.get("WEB").note == OFFLINE_NOTE
  assert [p.title for p in registry.get("web").search("acme", 3)] == ["w"]
  with pytest.raises(ValueError, match=r"sources.Web: give exactly one of"):
    build_sources({"Web": {"corpus": "a", "url": "b"}})
  with pytest.raises(ValueError, match=r"sources.Web: unknown field 'mode'"):
    build_sources({"Web": {"corpus": "a", "mode": "dense"}})
  with pytest.raises(ValueError, match="case-insensitive"):
    SourceRegistry([FakeSource("web", {}), FakeSource("Web", {})])


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

def test_render_format():
  registry, _, _ = fake_registry()
  text = search_render.render(sd.execute(sd.parse_dag(GOOD), registry, k=2))
  assert text == (
      "<r>\nA (Local): who founded Acme Corp\n[1] Jane Roe: text of Jane Roe\n"
      "[2] John Doe: text of John Doe\n</r>\n"
      f"<r>\nB (Web, {OFFLINE_NOTE}): where was Jane Roe born\n[1] Lisbon: text of Lisbon\n"
      "[2] Porto: text of Porto\n</r>")
  error = sd.parse_dag(block("Nodes:", "A: q (Local)", "B: r {A} (Local)"))
  assert search_render.render(sd.execute(error, registry)) == (
      "<r>\nError (reference_not_parent): node B: uses {A} without the edge A -> B\n</r>")


class LongSource:
  name, note = "Local", ""

  def search(self, query, k):
    return [Passage(f"T{i}", f"<r>{query}</r> " + "word " * 200, 1.0, "Local")
            for i in range(k)]


def test_render_caps_per_line_per_node_and_in_total():
  registry = SourceRegistry([LongSource()])
  nodes = [f"N{i}: query {i} (Local)" for i in range(6)]
  result = sd.execute(sd.parse_dag(block("Nodes:", *nodes)), registry, k=5)
  caps = search_render.RenderCaps(passage_chars=100, node_chars=300, total_chars=1000)
  text = search_render.render(result, caps)
  assert len(text) <= 1000
  blocks = text.split("\n</r>")
  for b in text.split("</r>\n"):
    assert len(b if b.endswith("</r>") else b + "</r>") <= 300
    assert b.startswith("<r>\n")
  assert all(len(line) <= 100 for line in text.splitlines())
  assert "<r>query" not in text and "&lt;r&gt;query 0&lt;/r&gt;" in text  # escaped passages
  assert text.count("<r>") == text.count("</r>") == len(blocks) - 1
  assert sd.strip_results(text).strip() == ""   # escaped tags cannot break the blocks
  # Later nodes get the room that is left, then nothing.
  assert text.count("<r>") < 6
  for total in range(40, 1200, 37):
    caps = search_render.RenderCaps(passage_chars=60, node_chars=min(total, 250), total_chars=total)
    assert len(search_render.render(result, caps)) <= total
  with pytest.raises(ValueError, match="RenderCaps"):
    search_render.RenderCaps(node_chars=10)


def test_search_response_parses_executes_and_renders():
  registry, _, _ = fake_registry()
  text, result = search_render.search_response("I will search.\n" + GOOD, registry, k=1)
  assert result.num_searches == 2 and text.count("<r>") == 2
  text, error = search_render.search_response(block("Nodes:"), registry)
  assert error.reason == "empty_nodes" and text.startswith("<r>\nError (empty_nodes)")
