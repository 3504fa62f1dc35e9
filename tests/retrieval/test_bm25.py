from wakea_jax.retrieval.bm25 import BM25
from wakea_jax.retrieval.store import Document, DocumentStore
from wakea_jax.toolbox import retrieval as toolbox_retrieval

DOCS = [Document("cats", "The cat sat on the mat."), Document("dogs", "Dogs bark."),
        Document("jax", "JAX compiles with jit.")]


def test_one_bm25_shared_with_toolbox():
  assert toolbox_retrieval.BM25 is BM25 and toolbox_retrieval.Document is Document


def test_bm25_over_store_and_add():
  store = DocumentStore(DOCS)
  bm25 = BM25(store)
  rows, scores = bm25.search_rows("cat jit", 5)
  assert sorted(rows.tolist()) == [0, 2] and (scores > 0).all()
  before = bm25.search("bark", 1)[0].score
  bm25.add([Document("birds", "Birds sing and bark rarely.")])
  assert [h.doc_id for h in bm25.search("sing", 2)] == ["birds"]
  assert bm25.search("bark", 1)[0].score != before  # idf and lengths were updated
