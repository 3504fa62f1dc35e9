"""BERT text encoder (arXiv 1810.04805) in Flax NNX, and the all-MiniLM-L6-v2 sentence embedder.

`BertEncoder` reproduces HF `BertModel`'s last hidden state: word + position + token-type
embeddings and a LayerNorm, then post-LN layers (self-attention -> add -> LayerNorm, then
dense -> exact erf GELU -> dense -> add -> LayerNorm). `load_bert(path)` reads `config.json` and
`model.safetensors` with numpy, without PyTorch; the HF name map is data (`TENSOR_RULES`).

`MiniLMEmbedder` is sentence-transformers' pipeline for all-MiniLM-L6-v2 (`modules.json`:
Transformer -> mean Pooling -> Normalize): HF `tokenizers` on the shipped tokenizer.json,
truncation to `max_seq_length` from sentence_bert_config.json, masked mean pooling over the
token states, L2 normalisation. Texts are sorted by length and padded to power-of-two buckets
(length >= 16, batch >= 1), so the jitted forward compiles a handful of shapes.

Used functionally: the embedder splits the model once and jits a pure function of its state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from safetensors import safe_open

from wakea_jax.checkpoints.hf import HOOKS
from wakea_jax.models.layers import dot_product_attention, matmul, param

PathLike = str | os.PathLike[str]

# Files a checkpoint directory must hold for `MiniLMEmbedder.from_dir`.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
MIN_BUCKET = 16

# HF `ACT2FN` names: "gelu" is the exact erf form BERT uses; the other two are the tanh form.
_GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of an HF BERT `config.json` the forward pass needs."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _GELU_APPROXIMATE:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported "
                       f"(one of {sorted(_GELU_APPROXIMATE)})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_json(cls, path: PathLike) -> "BertConfig":
    """Reads an HF BERT config.json; errors name the file and the offending field."""
    with open(path) as f:
      raw = json.load(f)
    if raw.get("model_type", "bert") != "bert":
      raise ValueError(f"{path}: field 'model_type' is {raw['model_type']!r}, expected 'bert'")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: field 'position_embedding_type' is "
                       f"{raw['position_embedding_type']!r}; only 'absolute' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(n for n in names if n not in raw and n != "pad_token_id")
    if missing:
      raise ValueError(f"{path}: field(s) {missing} missing")
    try:
      return cls(**{k: v for k, v in raw.items() if k in names})
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


class LayerNorm(nnx.Module):
  """LayerNorm with bias (arXiv 1607.06450), float32 statistics like torch."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.scale = param(None, (dim,), ("norm",), jnp.float32, value=1.0)
    self.bias = param(None, (dim,), ("norm",), jnp.float32, value=0.0)

  def __call__(self, x: Array) -> Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class BertLayer(nnx.Module):
  """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c, std, f32 = config, 0.02, jnp.float32
    e, n, h, m = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    self.num_heads = n
    self.approximate_gelu = _GELU_APPROXIMATE[c.hidden_act]
    self.q_proj = param(rngs, (e, n, h), ("embed", "heads", "head_dim"), f32, std=std)
    self.k_proj = param(rngs, (e, n, h), ("embed", "heads", "head_dim"), f32, std=std)
    self.v_proj = param(rngs, (e, n, h), ("embed", "heads", "head_dim"), f32, std=std)
    self.q_bias = param(None, (n, h), ("heads", "head_dim"), f32, value=0.0)
    self.k_bias = param(None, (n, h), ("heads", "head_dim"), f32, value=0.0)
    self.v_bias = param(None, (n, h), ("heads", "head_dim"), f32, value=0.0)
    self.o_proj = param(rngs, (n, h, e), ("heads", "head_dim", "embed"), f32, std=std)
    self.o_bias = param(None, (e,), ("embed",), f32, value=0.0)
    self.attn_norm = LayerNorm(e, c.layer_norm_eps)
    self.up_proj = param(rngs, (e, m), ("embed", "mlp"), f32, std=std)
    self.up_bias = param(None, (m,), ("mlp",), f32, value=0.0)
    self.down_proj = param(rngs, (m, e), ("mlp", "embed"), f32, std=std)
    self.down_bias = param(None, (e,), ("embed",), f32, value=0.0)
    self.mlp_norm = LayerNorm(e, c.layer_norm_eps)

  def __call__(self, x: Array, mask: Array) -> Array:
    """x [b, t, e], mask [b, t, t] (True = may attend) -> [b, t, e]."""
    q = matmul(x, self.q_proj[...], "bte,ehd->bthd") + self.q_bias[...]
    k = matmul(x, self.k_proj[...], "bte,ehd->bthd") + self.k_bias[...]
    v = matmul(x, self.v_proj[...], "bte,ehd->bthd") + self.v_bias[...]
    attn = dot_product_attention(q, k, v, mask, self.num_heads)
    attn = matmul(attn, self.o_proj[...], "bthd,hde->bte") + self.o_bias[...]
    x = self.attn_norm(x + attn)
    hidden = matmul(x, self.up_proj[...], "bte,em->btm") + self.up_bias[...]
    hidden = jax.nn.gelu(hidden, approximate=self.approximate_gelu)
    out = matmul(hidden, self.down_proj[...], "btm,me->bte") + self.down_bias[...]
    return self.mlp_norm(x + out)


class BertEncoder(nnx.Module):
  """HF `BertModel` without the pooler: `encoder(input_ids, attention_mask)` -> float32
  last hidden states [batch, seq, hidden]. `token_type_ids` default to 0 (single segment)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c, f32 = config, jnp.float32
    self.config = c
    self.word_embed = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), f32,
                            std=0.02)
    self.position_embed = param(rngs, (c.max_position_embeddings, c.hidden_size),
                                (None, "embed"), f32, std=0.02)
    self.type_embed = param(rngs, (c.type_vocab_size, c.hidden_size), (None, "embed"), f32,
                            std=0.02)
    self.embed_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
    self.layers = nnx.List([BertLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])

  def __call__(self, input_ids: Array, attention_mask: Array,
               token_type_ids: Array | None = None) -> Array:
    b, t = input_ids.shape
    if t > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = (jnp.take(self.word_embed[...], input_ids, axis=0)
         + self.position_embed[...][None, :t]
         + jnp.take(self.type_embed[...], types, axis=0))
    x = self.embed_norm(x)
    # Padding keys are masked for every query (HF's extended attention mask); padding
    # queries still attend to the real keys, and pooling drops them afterwards.
    mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
    for layer in self.layers:
      x = layer(x, mask)
    return x


