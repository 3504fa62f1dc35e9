"""BERT text encoder (arXiv 1810.04805) in Flax NNX.

`BertEncoder` reproduces HF `BertModel`'s last hidden state: word + position + token-type
embeddings and a LayerNorm, then post-LN layers (self-attention -> add -> LayerNorm, then
dense -> exact erf GELU -> dense -> add -> LayerNorm). `mean_pool_normalize` is
sentence-transformers' mean pooling + Normalize. Loading HF weights is
`checkpoints/bert.py`; the sentence embedder (tokenizer, buckets, jit) is
`retrieval/minilm.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.layers import dot_product_attention, matmul, param

PathLike = str | os.PathLike[str]

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
    """Width of one attention head: hidden_size // num_attention_heads."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_json(cls, path: PathLike) -> BertConfig:
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
    """Normalises x over its last axis, then applies scale and bias; same shape as x."""
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
    """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids [b, t] -> [b, t, e].

    Float32 last hidden states; t must not exceed `max_position_embeddings` (else ValueError).
    """
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


__all__ = ["BertConfig", "BertEncoder", "BertLayer", "LayerNorm", "mean_pool_normalize"]
