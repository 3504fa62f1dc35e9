"""Hybrid retrieval: dense (ScaNN) and BM25 rankings fused, then optionally reranked.

  HybridRetriever(index, fusion="rrf").search(query, k)           # a SearchBackend
  HybridRetriever(index, fusion="weighted", weights=(0.7, 0.3), reranker=LogProbReranker(...))

Fusions are a plain dict registry, FUSIONS, from name to `fn(rankings, weights) -> list[Hit]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from wakea_jax.retrieval.bm25 import BM25
from wakea_jax.retrieval.store import Hit


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], weights: Sequence[float],
                           *, k: int = 60) -> list[Hit]:
  """score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1 (Cormack, Clarke & Buettcher 2009,
  "Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning Methods")."""
  scores: dict[str, float] = {}
  texts: dict[str, str] = {}
  for ranking, weight in zip(rankings, weights, strict=True):
    for rank, hit in enumerate(ranking, 1):
      scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + weight / (k + rank)
      texts[hit.doc_id] = hit.text
  return _sorted(scores, texts)


def weighted_fusion(rankings: Sequence[Sequence[Hit]], weights: Sequence[float]) -> list[Hit]:
  """score(d) = sum_i w_i * minmax_i(score_i(d)): each list's scores scaled to [0, 1] (a list
  with one distinct score maps it to 1), a document absent from a list contributing 0."""
  scores: dict[str, float] = {}
  texts: dict[str, str] = {}
  for ranking, weight in zip(rankings, weights, strict=True):
    if not ranking:
      continue
    values = np.array([h.score for h in ranking], np.float64)
    low, span = values.min(), values.max() - values.min()
    for hit, value in zip(ranking, values):
      norm = (value - low) / span if span > 0 else 1.0
      scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + weight * norm
      texts[hit.doc_id] = hit.text
  return _sorted(scores, texts)


def _sorted(scores: dict[str, float], texts: dict[str, str]) -> list[Hit]:
  # Ties keep first-seen order (dicts are ordered; sorted is stable).
  order = sorted(scores, key=lambda d: -scores[d])
  return [Hit(d, scores[d], texts[d]) for d in order]


FUSIONS: dict[str, Callable[[Sequence[Sequence[Hit]], Sequence[float]], list[Hit]]] = {
    "rrf": reciprocal_rank_fusion,
    "weighted": weighted_fusion,
}


class Reranker(Protocol):
  """Rescores candidate hits for a query; returns them best first (scores replaced)."""

  def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
    """Returns `hits` reordered best first, each with its new score."""
    ...


RELEVANCE_PROMPT = ("Document: {document}\nQuestion: {query}\n"
                    "Does the document help answer the question? Answer:")


class LogProbReranker:
  """Scores each hit by a language model's log-probability of `answer` after a relevance
  prompt (the pointwise "yes" scoring of Nogueira et al. 2020, arXiv 2003.06713, with an LM in
  place of their fine-tuned T5).

  `logprob_fn(prompts, answer) -> float [len(prompts)]` is the model; `from_model` makes one
  from our decoder and tokenizer.
  """

  def __init__(self, logprob_fn: Callable[[Sequence[str], str], np.ndarray], *,
               answer: str = " yes", template: str = RELEVANCE_PROMPT,
               max_document_chars: int = 2000):
    self.logprob_fn, self.answer, self.template = logprob_fn, answer, template
    self.max_document_chars = max_document_chars

  def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
    """Hits sorted by the log-probability of `answer`, which replaces their scores.

    Documents are cut to `max_document_chars` in the prompt; ties keep the input order.
    """
    if not hits:
      return []
    prompts = [self.template.format(document=h.text[:self.max_document_chars], query=query)
               for h in hits]
    scores = np.asarray(self.logprob_fn(prompts, self.answer), np.float64)
    if scores.shape != (len(hits),):
      raise ValueError(f"logprob_fn returned shape {scores.shape}; expected ({len(hits)},)")
    order = np.argsort(-scores, kind="stable")
    return [Hit(hits[i].doc_id, float(scores[i]), hits[i].text) for i in order]

  @classmethod
  def from_model(cls, model: Any, tokenizer: Any, *, max_len: int = 512,
                 **kwargs: Any) -> LogProbReranker:
    """A reranker scoring with `model` (a wakea_jax decoder) and `tokenizer`; prompts are cut
    from the left to fit max_len tokens with the answer."""
    import jax.numpy as jnp
    from flax import nnx

    from wakea_jax.models.scoring import sequence_logps

    @nnx.jit
    def score(model, input_ids, targets, mask):
      return sequence_logps(model, input_ids, targets, mask)[0]

    def logprob_fn(prompts: Sequence[str], answer: str) -> np.ndarray:
      answer_ids = tokenizer.encode(answer)
      rows = []
      for prompt in prompts:
        ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
        ids = ids[-(max_len - len(answer_ids)):] + answer_ids
        rows.append(ids)
      # Pad to a power of two so a handful of shapes is compiled.
      width = 1 << max(3, (max(len(r) for r in rows) - 2).bit_length())
      input_ids = np.full((len(rows), width), tokenizer.pad_id or 0, np.int32)
      targets = np.zeros_like(input_ids)
      mask = np.zeros_like(input_ids)
      for i, ids in enumerate(rows):
        input_ids[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = ids[1:]
        mask[i, len(ids) - 1 - len(answer_ids):len(ids) - 1] = 1
      return np.asarray(score(model, jnp.asarray(input_ids), jnp.asarray(targets),
                              jnp.asarray(mask)))

    return cls(logprob_fn, **kwargs)


class HybridRetriever:
  """Dense and BM25 rankings of `candidates` hits each, fused by `fusion` with `weights`
  (dense, bm25), the top `candidates` then reranked if a reranker is given. A SearchBackend."""

  def __init__(self, index: Any, *, bm25: BM25 | None = None, fusion: str = "rrf",
               weights: tuple[float, float] = (1.0, 1.0), candidates: int = 50,
               reranker: Reranker | None = None):
    if fusion not in FUSIONS:
      raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
    if len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
      raise ValueError(f"weights must be two non-negative numbers (dense, bm25), not all zero; "
                       f"got {weights}")
    self.index, self.fusion, self.weights = index, fusion, tuple(weights)
    self.bm25 = bm25 if bm25 is not None else BM25(index.store)
    self.candidates, self.reranker = candidates, reranker

  def add(self, documents: Sequence[Any]) -> range:
    """Adds documents to the dense index and to BM25 (both share the store's rows)."""
    rows = self.index.add(documents)
    self.bm25.add(self.index.store[r] for r in rows)
    return rows

  def search(self, query: str, k: int = 10) -> list[Hit]:
    """The top `k` hits: max(k, candidates) per ranking, fused, then reranked if one is set."""
    n = max(k, self.candidates)
    fused = FUSIONS[self.fusion]([self.index.search(query, n), self.bm25.search(query, n)],
                                 self.weights)[:n]
    if self.reranker is not None:
      fused = self.reranker.rerank(query, fused)
    return fused[:k]
