import json
import math
import socket

import pytest

from wakea_jax.toolbox import Router, retrieval, web
from wakea_jax.toolbox.retrieval import BM25, Document, Hit, load_corpus

DOCS = [Document("cats", "The cat sat on the mat. Cats like mats."),
        Document("dogs", "Dogs bark at the mailman."),
        Document("jax", "JAX is a library for numerical computing with jit and grad.")]


def test_bm25_ranks_and_scores_match_formula():
  index = BM25(DOCS)
  hits = index.search("cat mat", k=3)
  assert [h.doc_id for h in hits] == ["cats"]  # zero-score documents are dropped
  # Hand-computed Okapi BM25 for the term "mat" in doc "cats" (k1=1.5, b=0.75).
  # Token counts 9, 5, 11; "cat" and "mat" occur once each in one document ("cats" differs).
  avg = (9 + 5 + 11) / 3
  idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
  per_term = idf * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 9 / avg))
  assert hits[0].score == pytest.approx(2 * per_term)
  assert index.search("unknownword", k=2) == []
  assert [h.doc_id for h in index.search("the", k=2)] == ["cats", "dogs"]  # tf 2 beats tf 1
  # Same term frequency: length normalisation ranks the shorter document first.
  short_first = BM25([Document("long", "apple pie with many other words"),
                      Document("short", "apple pie"), Document("none", "pear")])
  assert [h.doc_id for h in short_first.search("apple", k=5)] == ["short", "long"]


def test_load_corpus_directory(tmp_path):
  (tmp_path / "a.txt").write_text("alpha beta")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("# gamma")
  (tmp_path / "c.jsonl").write_text(json.dumps({"id": "c1", "text": "delta"}) + "\n\n"
                                    + json.dumps({"text": "epsilon"}) + "\n")
  (tmp_path / "ignored.bin").write_bytes(b"\x00")
  docs = load_corpus(str(tmp_path))
  assert [(d.doc_id, d.text) for d in docs] == [
      ("a.txt", "alpha beta"), ("c1", "delta"), ("c.jsonl:3", "epsilon"), ("sub/b.md", "# gamma")]
  (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' is missing"):
    load_corpus(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    load_corpus(str(tmp_path / "empty_missing"))


def test_retrieval_tool_formats_snippets():
  router = Router([retrieval.make_tool(BM25(DOCS), k=2, max_chars=20)])
  result = router.call("retrieve", {"query": "jax grad", "k": 1})
  assert result.ok
  assert result.text.startswith("[1] jax (score ")
  assert result.text.endswith("\nJAX is a library for ...")
  assert router.call("retrieve", {"query": "zebra"}).text == "No results."
  assert not router.call("retrieve", {"query": "x", "k": "2"}).ok


def test_offline_web_search_is_labelled():
  tool = web.make_tool(BM25(DOCS), offline=True)
  assert "OFFLINE" in tool.description
  text = Router([tool]).call("web_search", {"query": "dogs"}).text
  assert text.startswith(web.OFFLINE_LABEL)
  assert "dogs" in text


def test_http_backend_request_construction_without_network():
  backend = web.HttpSearchBackend("http://search.invalid/api?key=abc",
                                  headers=(("Authorization", "Bearer t"),))
  request = backend.build_request("jax & flax", 3)
  assert request.full_url == "http://search.invalid/api?key=abc&q=jax+%26+flax&k=3"
  assert request.get_method() == "GET"
  assert request.get_header("Authorization") == "Bearer t"
  hits = backend.parse_response(b'{"results": [{"url": "u1", "score": 2, "snippet": "s"}]}')
  assert hits == [Hit("u1", 2.0, "s")]
  with pytest.raises(ValueError, match="no 'results' list"):
    backend.parse_response(b"[]")


def test_http_backend_failure_is_an_error_result():
  # A closed loopback port: the connection is refused, and the router turns it into text.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  backend = web.HttpSearchBackend(f"http://127.0.0.1:{port}/search", timeout_s=2.0)
  result = Router([web.make_tool(backend, offline=False)]).call("web_search", {"query": "q"})
  assert not result.ok and result.text.startswith("Error: web_search: URLError")
