"""Dense retrieval index: ScaNN (tree + asymmetric hashing + exact reordering) over embedder
vectors, exact brute force for tiny corpora, and a self-checking directory format.

  index = DenseIndex.build(documents, load_embedder("hash-64"))
  index.search("query", k=5)            # -> list[Hit], best first (a SearchBackend)
  index.add(more_documents)             # ScaNN upsert (no retraining); see `add`
  index.save("idx/")                    # atomic: written to a sibling temp dir, then renamed
  DenseIndex.load("idx/", embedder=...) # checks embedder name/dim and every file's checksum

Directory layout (all files listed with size and sha256 in meta.json, written last):

  meta.json          format, version, embedder {name, dim}, backend, build params, counts
  documents.jsonl    the DocumentStore (row i = vector i)
  embeddings.zarr/   float32 [n, dim]    (brute-force backend only; zarr via tensorstore,
                                          see retrieval/vectors.py)
  scann/             ScaNN assets        (scann backend only; serialized with relative paths)

ScaNN reference: Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic Vector
Quantization" (arXiv 1908.10396); the score-aware loss threshold is its eta (section 3.2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from wakea_jax.retrieval import vectors as vectors_lib
from wakea_jax.retrieval.store import Document, DocumentStore, EmptyCorpusError, Hit

FORMAT = "wakea_jax.retrieval.index"
VERSION = 2
# Versions this code reads: 1 kept the brute-force vectors in embeddings.npy.
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
DOCUMENTS_FILE = "documents.jsonl"
EMBEDDINGS_DIR = "embeddings.zarr"
EMBEDDINGS_NPY = "embeddings.npy"   # version 1
SCANN_DIR = "scann"
_SCANN_DOCIDS = "scann_docids.pkl"
_ASSET_PATH = re.compile(r'asset_path:\s*"([^"]*)"')
# Texts embedded at save and again at load: the index's fingerprint of its encoder.
PROBE_TEXTS = ("retrieval probe: the quick brown fox jumps over the lazy dog",
               "def add(a, b):\n    return a + b",
               "Photosynthesis converts light energy into chemical energy in plants.")
BACKENDS = ("brute_force", "scann")


class IndexFormatError(ValueError):
  """An index directory is missing, truncated, corrupted or of an unknown format."""


class EmbedderMismatchError(ValueError):
  """The index was built with a different embedder (name or dimension) than the one asked for."""


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """Build parameters; None means "chosen from the corpus size" (see `resolve_params`)."""

  # Corpora smaller than this are searched exactly (a [q, n] matmul is cheap and exact).
  brute_force_below: int = 10_000
  num_leaves: int | None = None          # k-means tree partitions; default ~sqrt(n)
  leaves_to_search: int | None = None    # partitions scored per query; default ~5% (min 8)
  reorder: int | None = None             # AH candidates rescored exactly; default 250
  training_sample_size: int | None = None  # default min(n, 100_000)
  dims_per_block: int = 2                # AH: dimensions per 16-centre codebook
  anisotropic_quantization_threshold: float = 0.2  # eta of arXiv 1908.10396
  num_neighbors: int = 10                # the searcher's default k
  training_threads: int = 0              # 0: all cores
  # `add` retrains (rebuilds) once the corpus outgrows the trained partitioning by this factor.
  rebuild_growth: float = 2.0


def resolve_params(num_documents: int, dim: int, config: IndexConfig = IndexConfig()
                   ) -> dict[str, Any]:
  """The concrete build parameters for a corpus of `num_documents` vectors of size `dim`."""
  if num_documents < 1:
    raise EmptyCorpusError("cannot build an index over an empty corpus")
  if num_documents < config.brute_force_below:
    return {"backend": "brute_force", "num_neighbors": config.num_neighbors}
  # ~sqrt(n) leaves balances the cost of scoring centroids against scoring leaf members.
  num_leaves = config.num_leaves or max(2, int(round(math.sqrt(num_documents))))
  num_leaves = min(num_leaves, num_documents)
  leaves_to_search = config.leaves_to_search or min(num_leaves,
                                                    max(8, math.ceil(0.05 * num_leaves)))
  if not 1 <= leaves_to_search <= num_leaves:
    raise ValueError(f"IndexConfig.leaves_to_search={leaves_to_search} must be in "
                     f"[1, num_leaves={num_leaves}]")
  return {
      "backend": "scann", "num_leaves": num_leaves, "leaves_to_search": leaves_to_search,
      "reorder": max(config.reorder or 250, config.num_neighbors),
      "training_sample_size": min(num_documents, config.training_sample_size or 100_000),
      "dims_per_block": config.dims_per_block if dim % config.dims_per_block == 0 else 1,
      "anisotropic_quantization_threshold": config.anisotropic_quantization_threshold,
      "num_neighbors": config.num_neighbors, "trained_size": num_documents,
  }


def _build_scann(vectors: np.ndarray, params: dict[str, Any], training_threads: int = 0):
  import scann  # heavy import, only for indexes that need it

  builder = (scann.scann_ops_pybind.builder(vectors, params["num_neighbors"], "dot_product")
             .tree(num_leaves=params["num_leaves"],
                   num_leaves_to_search=params["leaves_to_search"],
                   training_sample_size=params["training_sample_size"])
             .score_ah(params["dims_per_block"],
                       anisotropic_quantization_threshold=params[
                           "anisotropic_quantization_threshold"])
             .reorder(params["reorder"]))
  if training_threads:
    builder.set_n_training_threads(training_threads)
  # String docids (the row numbers) are what ScaNN needs to accept upserts later.
  return builder.build(docids=[str(i) for i in range(len(vectors))])


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _file_table(directory: str, *, hashes: bool = True) -> dict[str, dict[str, Any]]:
  """Every file below `directory` but meta.json: {relative path: {bytes, sha256}}."""
  table = {}
  for root, dirs, files in os.walk(directory):
    for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory).replace(os.sep, "/")
      if rel != META_FILE:
        table[rel] = ({"bytes": os.path.getsize(path), "sha256": _sha256(path)} if hashes
                      else {})
  return dict(sorted(table.items()))


def is_index_dir(path: str | os.PathLike[str]) -> bool:
  """Whether `path` looks like a saved index (a directory with our meta.json)."""
  meta = os.path.join(os.fspath(path), META_FILE)
  try:
    with open(meta, encoding="utf-8") as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def read_meta(directory: str, *, verify: bool = True) -> dict[str, Any]:
  """meta.json of an index directory; with `verify`, every listed file is checked for presence,
  size (truncation) and sha256 (corruption). Raises IndexFormatError naming the file."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: index directory does not exist")
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path):
    raise IndexFormatError(f"{meta_path}: missing; {directory} is not a saved index (or its "
                           "save did not finish)")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise IndexFormatError(f"{meta_path}: not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise IndexFormatError(f"{meta_path}: field 'format' is not {FORMAT!r}")
  if meta.get("version") not in READABLE_VERSIONS:
    raise IndexFormatError(f"{meta_path}: field 'version' is {meta.get('version')!r}; this "
                           f"code reads versions {READABLE_VERSIONS}")
  for field in ("embedder", "backend", "params", "num_documents", "files"):
    if field not in meta:
      raise IndexFormatError(f"{meta_path}: field {field!r} is missing")
  if meta["backend"] not in BACKENDS:
    raise IndexFormatError(f"{meta_path}: field 'backend' is {meta['backend']!r}, not one of "
                           f"{BACKENDS}")
  if verify:
    present = set(_file_table(directory, hashes=False))
    for rel in sorted(present - set(meta["files"])):
      raise IndexFormatError(f"{os.path.join(directory, rel)}: not listed in meta.json (an "
                             "index directory holds only the files its save wrote)")
    for rel, expected in meta["files"].items():
      path = os.path.join(directory, rel)
      if not os.path.isfile(path):
        raise IndexFormatError(f"{path}: listed in meta.json but missing")
      size = os.path.getsize(path)
      if size != expected["bytes"]:
        raise IndexFormatError(f"{path}: {size} bytes, meta.json says {expected['bytes']} "
                               "(truncated or modified)")
      if _sha256(path) != expected["sha256"]:
        raise IndexFormatError(f"{path}: sha256 differs from meta.json (corrupted or modified)")
  return meta


class DenseIndex:
  """Documents, their embeddings and a nearest-neighbour searcher (maximum inner product on
  L2-normalised vectors, i.e. cosine similarity). A `SearchBackend` for the retrieval tool."""

  def __init__(self, store: DocumentStore, embedder: Any, params: dict[str, Any], *,
               config: IndexConfig = IndexConfig(), vectors: np.ndarray | None = None,
               searcher: Any = None):
    self.store, self.embedder, self.params, self.config = store, embedder, params, config
    self._vectors = vectors    # brute force: float32 [n, dim]
    self._searcher = searcher  # scann: ScannSearcher

  # ----------------------------------------------------------------------------- building

  @classmethod
  def build(cls, documents: Iterable[Document], embedder: Any,
            config: IndexConfig = IndexConfig(), *, batch_size: int = 64) -> DenseIndex:
    """Embeds `documents` and builds the searcher the corpus size calls for."""
    store = DocumentStore(documents)
    if not len(store):
      raise EmptyCorpusError("cannot build an index over an empty corpus (no documents)")
    vectors = _embed(embedder, store.texts, batch_size)
    return cls.from_vectors(store, vectors, embedder, config)

  @classmethod
  def from_vectors(cls, store: DocumentStore, vectors: np.ndarray, embedder: Any,
                   config: IndexConfig = IndexConfig()) -> DenseIndex:
    """An index over precomputed vectors (float32 [len(store), embedder.dim])."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(store), embedder.dim):
      raise ValueError(f"vectors have shape {vectors.shape}; expected "
                       f"({len(store)}, {embedder.dim}) for {len(store)} documents")
    params = resolve_params(len(store), embedder.dim, config)
    if params["backend"] == "brute_force":
      return cls(store, embedder, params, config=config, vectors=vectors)
    return cls(store, embedder, params, config=config,
               searcher=_build_scann(vectors, params, config.training_threads))

  @property
  def backend(self) -> str:
    """The searcher in use: "brute_force" (exact) or "scann"; may change on `rebuild`."""
    return self.params["backend"]

  @property
  def dim(self) -> int:
    """The embedding dimension (the embedder's)."""
    return self.embedder.dim

  def __len__(self) -> int:
    return len(self.store)

  def vectors(self) -> np.ndarray:
    """float32 [n, dim] of every document (from ScaNN's reorder dataset for a ScaNN index)."""
    if self._vectors is not None:
      return self._vectors
    with tempfile.TemporaryDirectory() as tmp:
      self._searcher.serialize(tmp, relative_path=True)
      return np.load(os.path.join(tmp, "dataset.npy"))

  def add(self, documents: Iterable[Document], *, batch_size: int = 64) -> range:
    """Embeds and appends documents; returns their rows. Ids must be new (all or none added).

    ScaNN indexes take the new vectors by `upsert`: they are quantized with the trained
    codebooks and assigned to their nearest existing leaf, milliseconds per thousand vectors
    and no retraining. Once the corpus has grown `config.rebuild_growth` times past the size
    the partitioning was trained on, the index is rebuilt (retrained) from all vectors. A
    brute-force index that grows past `brute_force_below` becomes a ScaNN index the same way.
    """
    documents = list(documents)
    if not documents:
      return range(len(self.store), len(self.store))
    DocumentStore(self.store).extend(documents)  # checks ids before anything is embedded
    return self.add_vectors(documents, _embed(self.embedder, [d.text for d in documents],
                                              batch_size))

  def add_vectors(self, documents: Sequence[Document], vectors: np.ndarray) -> range:
    """`add` with precomputed vectors (float32 [len(documents), dim])."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(documents), self.dim):
      raise ValueError(f"vectors have shape {vectors.shape}; expected "
                       f"({len(documents)}, {self.dim})")
    rows = self.store.extend(documents)
    n = len(self.store)
    if self.backend == "brute_force":
      self._vectors = np.concatenate([self._vectors, vectors])
      if n >= self.config.brute_force_below:
        self.rebuild()
      return rows
    self._searcher.upsert([str(r) for r in rows], vectors, batch_size=max(1, min(len(rows), 1024)))
    if n > self.config.rebuild_growth * self.params["trained_size"]:
      self.rebuild()
    return rows

  def rebuild(self) -> None:
    """Re-chooses the parameters for the current size and retrains from the stored vectors."""
    rebuilt = DenseIndex.from_vectors(self.store, self.vectors(), self.embedder, self.config)
    self.params, self._vectors, self._searcher = (rebuilt.params, rebuilt._vectors,
                                                  rebuilt._searcher)

  # ----------------------------------------------------------------------------- searching

  def search_vectors(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
                     reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """queries float32 [q, dim] -> (rows int64 [q, k], scores float32 [q, k]), best first;
    rows beyond the corpus size are -1 with score -inf."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries have shape {queries.shape}; expected [q, {self.dim}]")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    rows = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    if not len(queries):
      return rows, scores
    if self.backend == "brute_force":
      top, top_scores = exact_top_k(self._vectors, queries, k)
      rows[:, :top.shape[1]], scores[:, :top.shape[1]] = top, top_scores
      return rows, scores
    pre = max(k, reorder or self.params["reorder"])
    # Many queries: ScaNN splits them over its thread pool; few: one thread, less overhead.
    search = (self._searcher.search_batched_parallel if len(queries) >= 256
              else self._searcher.search_batched)
    ids, dists = search(queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
                        leaves_to_search=leaves_to_search or self.params["leaves_to_search"])
    for i, (row_ids, row_scores) in enumerate(zip(ids, dists)):
      # ScaNN pads past the candidates it found with id "0" and a NaN score.
      row_scores = np.asarray(row_scores[:k], np.float32)
      m = int(np.count_nonzero(~np.isnan(row_scores)))
      rows[i, :m] = np.asarray(row_ids[:m], dtype=np.int64)
      scores[i, :m] = row_scores[:m]
    return rows, scores

  def search_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
    """Up to `k` hits per query, best first (fewer only when the corpus is smaller)."""
    rows, scores = self.search_vectors(_embed(self.embedder, list(queries), 64), k)
    return [self.store.hits(r[r >= 0], s[r >= 0]) for r, s in zip(rows, scores)]

  def search(self, query: str, k: int = 10) -> list[Hit]:
    """The best `k` hits for one query, best first."""
    return self.search_batch([query], k)[0]

  # ----------------------------------------------------------------------------- saving

  def save(self, directory: str | os.PathLike[str]) -> str:
    """Writes the index to `directory` atomically (a sibling temp dir renamed into place; an
    existing index there is replaced). Refuses a non-empty directory that is no index."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
      if not os.path.isdir(directory):
        raise FileExistsError(f"{directory}: exists and is not a directory")
      if os.listdir(directory) and not os.path.isfile(os.path.join(directory, META_FILE)):
        raise FileExistsError(f"{directory}: a non-empty directory that is not an index; "
                              "refusing to replace it")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
      os.chmod(tmp, 0o755)
      self.store.save(os.path.join(tmp, DOCUMENTS_FILE))
      if self.backend == "brute_force":
        vectors_lib.write_matrix(os.path.join(tmp, EMBEDDINGS_DIR), self._vectors)
      else:
        scann_dir = os.path.join(tmp, SCANN_DIR)
        os.makedirs(scann_dir)
        self._searcher.serialize(scann_dir, relative_path=True)
        # ScaNN pickles the document ids beside its assets, and its loader unpickles them:
        # our ids are the row numbers, rebuilt on load, so the pickle is never written.
        os.remove(os.path.join(scann_dir, _SCANN_DOCIDS))
      meta = {
          "format": FORMAT, "version": VERSION,
          "embedder": {"name": self.embedder.name, "dim": int(self.embedder.dim),
                       "probe": _probe(self.embedder).round(6).tolist()},
          "backend": self.backend, "params": self.params,
          "config": dataclasses.asdict(self.config),
          "num_documents": len(self.store), "files": _file_table(tmp),
      }
      with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
      if os.path.exists(directory):
        old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
        os.rename(directory, os.path.join(old, base))
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.rename(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return directory

  @classmethod
  def load(cls, directory: str | os.PathLike[str], *, embedder: Any = None,
           embedder_name: str | None = None, dim: int | None = None,
           embedder_path: str | None = None) -> DenseIndex:
    """Loads and verifies a saved index. `embedder` (or `embedder_name`/`dim`) states what the
    caller expects; a difference raises EmbedderMismatchError. Without `embedder`, the one
    named in meta.json is loaded (from `embedder_path` if given) to embed queries."""
    directory = os.fspath(directory)
    meta = read_meta(directory)
    meta_path = os.path.join(directory, META_FILE)
    built = meta["embedder"]
    want_name = embedder.name if embedder is not None else embedder_name
    want_dim = embedder.dim if embedder is not None else dim
    if want_name is not None and want_name != built.get("name"):
      raise EmbedderMismatchError(
          f"{meta_path}: index was built with embedder {built.get('name')!r} (dim "
          f"{built.get('dim')}), but {want_name!r} (dim {want_dim}) was asked for; rebuild the "
          "index with that embedder or load it with the one it was built with")
    if want_dim is not None and want_dim != built.get("dim"):
      raise EmbedderMismatchError(
          f"{meta_path}: index vectors have dimension {built.get('dim')}, but the embedder "
          f"{want_name!r} asked for has dimension {want_dim}")
    if embedder is None:
      from wakea_jax.retrieval import embed  # the encoder only when one is needed
      embedder = embed.load_embedder(built["name"], path=embedder_path)
      if embedder.dim != built["dim"]:
        raise EmbedderMismatchError(f"{meta_path}: embedder {built['name']!r} now has dimension "
                                    f"{embedder.dim}, the index {built['dim']}")
    _check_probe(embedder, built, meta_path)
    store = DocumentStore.load(os.path.join(directory, DOCUMENTS_FILE))
    n = meta["num_documents"]
    if len(store) != n:
      raise IndexFormatError(f"{directory}/{DOCUMENTS_FILE}: {len(store)} documents, meta.json "
                             f"says {n}")
    config = IndexConfig(**meta.get("config", {}))
    if meta["backend"] == "brute_force":
      vectors = _read_vectors(directory, meta["version"], (n, built["dim"]))
      return cls(store, embedder, meta["params"], config=config, vectors=vectors)
    searcher = _load_scann(os.path.join(directory, SCANN_DIR), n)
    return cls(store, embedder, meta["params"], config=config, searcher=searcher)


def _probe(embedder: Any) -> np.ndarray:
  """The embedder's vectors for PROBE_TEXTS: a fingerprint of the encoder an index needs."""
  return np.asarray(embedder.embed(list(PROBE_TEXTS)), np.float32)


def _check_probe(embedder: Any, built: dict[str, Any], meta_path: str) -> None:
  """Refuses an embedder that does not reproduce the index's probe vectors (a wrong name in
  meta.json, other weights under the same name): its queries would search garbage."""
  if "probe" not in built:   # indexes written before the probe existed
    logging.warning("%s: no embedder probe; cannot check that %r is the encoder this index "
                    "was built with", meta_path, built.get("name"))
    return
  want = np.asarray(built["probe"], np.float32)
  got = _probe(embedder)
  if want.shape != got.shape or not np.all(np.sum(want * got, axis=-1) >= 0.999):
    raise EmbedderMismatchError(
        f"{meta_path}: embedder {embedder.name!r} does not reproduce the probe vectors this "
        f"index was built with (meta.json names {built.get('name')!r}); load it with the "
        "encoder that built it, or rebuild the index")


def _load_scann(scann_dir: str, n: int) -> Any:
  """ScaNN's searcher from its assets, without its loader: that one unpickles
  scann_docids.pkl. Asset paths must stay inside the directory."""
  from scann.scann_ops.py import scann_ops_pybind as scann_ops

  assets_path = os.path.join(scann_dir, "scann_assets.pbtxt")
  try:
    with open(assets_path, encoding="utf-8") as f:
      assets = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise IndexFormatError(f"{assets_path}: unreadable ({e})") from None
  for path in _ASSET_PATH.findall(assets):
    if os.path.isabs(path) or ".." in path.split("/") or "\\" in path:
      raise IndexFormatError(f"{assets_path}: asset path {path!r} leaves the index directory")
  try:
    searcher = scann_ops.ScannSearcher(scann_ops.scann_pybind.ScannNumpy(scann_dir, assets),
                                       docids=[str(i) for i in range(n)])
  except Exception as e:  # ScaNN raises RuntimeError/ValueError from C++ with varied text
    raise IndexFormatError(f"{scann_dir}: ScaNN could not load its assets ({e})") from None
  if searcher.size() != n:
    raise IndexFormatError(f"{scann_dir}: ScaNN holds {searcher.size()} vectors, meta.json "
                           f"says {n} documents")
  return searcher


def _read_vectors(directory: str, version: int, shape: tuple[int, int]) -> np.ndarray:
  """The brute-force backend's float32 vectors (zarr since version 2, .npy before)."""
  if version >= 2:
    try:
      return vectors_lib.read_matrix(os.path.join(directory, EMBEDDINGS_DIR), shape=shape,
                                     dtype="float32")
    except ValueError as e:
      raise IndexFormatError(str(e)) from None
  path = os.path.join(directory, EMBEDDINGS_NPY)
  try:
    vectors = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise IndexFormatError(f"{path}: unreadable ({e})") from None
  if vectors.shape != shape or vectors.dtype != np.float32:
    raise IndexFormatError(f"{path}: {vectors.dtype} {vectors.shape}, expected float32 {shape}")
  return vectors


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, *, block: int = 1024
                ) -> tuple[np.ndarray, np.ndarray]:
  """Exact maximum inner product: (rows int64 [q, min(k, n)], scores float32), best first.
  Queries go in blocks so the [block, n] score matrix stays small."""
  k = min(k, len(vectors))
  rows = np.empty((len(queries), k), np.int64)
  scores = np.empty((len(queries), k), np.float32)
  for start in range(0, len(queries), block):
    sims = queries[start:start + block] @ vectors.T
    top = (np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1]
           else np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy())
    top_scores = np.take_along_axis(sims, top, axis=1)
    # Sort by score, ties by row, so exact results are deterministic.
    order = np.lexsort((top, -top_scores), axis=1)
    rows[start:start + block] = np.take_along_axis(top, order, axis=1)
    scores[start:start + block] = np.take_along_axis(top_scores, order, axis=1)
  return rows, scores


def _embed(embedder: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
  vectors = np.asarray(embedder.embed(texts, batch_size=batch_size), dtype=np.float32)
  if vectors.shape != (len(texts), embedder.dim):
    raise ValueError(f"embedder {embedder.name!r} returned shape {vectors.shape} for "
                     f"{len(texts)} texts; expected ({len(texts)}, {embedder.dim})")
  return vectors