def mean_pool_normalize(hidden: Array, attention_mask: Array) -> Array:
  """sentence-transformers `Pooling(mean)` then `Normalize`: [b, t, e], [b, t] -> [b, e].

  The clamps match theirs: token count >= 1e-9, norm >= 1e-12 (torch `F.normalize`).
  """
  m = attention_mask.astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------------
# HF checkpoint import: the name map ("{i}" = layer index) and hooks from checkpoints.hf.
# ------------------------------------------------------------------------------------------

_L = "encoder.layer.{i}."
TENSOR_RULES: tuple[tuple[str, str, str], ...] = (
    ("embeddings.word_embeddings.weight", "word_embed", "identity"),
    ("embeddings.position_embeddings.weight", "position_embed", "identity"),
    ("embeddings.token_type_embeddings.weight", "type_embed", "identity"),
    ("embeddings.LayerNorm.weight", "embed_norm.scale", "identity"),
    ("embeddings.LayerNorm.bias", "embed_norm.bias", "identity"),
    (_L + "attention.self.query.weight", "layers.{i}.q_proj", "split_heads"),
    (_L + "attention.self.key.weight", "layers.{i}.k_proj", "split_heads"),
    (_L + "attention.self.value.weight", "layers.{i}.v_proj", "split_heads"),
    (_L + "attention.self.query.bias", "layers.{i}.q_bias", "split_bias"),
    (_L + "attention.self.key.bias", "layers.{i}.k_bias", "split_bias"),
    (_L + "attention.self.value.bias", "layers.{i}.v_bias", "split_bias"),
    (_L + "attention.output.dense.weight", "layers.{i}.o_proj", "merge_heads"),
    (_L + "attention.output.dense.bias", "layers.{i}.o_bias", "identity"),
    (_L + "attention.output.LayerNorm.weight", "layers.{i}.attn_norm.scale", "identity"),
    (_L + "attention.output.LayerNorm.bias", "layers.{i}.attn_norm.bias", "identity"),
    (_L + "intermediate.dense.weight", "layers.{i}.up_proj", "linear_in_out"),
    (_L + "intermediate.dense.bias", "layers.{i}.up_bias", "identity"),
    (_L + "output.dense.weight", "layers.{i}.down_proj", "linear_in_out"),
    (_L + "output.dense.bias", "layers.{i}.down_bias", "identity"),
    (_L + "output.LayerNorm.weight", "layers.{i}.mlp_norm.scale", "identity"),
    (_L + "output.LayerNorm.bias", "layers.{i}.mlp_norm.bias", "identity"),
)
# Tensors we read but do not use: the position-id buffer and the [CLS] pooler head.
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.dense.weight",
            "pooler.dense.bias")


