"""The all-MiniLM-L6-v2 sentence embedder (or any BERT + mean pooling + Normalize) in JAX.

`MiniLMEmbedder` is sentence-transformers' pipeline (`modules.json`: Transformer -> mean
Pooling -> Normalize): HF `tokenizers` on the shipped tokenizer.json, truncation to
`max_seq_length` from sentence_bert_config.json, masked mean pooling over the token states,
L2 normalisation. Texts are sorted by length and padded to power-of-two buckets (length >=
16, batch >= 1), so the jitted forward compiles a handful of shapes.

Used functionally: the embedder splits the model once and jits a pure function of its state.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax import Array

from wakea_jax.checkpoints.bert import REQUIRED_FILES, load_bert, require_files
from wakea_jax.checkpoints.hf import PathLike
from wakea_jax.models.text_encoder import BertEncoder, mean_pool_normalize

MIN_BUCKET = 16



def bucket(n: int, minimum: int, maximum: int) -> int:
  """The smallest power of two >= n, clipped to [minimum, maximum]."""
  return min(maximum, max(minimum, 1 << max(0, n - 1).bit_length()))


class MiniLMEmbedder:
  """sentence-transformers all-MiniLM-L6-v2 (or any BERT + mean pooling + Normalize) in JAX.

  `embed(texts)` -> float32 [n, dim] numpy, L2-normalised rows, in input order.
  `compiled_shapes` records every (batch, length) the forward was traced for.
  """

  def __init__(self, encoder: BertEncoder, tokenizer: Any, *, max_seq_length: int,
               do_lower_case: bool = False, name: str = "bert",
               precision: str = "highest"):
    import tokenizers  # the HF `tokenizers` library, imported here so hash-only users skip it
    if not isinstance(tokenizer, tokenizers.Tokenizer):
      raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    self.name = name
    self.config = encoder.config
    self.dim = encoder.config.hidden_size
    self.max_seq_length = min(max_seq_length, encoder.config.max_position_embeddings)
    self.do_lower_case = do_lower_case
    self.compiled_shapes: set[tuple[int, int]] = set()
    # tokenizer.json ships with fixed padding to 128 and truncation at 128; sentence-
    # transformers overrides both with its max_seq_length, and so do we.
    self.tokenizer = tokenizer
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=self.max_seq_length)
    # An untruncated copy for `count_tokens` (chunking budgets must see the whole text).
    self._counter = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._counter.no_truncation()
    self._pad_id = encoder.config.pad_token_id
    graphdef, state = nnx.split(encoder)
    self._state = state

    def forward(state: nnx.State, input_ids: Array, attention_mask: Array) -> Array:
      self.compiled_shapes.add(tuple(input_ids.shape))  # runs at trace time only
      with jax.default_matmul_precision(precision):
        hidden = nnx.merge(graphdef, state)(input_ids, attention_mask)
        return mean_pool_normalize(hidden, attention_mask)

    self._forward = jax.jit(forward)

  @classmethod
  def from_dir(cls, path: PathLike, *, name: str | None = None,
               precision: str = "highest") -> MiniLMEmbedder:
    """A sentence-transformers model directory: config.json, model.safetensors,
    tokenizer.json, and optionally sentence_bert_config.json and 1_Pooling/config.json."""
    import tokenizers
    directory = pathlib.Path(path)
    if not directory.is_dir():
      raise FileNotFoundError(f"{directory}: no such model directory")
    require_files(directory, REQUIRED_FILES)
    max_seq_length, do_lower_case = 512, False
    sbert = directory / "sentence_bert_config.json"
    if sbert.is_file():
      raw = json.loads(sbert.read_text())
      max_seq_length = int(raw.get("max_seq_length", max_seq_length))
      do_lower_case = bool(raw.get("do_lower_case", False))
    pooling = directory / "1_Pooling" / "config.json"
    if pooling.is_file():
      raw = json.loads(pooling.read_text())
      if not raw.get("pooling_mode_mean_tokens", False) or any(
          raw.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                               "pooling_mode_mean_sqrt_len_tokens")):
        raise ValueError(f"{pooling}: only mean pooling ('pooling_mode_mean_tokens') is supported")
    encoder, _ = load_bert(directory)
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return cls(encoder, tokenizer, max_seq_length=max_seq_length, do_lower_case=do_lower_case,
               name=name or directory.name, precision=precision)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids with [CLS]/[SEP], truncated to max_seq_length (specials included)."""
    texts = [t.lower() if self.do_lower_case else t for t in texts]
    return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

  def count_tokens(self, text: str) -> int:
    """Word pieces in `text` without [CLS]/[SEP] or truncation (for chunking budgets: a chunk
    is embedded whole when count_tokens(chunk) <= max_seq_length - 2)."""
    text = text.lower() if self.do_lower_case else text
    return len(self._counter.encode(text, add_special_tokens=False).ids)

  def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings: float32 [len(texts), dim], in input order.

    Texts longer than max_seq_length tokens are truncated; batches are formed longest first and
    padded to power-of-two buckets so few shapes are compiled.
    """
    if isinstance(texts, str):
      raise TypeError("embed takes a sequence of strings, not one string")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    ids = self.tokenize(list(texts))
    # Longest first, like sentence-transformers: batches hold similar lengths (less padding).
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      length = bucket(max(len(ids[i]) for i in rows), MIN_BUCKET, self.max_seq_length)
      padded = np.full((bucket(len(rows), 1, batch_size), length), self._pad_id, np.int32)
      mask = np.zeros(padded.shape, np.int32)
      for r, i in enumerate(rows):
        padded[r, :len(ids[i])] = ids[i]
        mask[r, :len(ids[i])] = 1
      result = self._forward(self._state, padded, mask)
      out[rows] = np.asarray(result)[:len(rows)]
    return out

  def __repr__(self) -> str:
    return (f"MiniLMEmbedder(name={self.name!r}, dim={self.dim}, "
            f"max_seq_length={self.max_seq_length})")


__all__ = ["MIN_BUCKET", "MiniLMEmbedder", "bucket"]
