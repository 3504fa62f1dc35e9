import json
import os

import numpy as np
import pytest

from wakea_jax.retrieval.index import (
  DenseIndex,
  EmbedderMismatchError,
  IndexConfig,
  IndexFormatError,
  exact_top_k,
  resolve_params,
)
from wakea_jax.retrieval.store import Document, DuplicateIdError, EmptyCorpusError

try:
  from wakea_jax.retrieval.embed import load_embedder
except ImportError:  # the embedder module is written separately
  load_embedder = None

# ScaNN even for a test-sized corpus. Every leaf is searched: the hash-32 vectors of this
# corpus collide so much that k-means leaves degenerate (zero-norm centroids), and a
# freshly upserted point was then missed by its own query in 2 of 10 runs before this
# (an approximate search is not what these tests check).
SCANN = IndexConfig(brute_force_below=0, num_leaves=20, leaves_to_search=20)


class FakeEmbedder:
  """Hashing of words into `dim` signed buckets (stands in if embed.py is missing)."""

  def __init__(self, dim=32, name=None):
    self.dim, self.name = dim, name or f"hash-{dim}"

  def embed(self, texts, *, batch_size=64):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text.lower().split():
        h = sum(ord(c) * 31 ** j for j, c in enumerate(word))
        out[i, h % self.dim] += 1.0 if (h >> 7) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def embedder(dim=32):
  return load_embedder(f"hash-{dim}") if load_embedder else FakeEmbedder(dim)


def corpus(n=400):
  return [Document(f"d{i}", f"topic{i % 23} word{i % 7} item{i}") for i in range(n)]


def test_resolve_params_by_size():
  assert resolve_params(50, 8)["backend"] == "brute_force"
  p = resolve_params(200_000, 384)
  assert p["backend"] == "scann" and p["num_leaves"] == 447
  assert p["leaves_to_search"] == 23 and p["dims_per_block"] == 2
  assert resolve_params(20_000, 385)["dims_per_block"] == 1
  with pytest.raises(EmptyCorpusError):
    resolve_params(0, 8)
  with pytest.raises(ValueError, match="leaves_to_search"):
    resolve_params(20_000, 8, IndexConfig(num_leaves=10, leaves_to_search=11))


def test_exact_top_k_sorted_and_padded():
  rng = np.random.default_rng(0)
  db, q = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((3, 8))
  rows, scores = exact_top_k(db, q.astype(np.float32), 5)
  full = q @ db.T
  np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :5])
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert exact_top_k(db[:3], q.astype(np.float32), 5)[0].shape == (3, 3)


@pytest.mark.parametrize("config", [IndexConfig(), SCANN], ids=["brute_force", "scann"])
def test_build_search_save_load_add(tmp_path, config):
  emb = embedder()
  index = DenseIndex.build(corpus(), emb, config)
  assert index.backend == ("scann" if config is SCANN else "brute_force")
  hits = index.search("topic3 word3 item3", k=3)
  assert hits[0].doc_id == "d3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
  assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
  rows, scores = index.search_vectors(emb.embed(["topic3 word3 item3"]), k=500)
  assert rows.shape == (1, 500) and rows[0, 0] == 3 and rows[0, -1] == -1  # padded past n

  path = index.save(tmp_path / "idx")
  index.save(tmp_path / "idx")  # replacing an index is fine, and leaves no temp dirs behind
  assert os.listdir(tmp_path) == ["idx"]
  loaded = DenseIndex.load(path, embedder=emb)
  assert [h.doc_id for h in loaded.search("topic3 word3 item3", 3)] == [h.doc_id for h in hits]

  rows = loaded.add([Document("zebra", "zebras graze on the savanna")])
  assert list(rows) == [400]
  assert loaded.search("zebras graze on the savanna", 1)[0].doc_id == "zebra"
  with pytest.raises(DuplicateIdError, match="'zebra'"):
    loaded.add([Document("new", "x"), Document("zebra", "y")])
  assert len(loaded) == 401 and "new" not in loaded.store  # all or nothing
  os.rename(path, tmp_path / "moved")  # relative asset paths: the directory can move
  loaded.save(tmp_path / "moved")
  assert DenseIndex.load(tmp_path / "moved", embedder=emb).search(
      "zebras graze on the savanna", 1)[0].doc_id == "zebra"


def test_brute_force_grows_into_scann():
  emb = embedder()
  index = DenseIndex.build(corpus(300), emb, IndexConfig(brute_force_below=350))
  assert index.backend == "brute_force"
  index.add(corpus(400)[300:])
  assert index.backend == "scann" and index.params["trained_size"] == 400
  assert index.search("topic5 word0 item350", 1)[0].doc_id == "d350"


def test_scann_rebuilds_after_growth():
  emb = embedder()
  index = DenseIndex.build(corpus(200), emb, IndexConfig(brute_force_below=0, rebuild_growth=1.5))
  index.add(corpus(320)[200:])
  assert index.params["trained_size"] == 320 and len(index.vectors()) == 320