def _require(directory: pathlib.Path, names: Sequence[str]) -> None:
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} "
                            f"(a BERT checkpoint needs {', '.join(REQUIRED_FILES)})")


def load_bert(path: PathLike) -> tuple[BertEncoder, BertConfig]:
  """Loads `config.json` + `model.safetensors` from a directory (HF `BertModel` names, with or
  without a "bert." prefix) into a `BertEncoder`. No PyTorch; every tensor is checked."""
  directory = pathlib.Path(path)
  _require(directory, ("config.json", "model.safetensors"))
  config = BertConfig.from_json(directory / "config.json")
  abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  expected = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
  file = directory / "model.safetensors"
  values: dict[str, np.ndarray] = {}
  with safe_open(str(file), framework="numpy") as f:
    keys = set(f.keys())
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""
    for hf_pattern, ours_pattern, hook_name in TENSOR_RULES:
      layers = range(config.num_hidden_layers) if "{i}" in hf_pattern else (None,)
      for i in layers:
        hf_name = prefix + hf_pattern.format(i=i)
        ours = ours_pattern.format(i=i)
        if hf_name not in keys:
          raise ValueError(f"{file}: tensor {hf_name!r} is missing")
        shape = tuple(expected[ours][1].shape)
        hook = HOOKS[hook_name]
        array = f.get_tensor(hf_name)
        if tuple(array.shape) != hook.hf_shape(shape):
          raise ValueError(f"{file}: tensor {hf_name!r} has shape {tuple(array.shape)}, "
                           f"expected {hook.hf_shape(shape)} from {directory / 'config.json'}")
        values[ours] = np.ascontiguousarray(hook.to_ours(array, shape), dtype=np.float32)
        keys.discard(hf_name)
  unused = sorted(k for k in keys if k.removeprefix(prefix) not in _IGNORED)
  if unused:
    raise ValueError(f"{file}: unexpected tensors {unused[:5]}{' ...' if len(unused) > 5 else ''}")
  state = nnx.from_flat_state(
      [(p, v.replace(jnp.asarray(values[name]))) for name, (p, v) in expected.items()])
  return nnx.merge(graphdef, state), config


# ------------------------------------------------------------------------------------------
# The sentence embedder
# ------------------------------------------------------------------------------------------


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
               precision: str = "highest") -> "MiniLMEmbedder":
    """A sentence-transformers model directory: config.json, model.safetensors,
    tokenizer.json, and optionally sentence_bert_config.json and 1_Pooling/config.json."""
    import tokenizers
    directory = pathlib.Path(path)
    if not directory.is_dir():
      raise FileNotFoundError(f"{directory}: no such model directory")
    _require(directory, REQUIRED_FILES)
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



__all__ = ["BertConfig", "BertEncoder", "BertLayer", "LayerNorm", "MiniLMEmbedder", "TENSOR_RULES",
           "bucket", "load_bert", "mean_pool_normalize"]
