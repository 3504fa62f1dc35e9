"""Model configuration: one frozen dataclass and a table of named presets.

The config is the single source of truth for a decoder's shapes and numerics. It is hashable
(frozen), so it can be closed over by jitted functions and used as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Remat policies by name; resolved in layers.py. "none" keeps every activation (fastest, most
# memory), "full" recomputes the whole layer in the backward pass, "dots" keeps matmul outputs
# that have no batch dimension (jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
# "dots_saveable" keeps all matmul outputs. The attention core is one custom VJP
# (layers._softmax_attention), recomputed in the backward pass under every policy but "none".
REMAT_POLICIES = ("none", "full", "dots", "dots_saveable")

# Attention kernels by name; resolved per trace by models/fused_attention.choose_implementation.
# "native" is layers.dot_product_attention (the reference, fastest on CPU), "xla" and "cudnn"
# run jax.nn.dot_product_attention (cuDNN: fused flash attention, NVIDIA GPUs, bf16/fp16),
# "auto" is cuDNN where it can run and native elsewhere. Not a checkpoint property: HF
# import/export neither reads nor writes it.
ATTENTION_IMPLEMENTATIONS = ("auto", "native", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only language model.

  `head_dim` is independent of `embed_dim` (Qwen3 uses head_dim * num_heads != embed_dim).
  `param_dtype` is what weights are stored in (the master copy), `dtype` what matmuls run in.
  `scan_layers` stacks the decoder layers' parameters over a leading "layers" axis and runs
  them under one `lax.scan` (compile time independent of depth; see models/transformer.py).
  `attention` picks the attention kernel (see ATTENTION_IMPLEMENTATIONS); every choice gives
  the same numbers up to rounding.
  `smeared_keys` gives every attention head a learnt mix of each key with the previous
  position's key, k'_j = (1 - sigmoid(a)) k_j + sigmoid(a) k_{j-1} ("smeared keys", Olsson et
  al. 2022, arXiv 2209.11895, appendix): a one-layer induction (copy) circuit. From-scratch
  models only: no transformers architecture has it, so HF export refuses it, and it needs the
  native attention kernel.
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  value_head: bool = False
  init_std: float = 0.02
  scan_layers: bool = False
  attention: str = "auto"
  smeared_keys: bool = False

  def __post_init__(self) -> None:
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
            f"ModelConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ModelConfig.scan_layers must be true or false, got {self.scan_layers!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention!r}")
    if not isinstance(self.smeared_keys, bool):
      raise ValueError(
          f"ModelConfig.smeared_keys must be true or false, got {self.smeared_keys!r}")
    if self.smeared_keys and self.attention not in ("auto", "native"):
      raise ValueError(f"ModelConfig.smeared_keys needs the native attention kernel (it mixes "
                       f"each score with the previous key's), but attention="
                       f"{self.attention!r}; use 'auto' or 'native'")
    if isinstance(self.rope_scaling, dict):  # Accept plain dicts from ConfigDicts / JSON.
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  @property
  def compute_dtype(self) -> Any:
    """The jnp dtype matmuls and activations run in (from `dtype`)."""
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    """The jnp dtype weights are stored in (from `param_dtype`)."""
    return _DTYPES[self.param_dtype]

  @property
  def num_groups(self) -> int:
    """Query heads per KV head (grouped-query attention)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> ModelConfig:
    """A copy with `changes` applied, validated again."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The fields as plain Python values (`rope_scaling` as a dict or None), e.g. for JSON."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    """The inverse of `to_dict`; an unknown key raises ValueError naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s): {unknown}; known: {sorted(known)}")
    return cls(**values)

  def num_params(self, include_embedding: bool = True) -> int:
    """Analytic parameter count (matches the model's state)."""
    e, h, k, d, m = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    attn = e * h * d + 2 * e * k * d + h * d * e
    if self.qkv_bias:
      attn += h * d + 2 * k * d
    if self.qk_norm:
      attn += 2 * d
    layer = attn + 3 * e * m + 2 * e
    total = self.num_layers * layer + e  # + final norm
    if include_embedding:
      total += self.vocab_size * e * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      total += self.vocab_size * e
    if self.smeared_keys:
      total += self.num_layers * h
    if self.value_head:
      total += e + 1
    return total


PRESETS: dict[str, ModelConfig] = {
    # A few-hundred-kilobyte model for unit tests: every feature on, odd sizes to catch
    # transposition bugs (head_dim * num_heads != embed_dim).
    "tiny": ModelConfig(
        vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
        mlp_dim=96, rope_theta=10_000.0, norm_eps=1e-6, max_seq_len=256),
    # The benchmark model of the performance issues (~56M parameters).
    "bench56m": ModelConfig(
        vocab_size=32_000, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
        head_dim=64, mlp_dim=1408, rope_theta=10_000.0, norm_eps=1e-5, max_seq_len=2048),
    # Shapes of public checkpoints (weights are imported with checkpoints/hf.py).
    "llama3.2-1b": ModelConfig(
        vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, mlp_dim=8192, rope_theta=500_000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        norm_eps=1e-5, tie_embeddings=True, max_seq_len=131_072, dtype="bfloat16"),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151_936, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
        head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6, tie_embeddings=True,
        qkv_bias=True, max_seq_len=32_768, dtype="bfloat16"),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151_936, embed_dim=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, mlp_dim=3072, rope_theta=1_000_000.0, norm_eps=1e-6, tie_embeddings=True,
        qk_norm=True, max_seq_len=40_960, dtype="bfloat16"),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset with `overrides` applied (unknown names raise)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
