"""decode_layout.pack_for_decode: the packed model is the same function as the stored one
(every preset shape: biases, QK-norm, GQA, non-square heads), LoRA / QLoRA / scanned layers
keep their own path, and packing is idempotent."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax.models import decode_layout, lora, transformer
from wakea_jax.models.config import get_preset
from wakea_jax.models.layers import MLP, Attention

TINY = get_preset("tiny")   # num_heads * head_dim (96) != embed_dim (64), GQA

_apply = jax.jit(transformer.apply, static_argnums=0)


def _logits(model, ids):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, ids))


def _ids(batch=2, length=9, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 256, (batch, length)), jnp.int32)


def _model(config, seed=3):
  model = transformer.create_model(config)
  randomise(model, seed=seed)
  return model


@pytest.mark.parametrize("layout", ["packed", "fused"])
@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True}, {"qk_norm": True},
                                   {"qkv_bias": True, "qk_norm": True, "num_kv_heads": 4}])
def test_packed_model_computes_the_same_logits(extra, layout):
  config = dataclasses.replace(TINY, **extra)
  model = _model(config)
  ids = _ids()
  stored = _logits(model, ids)
  packed = nnx.clone(model)
  layers = config.num_layers
  out_major = layout == "packed"
  # q k v (fused), gate and up (fused); packed: o and down output-major too
  want = (7 if out_major else 5) * layers
  assert decode_layout.pack_for_decode(packed, **decode_layout.PACK_ARGS[layout]) == want
  c = config
  for _, module in nnx.iter_modules(packed):
    if isinstance(module, Attention):
      assert module.q_proj is None and module.k_proj is None and module.v_proj is None
      qkv = module.qkv_proj
      assert isinstance(qkv, decode_layout.OutMajor if out_major else nnx.Param)
      heads = c.num_heads + 2 * c.num_kv_heads
      shape = ((heads, c.head_dim, c.embed_dim) if out_major
               else (c.embed_dim, heads, c.head_dim))
      assert (qkv.kernel if out_major else qkv)[...].shape == shape
      assert isinstance(module.o_proj, decode_layout.OutMajor if out_major else nnx.Param)
    if isinstance(module, MLP):
      assert module.gate_proj is None and module.up_proj is None
      assert module.gate_up[...].shape == (config.embed_dim, 2 * config.mlp_dim)
      assert isinstance(module.down_proj, decode_layout.OutMajor if out_major else nnx.Param)
  np.testing.assert_allclose(_logits(packed, ids), stored, atol=2e-5, rtol=1e-5)
  assert np.abs(stored).max() > 1.0   # not a degenerate model whose logits are all ~0
  # The source model is untouched, and packing twice rewrites nothing more.
  assert isinstance(model.layers[0].attn.q_proj, nnx.Param)
  assert decode_layout.pack_for_decode(packed, **decode_layout.PACK_ARGS[layout]) == 0
  np.testing.assert_allclose(_logits(packed, ids), stored, atol=2e-5, rtol=1e-5)


def test_out_major_transposes_output_dims_first_and_checks_inputs():
  stored = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)   # o_proj-like [h, d, e]
  weight = decode_layout.OutMajor(stored, contracted=2)
  assert weight.kernel[...].shape == (4, 2, 3)
  x = jnp.ones((5, 1, 2, 3))
  np.testing.assert_allclose(weight(x, "bthd,hde->bte", jnp.float32),
                             jnp.einsum("bthd,hde->bte", x, stored))
  with pytest.raises(ValueError, match="input dims"):
    weight(jnp.ones((5, 1, 3, 2)), "bthd,hde->bte", jnp.float32)
  with pytest.raises(ValueError, match="contracted must be in"):
    decode_layout.OutMajor(stored, contracted=3)


def test_lora_and_qlora_adapters_keep_their_path():
  base = _model(TINY)
  ids = _ids()
  # LoRA on q, v, down: k, o, gate and up are plain and get packed (q, k and v are fused
  # only when all three are plain);
  # QLoRA quantizes every frozen projection (NF4 weight modules): nothing is plain.
  for config, count in ((lora.LoRAConfig(rank=4, targets=("q", "v", "down")), 4),
                        (lora.LoRAConfig(rank=4, targets=("q", "gate"), quantize_base="nf4"), 0)):
    adapted = lora.apply_lora(nnx.clone(base), config, rngs=nnx.Rngs(1))
    for *_, weight in lora.adapters(adapted):   # B != 0: the adapters change the model
      weight.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), weight.lora_b.shape)
    want = _logits(adapted, ids)
    packed = nnx.clone(adapted)
    assert decode_layout.pack_for_decode(packed) == count * TINY.num_layers
    assert all(isinstance(w, lora.LoRAWeight) for _, _, w in lora.adapters(packed))
    np.testing.assert_allclose(_logits(packed, ids), want, atol=2e-5, rtol=1e-5)


def test_scanned_layers_are_left_alone():
  model = _model(dataclasses.replace(TINY, scan_layers=True))
  assert decode_layout.pack_for_decode(model) == 0


def test_vocabulary_major_head_computes_the_same_logits_and_scores():
  model = _model(TINY)
  ids = _ids()
  stored = _logits(model, ids)
  packed = nnx.clone(model)
  assert decode_layout.pack_for_decode(packed, layers=False, head=True) == 1
  assert isinstance(packed.lm_head, decode_layout.OutMajor)
  assert packed.lm_head.kernel[...].shape == (TINY.vocab_size, TINY.embed_dim)
  assert isinstance(packed.layers[0].attn.q_proj, nnx.Param)   # the layers keep theirs
  np.testing.assert_allclose(_logits(packed, ids), stored, atol=2e-5, rtol=1e-5)
  # The chunked scoring's head (head_matrix) reads the vocabulary-major kernel as such.
  head, vocab_major = packed.head_matrix()
  assert vocab_major
  np.testing.assert_array_equal(np.asarray(head).T, np.asarray(model.lm_head[...]))
  assert decode_layout.pack_for_decode(packed, layers=False, head=True) == 0
  # A tied head (the embedding) and a 16-bit head are left alone.
  tied = _model(dataclasses.replace(TINY, tie_embeddings=True))
  assert decode_layout.pack_for_decode(tied, layers=False, head=True) == 0
  half = transformer.create_model(dataclasses.replace(TINY, param_dtype="bfloat16",
                                                     dtype="bfloat16"))
  assert half.lm_head[...].dtype == jnp.bfloat16
  assert decode_layout.pack_for_decode(half, layers=False, head=True) == 0


def test_auto_layout_follows_the_cpu_vendor(monkeypatch):
  choose = decode_layout.choose_layout
  monkeypatch.setattr(decode_layout, "cpu_vendor", lambda: "GenuineIntel")
  assert choose("auto", backend="cpu", mesh=False) == "head"
  monkeypatch.setattr(decode_layout, "cpu_vendor", lambda: "AuthenticAMD")
  assert choose("auto", backend="cpu", mesh=False) == "fused"
  assert choose("auto", backend="gpu", mesh=False) == "stored"
  assert choose("auto", backend="cpu", mesh=True) == "stored"
  assert choose("head", backend="gpu", mesh=True) == "head"
  assert decode_layout.PACK_ARGS["head"] == {"layers": False, "head": True}
  with pytest.raises(ValueError, match="weight_layout must be one of"):
    choose("transposed", backend="cpu", mesh=False)
