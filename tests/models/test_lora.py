"""LoRA / QLoRA adapters: identity at init, merge parity, trainable set, dropout, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wakea_jax.models import lora, transformer
from wakea_jax.models.config import get_preset
from wakea_jax.models.quant import NF4Weight, QuantizedBase
from wakea_jax.parallel import mesh as mesh_lib

TINY = get_preset("tiny")  # head_dim * num_heads (96) != embed_dim (64)

_apply = jax.jit(transformer.apply, static_argnums=0)


def run(model, ids):
  """model(ids), compiled: eager op-by-op dispatch is slow on CPU."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, ids)


def _ids(batch=2, length=9, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 256, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def base():
  return transformer.create_model(TINY, seed=0)


def adapted(base, **config):
  return lora.apply_lora(nnx.clone(base), lora.LoRAConfig(**config), rngs=nnx.Rngs(1))


def randomize_b(model, seed=2, std=0.1):
  """B is zero at init; give it values so the adapters actually change the model."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def adapter_count(config, rank, targets):
  e, n, k, h, m = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_dim)
  sizes = {"q": e + n * h, "k": e + k * h, "v": e + k * h, "o": n * h + e,
           "gate": e + m, "up": e + m, "down": m + e}
  return config.num_layers * rank * sum(sizes[t] for t in targets)


def test_zero_b_is_the_base_model(base):
  model = adapted(base, rank=4, alpha=8.0)
  ids = _ids()
  np.testing.assert_array_equal(run(model, ids), run(base, ids))


def test_merge_matches_adapted_model_and_restores_structure(base):
  model = randomize_b(adapted(base, rank=4, alpha=8.0))
  ids = _ids()
  logits = run(model, ids)
  assert np.abs(logits - run(base, ids)).max() > 1e-3
  merged = lora.merge_lora(model)
  np.testing.assert_allclose(run(merged, ids), logits, atol=1e-5, rtol=1e-5)
  # Exactly the structure (paths, Variable types, metadata, shapes, dtypes) of a fresh model.
  assert nnx.graphdef(merged) == nnx.graphdef(base)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))
  assert shapes(merged) == shapes(base)
  # merge_lora works on a copy: the adapted model keeps its adapters.
  assert isinstance(model.layers[0].attn.q_proj, lora.LoRAWeight)


def test_lora_state_holds_only_adapters(base):
  model = adapted(base, rank=4)
  adapters = nnx.state(model, nnx.LoRAParam)
  flat = list(nnx.to_flat_state(adapters))
  assert all(path[-1] in ("lora_a", "lora_b") and isinstance(v, nnx.LoRAParam)
             for path, v in flat)
  assert sum(x.size for x in jax.tree.leaves(adapters)) == adapter_count(
      TINY, 4, lora.TARGETS)
  # The frozen side has every base parameter and no adapter.
  frozen = nnx.state(model, nnx.Not(nnx.LoRAParam))
  assert sum(x.size for x in jax.tree.leaves(frozen)) == TINY.num_params()
  assert lora.trainable_filter(None) is nnx.Param
  assert lora.trainable_filter(lora.LoRAConfig()) is nnx.LoRAParam


def test_logical_axes_and_sharding(base):
  model = adapted(base, rank=4, quantize_base="nf4")
  q, o = model.layers[0].attn.q_proj, model.layers[0].attn.o_proj
  assert q.lora_a.get_metadata()["logical_axes"] == ("embed", None)
  assert q.lora_b.get_metadata()["logical_axes"] == (None, "q_heads", "head_dim")
  assert o.lora_a.get_metadata()["logical_axes"] == ("q_heads", "head_dim", None)
  assert o.lora_b.get_metadata()["logical_axes"] == (None, "embed")
  mesh = mesh_lib.create_mesh((1, 2, 4))
  sharded = mesh_lib.shard_state(nnx.state(model), mesh)
  spec = lambda v: v.get_value().sharding.spec
  layer = sharded["layers"][0]
  assert spec(layer["attn"]["q_proj"]["lora_a"]) == jax.sharding.PartitionSpec("fsdp", None)
  assert spec(layer["attn"]["q_proj"]["lora_b"]) == jax.sharding.PartitionSpec(
      None, "tensor", None)
  assert spec(layer["mlp"]["down_proj"]["base"]["codes"])[0] == "tensor"


def test_target_subset(base):
  model = adapted(base, rank=2, targets=("q", "v"))
  for layer in model.layers:
    assert isinstance(layer.attn.q_proj, lora.LoRAWeight)
    assert isinstance(layer.attn.v_proj, lora.LoRAWeight)
    for w in (layer.attn.k_proj, layer.attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
              layer.mlp.down_proj):
      assert type(w) is nnx.Param
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert n == adapter_count(TINY, 2, ("q", "v"))


@pytest.mark.parametrize("changes,match", [
    (dict(targets=("q", "qq")), "'qq'"),
    (dict(targets="q"), "sequence"),
    (dict(targets=()), "empty"),
    (dict(targets=("q", "q")), "more than once"),
    (dict(rank=0), "rank"),
    (dict(alpha=0.0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(quantize_base="int4"), "quantize_base"),
    (dict(nf4_block_size=63), "nf4_block_size"),
    (dict(a_init="zeros"), "a_init"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    lora.LoRAConfig(**changes)


def test_scale_and_double_apply(base):
  assert lora.LoRAConfig(rank=8, alpha=16.0).scale == 2.0
  assert lora.LoRAConfig(rank=16, alpha=8.0, rank_stabilized=True).scale == 2.0
  model = adapted(base, rank=2)
  with pytest.raises(ValueError, match="already a LoRAWeight"):
    lora.apply_lora(model, lora.LoRAConfig(rank=2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_jitted_adamw_step_updates_only_adapters(base, quantize):
  model = adapted(base, rank=4, dropout=0.1, quantize_base=quantize)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(params)
  ids = _ids()

  @jax.jit
  def step(params, rest, opt_state, key):
    def loss_fn(params):
      # copy=True: Variables of `rest` belong to the jit trace; reseeding (and the dropout
      # stream's counter) mutate them inside the grad trace, which needs fresh Variables.
      m = nnx.merge(graphdef, params, rest, copy=True)
      nnx.reseed(m, dropout=key)  # as the train step does
      logits = m(ids[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  new_params, _, loss, grads = step(params, rest, opt_state, jax.random.key(0))
  assert np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  flat_new = dict(nnx.to_flat_state(new_params))
  for path, old in nnx.to_flat_state(params):
    assert path[-1] in ("lora_a", "lora_b")
    if path[-1] == "lora_b":  # A != 0, so B gets a gradient on the first step
      assert np.abs(flat_new[path][...] - old[...]).max() > 0


def test_dropout_train_and_eval(base):
  model = randomize_b(adapted(base, rank=4, dropout=0.5))
  merged = lora.merge_lora(model)
  ids = _ids()
  nnx.reseed(model, dropout=0)
  first = run(model, ids)
  nnx.reseed(model, dropout=1)
  second = run(model, ids)
  assert np.abs(first - second).max() > 1e-3
  assert np.abs(first - run(merged, ids)).max() > 1e-3
  model.eval()
  np.testing.assert_allclose(run(model, ids), run(merged, ids), atol=1e-5, rtol=1e-5)
  model.train()
  nnx.reseed(model, dropout=0)
  np.testing.assert_array_equal(run(model, ids), first)


def test_adapters_get_independent_masks_after_reseed():
  """nnx.reseed gives every dropout stream the same key; the adapter index decorrelates."""
  base = nnx.Param(jnp.zeros((8, 16)), logical_axes=("embed", "mlp"))
  config = lora.LoRAConfig(rank=4, dropout=0.5)
  w0, w1 = (lora.LoRAWeight(base, in_ndim=1, config=config, index=i, rngs=nnx.Rngs(0))
            for i in (0, 1))
  for w in (w0, w1):
    w.lora_b[...] = jnp.ones_like(w.lora_b[...])
    nnx.reseed(w, dropout=7)
  x = jnp.ones((1, 2, 8))
  assert np.abs(w0(x, "bte,em->btm", jnp.float32) - w1(x, "bte,em->btm", jnp.float32)).max() > 0


def test_qlora(base):
  model = adapted(base, rank=4, alpha=8.0, quantize_base="nf4")
  for layer in model.layers:
    assert isinstance(layer.attn.q_proj.base, NF4Weight)
  # No projection weight is left as a Param: the base lives in QuantizedBase variables.
  params = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  e, n, k, h, m = TINY.embed_dim, TINY.num_heads, TINY.num_kv_heads, TINY.head_dim, TINY.mlp_dim
  projections = TINY.num_layers * (2 * e * n * h + 2 * e * k * h + 3 * e * m)
  assert sum(x.size for x in jax.tree.leaves(params)) == TINY.num_params() - projections
  assert jax.tree.leaves(nnx.state(model, QuantizedBase))
  ids = _ids()
  ref = run(base, ids)
  out = run(model, ids)
  # NF4 has ~9% relative RMS error per weight (tests/models/test_quant.py); through two
  # layers the tiny model's logits move by ~8%.
  assert np.linalg.norm(out - ref) < 0.15 * np.linalg.norm(ref)
  randomize_b(model)
  merged = lora.merge_lora(model)
  assert nnx.graphdef(merged) == nnx.graphdef(base)
  np.testing.assert_allclose(run(merged, ids), run(model, ids), atol=1e-5, rtol=1e-5)


def test_memory_report():
  config = lora.LoRAConfig(rank=4, quantize_base="nf4")
  report = lora.memory_report(TINY, config)
  assert report.model_bytes == 4 * TINY.num_params()
  assert report.adapter_bytes == 4 * adapter_count(TINY, 4, lora.TARGETS)
  assert report.optimizer_full_bytes == 2 * report.model_bytes + 4  # mu, nu, int32 count
  assert report.optimizer_lora_bytes == 2 * report.adapter_bytes + 4
  assert report.projections_frozen_bytes < report.projections_base_bytes / 6
  assert report.frozen_bytes == (report.model_bytes - report.projections_base_bytes
                                 + report.projections_frozen_bytes)
  plain = lora.memory_report(TINY, lora.LoRAConfig(rank=4))
  assert plain.projections_frozen_bytes == plain.projections_base_bytes
  assert plain.frozen_bytes == plain.model_bytes


def test_cli_prints_report(capsys):
  lora.main(["--preset", "tiny", "--ranks", "2", "--targets", "q,v"])
  out = capsys.readouterr().out
  assert "rank 2" in out and "AdamW state, adapters only" in out
