import numpy as np
import pytest

from wakea_jax.retrieval.embed import load_embedder
from wakea_jax.retrieval.hybrid import (
  FUSIONS,
  HybridRetriever,
  LogProbReranker,
  reciprocal_rank_fusion,
  weighted_fusion,
)
from wakea_jax.retrieval.index import DenseIndex
from wakea_jax.retrieval.store import Document, Hit


def hits(*pairs):
  return [Hit(d, s, d.upper()) for d, s in pairs]


def test_rrf_and_weighted():
  a, b = hits(("x", 9.0), ("y", 5.0)), hits(("y", 0.3), ("z", 0.1))
  fused = reciprocal_rank_fusion([a, b], [1.0, 1.0], k=60)
  assert [h.doc_id for h in fused] == ["y", "x", "z"]
  assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
  fused = weighted_fusion([a, b], [0.5, 2.0])
  assert [(h.doc_id, h.score) for h in fused] == [("y", 2.0), ("x", 0.5), ("z", 0.0)]
  assert set(FUSIONS) == {"rrf", "weighted"}


def test_hybrid_retriever_and_reranker():
  docs = [Document("a", "apples and pears"), Document("b", "zebra crossing rules"),
          Document("c", "quantum zebra physics")]
  index = DenseIndex.build(docs, load_embedder("hash-32"))
  hybrid = HybridRetriever(index, fusion="weighted", weights=(0.5, 0.5))
  assert hybrid.search("zebra crossing", 1)[0].doc_id == "b"
  hybrid.add([Document("d", "kiwi smoothie")])
  assert hybrid.search("kiwi smoothie", 1)[0].doc_id == "d"

  seen = []
  def logprob_fn(prompts, answer):
    seen.extend(prompts)
    return np.array([-1.0 if "quantum" in p else -5.0 for p in prompts])
  reranked = HybridRetriever(index, reranker=LogProbReranker(logprob_fn)).search("zebra", 2)
  assert reranked[0].doc_id == "c" and reranked[0].score == -1.0
  assert "Question: zebra" in seen[0]
  with pytest.raises(ValueError, match="unknown fusion"):
    HybridRetriever(index, fusion="max")


def test_logprob_reranker_from_model():
  from flax import nnx

  from wakea_jax.models.config import get_preset
  from wakea_jax.models.transformer import Transformer

  class Tok:
    bos_id, pad_id = 1, 0
    def encode(self, text, add_bos=False):
      return ([1] if add_bos else []) + [2 + ord(c) % 60 for c in text]

  config = get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64)
  model = Transformer(config, rngs=nnx.Rngs(0))
  reranker = LogProbReranker.from_model(model, Tok(), max_len=64)
  out = reranker.rerank("q", hits(("x", 0.0), ("yy", 0.0)))
  assert {h.doc_id for h in out} == {"x", "yy"}
  assert all(np.isfinite(h.score) and h.score < 0 for h in out)
