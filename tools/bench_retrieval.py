r"""Benchmark of the dense index: recall@10 of ScaNN against exact search, and queries/s of both.

  python tools/bench_retrieval.py                         # 200k x 384 clustered synthetic
  python tools/bench_retrieval.py --num_vectors=50000 --leaves_to_search=20,40
  python tools/bench_retrieval.py --embedder=all-MiniLM-L6-v2 --num_vectors=20000  # real text

Synthetic data mimics sentence embeddings: unit vectors around 1000 cluster centres with a
shared low-rank (64-dim) component and isotropic noise, so neighbours are neither trivially
separated nor uniformly random. Queries are fresh draws from the same distribution (not
database points). Brute force is a blocked float32 matmul + argpartition (BLAS on all cores);
ScaNN searches the same query batch with its thread pool. Both are timed on the same batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from machine import cpu_model

from wakea_jax.retrieval.index import DenseIndex, IndexConfig, exact_top_k
from wakea_jax.retrieval.store import Document, DocumentStore


@dataclasses.dataclass(frozen=True)
class _VectorsOnly:
  """Stands in for an embedder when the vectors are given."""
  name: str
  dim: int


def clustered(n: int, dim: int, rng: np.random.Generator, *, clusters: int = 10_000,
              latent: int = 64) -> np.ndarray:
  """Unit vectors: 500 topics -> 10k sub-topic centres -> points, plus a shared low-rank
  component, isotropic noise and a common offset (sentence embeddings are anisotropic)."""
  topics = rng.standard_normal((clusters // 20, dim)).astype(np.float32)
  centres = (topics[rng.integers(0, len(topics), clusters)]
             + 0.6 * rng.standard_normal((clusters, dim)).astype(np.float32))
  offset = 0.35 * rng.standard_normal(dim).astype(np.float32)
  basis = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, 50_000):
    m = min(50_000, n - start)
    x = centres[rng.integers(0, clusters, m)] + offset
    x += 0.5 * rng.standard_normal((m, latent)).astype(np.float32) @ basis
    x += 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
    out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def text_embeddings(name: str, n: int, num_queries: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, int]:
  from wakea_jax.retrieval.embed import load_embedder

  embedder = load_embedder(name)
  words = ("model data train loss layer token query index vector search cache shard batch "
           "gradient optimizer sample reward policy value tool code python jax tensor").split()
  texts = [" ".join(rng.choice(words, size=rng.integers(5, 20))) for _ in range(n + num_queries)]
  vectors = embedder.embed(texts, batch_size=256)
  return vectors[:n], vectors[n:], embedder.dim


def _qps(fn, queries: np.ndarray, repeats: int) -> float:
  fn(queries[:64])  # warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(queries)
    best = min(best, time.perf_counter() - start)
  return len(queries) / best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_vectors", type=int, default=200_000)
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--num_queries", type=int, default=2000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--embedder", default="", help="embed generated text with this embedder "
                      "instead of synthetic vectors")
  parser.add_argument("--leaves_to_search", default="",
                      help="comma-separated values to sweep (default: the index's own)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  if args.embedder:
    db, queries, dim = text_embeddings(args.embedder, args.num_vectors, args.num_queries, rng)
    source = f"embeddings of generated text by {args.embedder}"
  else:
    # One draw split in two: queries share the database's clusters but are not in it.
    both = clustered(args.num_vectors + args.num_queries, args.dim, rng)
    db, queries, dim = both[:args.num_vectors], both[args.num_vectors:], args.dim
    source = "clustered synthetic vectors"
  print(f"cpu: {cpu_model()}")
  print(f"data: {len(db)} x {dim} {source}, {len(queries)} queries "
        f"({time.perf_counter() - start:.1f}s)")

  truth, truth_scores = exact_top_k(db, queries, args.k)
  random_pairs = (queries[:200] @ db[:2000].T).mean()
  print(f"cosine: top-1 {truth_scores[:, 0].mean():.3f}, top-{args.k} "
        f"{truth_scores[:, -1].mean():.3f}, random pairs {random_pairs:.3f}")
  store = DocumentStore(Document(str(i), "") for i in range(len(db)))
  start = time.perf_counter()
  index = DenseIndex.from_vectors(store, db, _VectorsOnly("bench", dim), IndexConfig())
  build_s = time.perf_counter() - start
  print(f"build: {build_s:.1f}s, params {index.params}")

  tmp = tempfile.mkdtemp()
  try:
    index.save(os.path.join(tmp, "index"))
    size = int(subprocess.run(["du", "-sb", os.path.join(tmp, "index")], capture_output=True,
                              text=True, check=True).stdout.split()[0])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"index size on disk: {size / 2**20:.1f} MiB "
        f"(float32 vectors alone: {db.nbytes / 2**20:.1f} MiB)")

  brute_qps = _qps(lambda q: exact_top_k(db, q, args.k), queries, args.repeats)
  print(f"brute force: {brute_qps:,.0f} queries/s")
  sweep = ([int(v) for v in args.leaves_to_search.split(",")] if args.leaves_to_search
           else [index.params.get("leaves_to_search")])
  for leaves in sweep:
    rows, _ = index.search_vectors(queries, args.k, leaves_to_search=leaves)
    recall = np.mean([len(set(r) & set(t)) / args.k for r, t in zip(rows, truth)])
    qps = _qps(lambda q, leaves=leaves: index.search_vectors(q, args.k,
                                                             leaves_to_search=leaves), queries,
               args.repeats)
    print(f"scann leaves_to_search={leaves}: recall@{args.k} {recall:.4f}, {qps:,.0f} "
          f"queries/s, {qps / brute_qps:.1f}x brute force")

  # Adding documents: ScaNN upsert of 1% more vectors, against retraining from scratch.
  extra = db[:max(1, len(db) // 100)] * 0.5 + queries[:1] * 0.5
  extra /= np.linalg.norm(extra, axis=1, keepdims=True)
  docs = [Document(f"new{i}", "") for i in range(len(extra))]
  start = time.perf_counter()
  index.add_vectors(docs, extra)
  print(f"add {len(extra)} vectors by upsert: {time.perf_counter() - start:.2f}s "
        f"(a rebuild takes ~{build_s:.1f}s)")


if __name__ == "__main__":
  main()
