"""Index directories written by someone else: loading never runs their code and serves
nothing the save did not write."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from wakea_jax.retrieval.embed import HashEmbedder
from wakea_jax.retrieval.index import (
  DenseIndex,
  EmbedderMismatchError,
  IndexConfig,
  IndexFormatError,
)
from wakea_jax.retrieval.store import Document

SCANN = IndexConfig(brute_force_below=0, num_leaves=10, leaves_to_search=10)


class _Boom:
  """Unpickling this runs code: it writes the marker file named in its state."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _corpus(n=200):
  return [Document(f"d{i}", f"doc {i} about topic {i % 13} and {i % 7}") for i in range(n)]


def _relist(directory):
  """Rewrites meta.json's checksums for the directory as it now is (what an attacker who
  can write the directory can also do)."""
  meta_path = os.path.join(directory, "meta.json")
  meta = json.load(open(meta_path))
  table = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != "meta.json":
        data = open(path, "rb").read()
        table[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  meta["files"] = table
  json.dump(meta, open(meta_path, "w"))


@pytest.fixture()
def scann_dir(tmp_path):
  return DenseIndex.build(_corpus(), HashEmbedder(32), SCANN).save(tmp_path / "idx")


def test_a_saved_index_holds_no_pickle(scann_dir):
  files = [f for _, _, fs in os.walk(scann_dir) for f in fs]
  assert not [f for f in files if f.endswith(".pkl")], files


def test_a_planted_pickle_is_never_unpickled(scann_dir, tmp_path):
  marker = tmp_path / "pwned"
  with open(os.path.join(scann_dir, "scann", "scann_docids.pkl"), "wb") as f:
    pickle.dump(_Boom(str(marker)), f)
  _relist(scann_dir)   # checksums that match: integrity checks alone would not stop it
  index = DenseIndex.load(scann_dir, embedder=HashEmbedder(32))
  assert not marker.exists()
  assert index.search("doc 5 about topic 5", 1)[0].doc_id == "d5"
  # The control: ScaNN's own loader does run it (what the index loader used to call).
  import scann
  with pytest.raises(Exception):  # noqa: B017  (it runs the payload, then chokes on it)
    scann.scann_ops_pybind.load_searcher(os.path.join(scann_dir, "scann"),
                                         assets_backcompat_shim=False)
  assert marker.exists()


def test_an_unlisted_or_edited_file_is_refused(scann_dir):
  docs = os.path.join(scann_dir, "documents.jsonl")
  meta_path = os.path.join(scann_dir, "meta.json")
  meta = json.load(open(meta_path))
  del meta["files"]["documents.jsonl"]          # unlisted, then edited
  json.dump(meta, open(meta_path, "w"))
  with open(docs, "a") as f:
    f.write(json.dumps({"id": "evil", "text": "injected"}) + "\n")
  with pytest.raises(IndexFormatError, match="documents.jsonl: not listed in meta.json"):
    DenseIndex.load(scann_dir, embedder=HashEmbedder(32))


def test_an_extra_file_is_refused(scann_dir):
  open(os.path.join(scann_dir, "scann", "extra.npy"), "wb").write(b"x")
  with pytest.raises(IndexFormatError, match="extra.npy: not listed"):
    DenseIndex.load(scann_dir, embedder=HashEmbedder(32))


def test_asset_paths_cannot_leave_the_directory(scann_dir):
  assets = os.path.join(scann_dir, "scann", "scann_assets.pbtxt")
  text = open(assets).read().replace('"dataset.npy"', '"../../../../etc/passwd"')
  open(assets, "w").write(text)
  _relist(scann_dir)
  with pytest.raises(IndexFormatError, match="leaves the index directory"):
    DenseIndex.load(scann_dir, embedder=HashEmbedder(32))


class _OtherEncoder:
  """Same name and dimension as hash-32, other vectors: a different encoder."""

  name, dim = "hash-32", 32

  def embed(self, texts, batch_size=64):
    vectors = HashEmbedder(32).embed(texts)
    return np.roll(vectors, 1, axis=1)


@pytest.mark.parametrize("backend", [IndexConfig(), SCANN], ids=["brute_force", "scann"])
def test_an_encoder_that_does_not_reproduce_the_index_is_refused(tmp_path, backend):
  directory = DenseIndex.build(_corpus(), HashEmbedder(32), backend).save(tmp_path / "idx")
  with pytest.raises(EmbedderMismatchError, match="does not reproduce the probe vectors"):
    DenseIndex.load(directory, embedder=_OtherEncoder())


def test_a_wrong_encoder_name_in_meta_is_caught(tmp_path):
  """Built with one encoder, meta.json then names another of the same dimension: loading by
  the name in meta would search with the wrong encoder."""
  directory = DenseIndex.build(_corpus(), _OtherEncoder(), IndexConfig()).save(tmp_path / "i")
  with pytest.raises(EmbedderMismatchError, match="does not reproduce"):
    DenseIndex.load(directory)   # loads HashEmbedder(32) by the name "hash-32"
