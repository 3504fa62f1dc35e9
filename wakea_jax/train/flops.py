"""Analytic FLOP counts for throughput, TFLOP/s and MFU reporting.

Per token, a forward pass costs 2 FLOPs per weight of every matmul (attention projections,
MLP, LM head; the embedding lookup is a gather, not a matmul) plus attention itself:
QK^T and PV are each 2 * seq_len * head_dim FLOPs per head per layer. We count the full
(non-causal) attention matrix, as the model computes it, the convention of PaLM
(arXiv 2204.02311, appendix B). Training is forward + backward = 3x forward.
"""

from __future__ import annotations

from wakea_jax.models.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
  """Number of weights used in matmuls per token: attention, MLP and the LM head, not embeddings."""
  c = config
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.embed_dim * c.mlp_dim
  return c.num_layers * (attn + mlp) + c.embed_dim * c.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token at `seq_len`: 2 per matmul weight plus full attention."""
  c = config
  attention = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * seq_len
  return 2.0 * matmul_params(config) + attention


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token: 3x forward."""
  return 3.0 * forward_flops_per_token(config, seq_len)


def lora_train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """With frozen base weights no weight gradients are computed: ~2x forward."""
  return 2.0 * forward_flops_per_token(config, seq_len)