def test_bad_input(tmp_path):
  emb = embedder()
  with pytest.raises(EmptyCorpusError, match="empty corpus"):
    DenseIndex.build([], emb)
  with pytest.raises(DuplicateIdError, match="duplicate document id 'a'"):
    DenseIndex.build([Document("a", "x"), Document("a", "y")], emb)
  path = DenseIndex.build(corpus(50), emb).save(tmp_path / "idx")
  with pytest.raises(EmbedderMismatchError, match="built with embedder 'hash-32'"):
    DenseIndex.load(path, embedder=FakeEmbedder(32, name="other"))
  with pytest.raises(EmbedderMismatchError, match="dimension 32"):
    DenseIndex.load(path, embedder=FakeEmbedder(16, name="hash-32"))
  with pytest.raises(FileExistsError, match="not an index"):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    DenseIndex.build(corpus(50), emb).save(tmp_path / "busy")
  with pytest.raises(FileNotFoundError):
    DenseIndex.load(tmp_path / "missing")


def _saved_scann(tmp_path):
  return DenseIndex.build(corpus(), embedder(), SCANN).save(tmp_path / "idx")


def test_truncated_or_corrupted_directory(tmp_path):
  path = _saved_scann(tmp_path)
  emb = embedder()
  docs = os.path.join(path, "documents.jsonl")
  data = open(docs, "rb").read()
  open(docs, "wb").write(data[:len(data) // 2])
  with pytest.raises(IndexFormatError, match=r"documents.jsonl: \d+ bytes, meta.json says"):
    DenseIndex.load(path, embedder=emb)
  open(docs, "wb").write(data.replace(b"topic3", b"topic4", 1))
  with pytest.raises(IndexFormatError, match="documents.jsonl: sha256 differs"):
    DenseIndex.load(path, embedder=emb)
  open(docs, "wb").write(data)
  asset = os.path.join(path, "scann", "dataset.npy")
  os.remove(asset)
  with pytest.raises(IndexFormatError, match="dataset.npy: listed in meta.json but missing"):
    DenseIndex.load(path, embedder=emb)
  meta = os.path.join(path, "meta.json")
  open(meta, "w").write('{"format": ')
  with pytest.raises(IndexFormatError, match="meta.json: not valid JSON"):
    DenseIndex.load(path, embedder=emb)
  os.remove(meta)
  with pytest.raises(IndexFormatError, match="meta.json: missing"):
    DenseIndex.load(path, embedder=emb)


def test_meta_records_build(tmp_path):
  path = _saved_scann(tmp_path)
  meta = json.load(open(os.path.join(path, "meta.json")))
  assert {k: meta["embedder"][k] for k in ("name", "dim")} == {"name": "hash-32", "dim": 32}
  assert meta["backend"] == "scann" and meta["num_documents"] == 400
  assert meta["params"]["num_leaves"] == 20 and "documents.jsonl" in meta["files"]


def test_brute_force_vectors_are_a_zarr_array_not_a_pickle(tmp_path):
  emb = embedder()
  index = DenseIndex.build(corpus(50), emb)
  directory = index.save(tmp_path / "idx")
  meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
  assert meta["version"] == 2
  zarr_files = [f for f in meta["files"] if f.startswith("embeddings.zarr/")]
  assert "embeddings.zarr/zarr.json" in zarr_files and len(zarr_files) >= 2  # header + chunk
  assert not any(f.endswith((".npy", ".pkl")) for f in meta["files"])
  loaded = DenseIndex.load(directory, embedder=emb)
  np.testing.assert_array_equal(loaded.vectors(), index.vectors())
  # A corrupted chunk is caught by its checksum before tensorstore reads it.
  chunk = next(p for p in tmp_path.joinpath("idx", "embeddings.zarr", "c").rglob("*")
               if p.is_file())
  chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
  with pytest.raises(IndexFormatError, match="sha256"):
    DenseIndex.load(directory, embedder=emb)


def test_version_1_directories_with_npy_vectors_still_load(tmp_path):
  emb = embedder()
  index = DenseIndex.build(corpus(30), emb)
  directory = tmp_path / "idx"
  index.save(directory)
  # Rewrite it as version 1 wrote it: the vectors as embeddings.npy.
  import shutil
  shutil.rmtree(directory / "embeddings.zarr")
  np.save(directory / "embeddings.npy", index.vectors())
  meta = json.loads((directory / "meta.json").read_text())
  meta["version"] = 1
  meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("embeddings.zarr")}
  data = (directory / "embeddings.npy").read_bytes()
  meta["files"]["embeddings.npy"] = {"bytes": len(data),
                                     "sha256": __import__("hashlib").sha256(data).hexdigest()}
  (directory / "meta.json").write_text(json.dumps(meta))
  np.testing.assert_array_equal(DenseIndex.load(directory, embedder=emb).vectors(),
                                index.vectors())
