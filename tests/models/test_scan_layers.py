"""scan_layers: stacked layer parameters under one lax.scan equal the Python loop (forward,
loss and gradients on the 8-device mesh, remat, KV cache and greedy sampling, LoRA / QLoRA,
HF import / export, model directories and orbax checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax import config_files
from wakea_jax.checkpoints import adapters, export, loader
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.models import lora, stacking, transformer
from wakea_jax.models.config import ModelConfig, get_preset
from wakea_jax.models.layers import KVCache
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling import Sampler

# 4 layers, odd sizes (head_dim * num_heads != embed_dim), as the issue asks.
LOOP = get_preset("tiny", num_layers=4)
SCAN = LOOP.replace(scan_layers=True)


def _ids(batch=4, length=12, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 256, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def loop_model():
  model = transformer.create_model(LOOP, seed=0)
  randomise(model, seed=1)
  return model


def _stacked_grads(loop_grads):
  """Loop-layout gradients (layers.i....) stacked like a scanned model's state."""
  flat = dict(nnx.to_flat_state(loop_grads))
  out = {}
  for path, var in flat.items():
    if path[0] == "layers":
      out.setdefault(("layers",) + path[2:], []).append((path[1], var.get_value()))
    else:
      out[path] = var.get_value()
  return {k: (jnp.stack([v for _, v in sorted(vs)]) if isinstance(vs, list) else vs)
          for k, vs in out.items()}


def test_config_round_trip_and_validation():
  assert ModelConfig.from_dict(SCAN.to_dict()) == SCAN
  assert ModelConfig.from_dict({k: v for k, v in LOOP.to_dict().items()
                                if k != "scan_layers"}).scan_layers is False  # old files
  with pytest.raises(ValueError, match="ModelConfig.scan_layers"):
    LOOP.replace(scan_layers="yes")
  config = config_files.get_config("configs/model.py:qwen3-0.6b", **{"model.scan_layers": True})
  assert ModelConfig.from_dict(config.model.to_dict()).scan_layers


def test_same_seed_same_weights_and_stacking_round_trip(loop_model):
  fresh_loop = transformer.create_model(LOOP, seed=3)
  fresh_scan = transformer.create_model(SCAN, seed=3)
  q = fresh_scan.layers.attn.q_proj
  assert q.shape == (4, 64, 4, 24)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "q_heads", "head_dim")
  for i, layer in enumerate(fresh_loop.layers):
    np.testing.assert_array_equal(q[...][i], layer.attn.q_proj[...])
  scan = stacking.convert_layers(loop_model, True)
  assert scan.config.scan_layers and not loop_model.config.scan_layers
  back = stacking.convert_layers(scan, False)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loop_model)),
                            nnx.to_flat_state(nnx.state(back))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
    assert a.get_metadata().get("logical_axes") == b.get_metadata().get("logical_axes")
  assert stacking.convert_layers(scan, True) is scan


def test_rules_without_layers_axis_still_work():
  old_rules = tuple(r for r in mesh_lib.DEFAULT_RULES if r[0] != "layers")
  assert mesh_lib.logical_to_spec(("layers", "embed", "mlp"), old_rules) == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
  with pytest.raises(KeyError, match="no sharding rule"):
    mesh_lib.logical_to_spec(("nonsense",), old_rules)


def _loss_fn(graphdef):
  def loss(state, ids):
    logits = nnx.merge(graphdef, state)(ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, ids[..., None], -1)[..., 0])
  return loss


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_sharded_loss_and_grads_match_the_loop(loop_model, policy):
  mesh = mesh_lib.create_mesh((2, 2, 2))
  rules = mesh_lib.DEFAULT_RULES
  ids = _ids(4, 12)
  results = {}
  for scan in (False, True):
    model = stacking.convert_layers(loop_model, scan)
    model = nnx.clone(model)
    model.config = model.config.replace(remat_policy=policy)
    graphdef, state = nnx.split(model, nnx.Param)
    state = mesh_lib.shard_state(state, mesh, rules)
    if scan:
      assert state["layers"]["mlp"]["up_proj"].get_value().sharding.spec == (
          jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
    with mesh_lib.logical_rules(mesh, rules):
      results[scan] = jax.jit(jax.value_and_grad(_loss_fn(graphdef)))(
          state, mesh_lib.shard_batch(ids, mesh, rules))
  (loop_loss, loop_grads), (scan_loss, scan_grads) = results[False], results[True]
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
  want = _stacked_grads(loop_grads)
  got = {p: v.get_value() for p, v in nnx.to_flat_state(scan_grads)}
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], atol=1e-5, err_msg=str(path))


def test_kv_cache_layouts_and_cached_forward(loop_model):
  scan = stacking.convert_layers(loop_model, True)
  loop_cache = KVCache.create(LOOP, 2, 32)
  scan_cache = KVCache.create(SCAN, 2, 32)
  assert isinstance(loop_cache.keys, tuple) and not loop_cache.stacked
  assert scan_cache.stacked and scan_cache.keys.shape == (4, 2, 2, 32, 24)
  assert loop_cache.capacity == scan_cache.capacity == 32
  ids, mask = _ids(2, 7), jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  a, loop_cache = loop_model(ids, attention_mask=mask, cache=loop_cache)
  b, scan_cache = scan(ids, attention_mask=mask, cache=scan_cache)
  np.testing.assert_allclose(b, a, atol=1e-5)
  np.testing.assert_array_equal(scan_cache.end_index, [7, 4])
  np.testing.assert_allclose(scan_cache.keys, jnp.stack(loop_cache.keys), atol=1e-5)
  with pytest.raises(ValueError, match="stacked KV cache"):
    scan(ids, cache=KVCache.create(LOOP, 2, 32))


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_greedy_sampling_identical_with_scan_and_loop(loop_model, mesh_shape):
  mesh = None if mesh_shape is None else mesh_lib.create_mesh(mesh_shape)
  prompts = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3], [9]]
  tokens = {}
  for scan in (False, True):
    model = stacking.convert_layers(loop_model, scan)
    graphdef, params = nnx.split(model)
    if mesh is not None:
      params = mesh_lib.shard_state(params, mesh)
    sampler = Sampler(graphdef, model.config, temperature=0.0, mesh=mesh)
    out = sampler.generate(params, prompts, max_new_tokens=12, rng=jax.random.key(0))
    tokens[scan] = out.tokens
  assert tokens[True] == tokens[False]
  assert all(len(t) == 12 for t in tokens[True])


def _lora_loss_and_grads(model):
  graphdef, adapters_state, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(adapters_state, ids):
    logits = nnx.merge(graphdef, adapters_state, rest)(ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, ids[..., None], -1)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(adapters_state, _ids(2, 10))


@pytest.mark.parametrize("quantize_base", [None, "nf4"])
def test_lora_and_qlora_on_a_scanned_model(loop_model, quantize_base):
  config = lora.LoRAConfig(rank=4, alpha=8.0, quantize_base=quantize_base)
  models = {}
  for scan in (False, True):
    model = nnx.clone(stacking.convert_layers(loop_model, scan))
    models[scan] = lora.apply_lora(model, config, rngs=nnx.Rngs(1))
  # The same non-zero B in both layouts (B starts at zero), so that gradients reach A too.
  loop_adapters = lora.adapters(models[False])
  b_values = {(i, n): 0.05 * jax.random.normal(jax.random.key(7 * i + len(n)),
                                               a.lora_b.shape)
              for i, n, a in loop_adapters}
  for i, n, a in loop_adapters:
    a.lora_b[...] = b_values[(i, n)]
  scan_model = models[True]
  layers = stacking.layer_list(scan_model)
  for i, n, _ in loop_adapters:
    sub, attr, _ = lora.TARGETS[n]
    getattr(getattr(layers[i], sub), attr).lora_b[...] = b_values[(i, n)]
  stacking.set_layers(scan_model, layers)
  assert scan_model.layers.attn.q_proj.lora_a.shape == (4, 64, 4)
  assert scan_model.layers.attn.q_proj.lora_a.get_metadata()["logical_axes"] == (
      "layers", "embed", None)

  loop_loss, loop_grads = _lora_loss_and_grads(models[False])
  scan_loss, scan_grads = _lora_loss_and_grads(scan_model)
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
  want = _stacked_grads(loop_grads)
  got = {p: v.get_value() for p, v in nnx.to_flat_state(scan_grads)}
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], atol=1e-5, err_msg=str(path))

  # Per-layer adapters, the PEFT tensors written from them, and the merged model agree.
  for (i, n, a), (j, m, b) in zip(lora.adapters(models[False]), lora.adapters(scan_model)):
    assert (i, n) == (j, m)
    for x, y in zip(a.matrices(), b.matrices()):
      np.testing.assert_array_equal(x, y)
  loop_peft = adapters.peft_tensors(models[False], config)
  scan_peft = adapters.peft_tensors(scan_model, config)
  assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in scan_peft
  assert loop_peft.keys() == scan_peft.keys()
  for name in loop_peft:
    np.testing.assert_array_equal(scan_peft[name], loop_peft[name], err_msg=name)
  merged_loop, merged_scan = lora.merge_lora(models[False]), lora.merge_lora(scan_model)
  assert merged_scan.config.scan_layers
  ids = _ids(2, 10, seed=5)
  np.testing.assert_allclose(merged_scan(ids), merged_loop(ids), atol=1e-5)
  np.testing.assert_allclose(merged_scan(ids), scan_model(ids), atol=1e-4)


def test_lora_dropout_is_refused_on_a_scanned_model(loop_model):
  scan = nnx.clone(stacking.convert_layers(loop_model, True))
  with pytest.raises(ValueError, match="LoRAConfig.dropout.*scan_layers"):
    lora.apply_lora(scan, lora.LoRAConfig(rank=2, dropout=0.1), rngs=nnx.Rngs(0))


def test_model_dir_and_orbax_round_trip_and_layout_conversion(loop_model, tmp_path):
  scan = stacking.convert_layers(loop_model, True)
  ids = _ids(2, 9, seed=4)
  want = np.asarray(loop_model(ids))
  export.save_model_dir(scan, tmp_path / "scan")
  assert export.read_model_config(tmp_path / "scan").scan_layers
  mesh = mesh_lib.create_mesh((1, 4, 2))
  for layout in (None, True, False):
    loaded = export.load_model_dir(tmp_path / "scan", mesh=mesh, scan_layers=layout)
    assert loaded.config.scan_layers == (layout is not False)
    np.testing.assert_allclose(loaded(ids), want, atol=5e-5)  # sharded eager reductions
  # A looped directory loads scanned, laid out on the mesh by the rules.
  export.save_model_dir(loop_model, tmp_path / "loop")
  loaded = export.load_model_dir(tmp_path / "loop", mesh=mesh, scan_layers=True)
  assert loaded.layers.mlp.up_proj[...].sharding.spec == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
  np.testing.assert_allclose(loaded(ids), want, atol=5e-5)
  assert loader.load_model(tmp_path / "loop", scan_layers=True).config.scan_layers
  assert not loader.load_model(tmp_path / "scan", scan_layers=False).config.scan_layers
  # Orbax train-state checkpoints hold the stacked state as it is.
  state = mesh_lib.shard_state(nnx.state(scan, nnx.Param), mesh)
  manager = CheckpointManager(tmp_path / "ckpt", async_save=False)
  manager.save(1, state)
  manager.wait_until_finished()
  restored, _, _ = manager.restore(state)
  manager.close()
  for (p, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(restored)):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


# ------------------------------------------------------------------------------------------
# Hugging Face import / export (tiny random HF models, as in tests/checkpoints)
# ------------------------------------------------------------------------------------------

HF_FAMILIES = ("llama_head_dim", "qwen3_qknorm_sharded")


@pytest.fixture(scope="module")
def parity():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests.checkpoints import test_hf_parity
  return test_hf_parity


@pytest.fixture(scope="module")
def hf_dirs(parity, tmp_path_factory):
  """family -> (directory, HF model) for Llama and Qwen3, saved with save_pretrained."""
  out = {}
  for seed, family in enumerate(HF_FAMILIES):
    parity.torch.manual_seed(seed)
    model = parity.transformers.AutoModelForCausalLM.from_config(
        parity._hf_config(family)).eval()
    parity.randomise_torch(model, seed=seed)
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory, **parity.FAMILIES[family][2])
    out[family] = (directory, model)
  return out


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_import_into_a_scanned_model(parity, hf_dirs, family):
  directory, ref = hf_dirs[family]
  scan = parity.hf.load_model(directory, scan_layers=True)
  assert scan.config.scan_layers and scan.layers.mlp.down_proj.shape[0] == 2
  ids, mask = parity._batch()
  ours = parity._our_logits(scan, ids, mask)
  diff = parity._max_diff(ours, parity._hf_logits(ref, ids, mask), mask)
  print(f"parity import scanned {family}: {diff:.2e}")
  assert diff < parity.TOL
  loop = parity.hf.load_model(directory)
  assert parity._max_diff(ours, parity._our_logits(loop, ids, mask), mask) < 1e-5
  mesh = mesh_lib.create_mesh((2, 2, 2))
  sharded = parity.hf.load_model(directory, scan_layers=True, mesh=mesh)
  assert sharded.layers.attn.q_proj[...].sharding.spec == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_export_from_a_scanned_model(parity, family, tmp_path):
  config = parity.hf.config_from_hf(parity._hf_config(family).to_dict()).replace(
      scan_layers=True)
  model = transformer.create_model(config)
  parity._randomise_ours(model, seed=7)
  out = parity.hf.save_model(model, tmp_path / "hf", max_shard_size="60KB")
  ref, info = parity.transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=parity.torch.float32, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, mask = parity._batch()
  diff = parity._max_diff(parity._our_logits(model, ids, mask),
                          parity._hf_logits(ref.eval(), ids, mask), mask)
  print(f"parity export scanned {family}: {diff:.2e}")
  assert diff < parity.TOL
  # Back into either layout, bit-identical.
  reloaded = parity.hf.load_model(out, scan_layers=True)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(reloaded, nnx.Param))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
  as_loop = stacking.convert_layers(parity.hf.load_model(out), True)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(as_loop, nnx.Param))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


def test_full_remat_frees_activations_in_the_scan_too():
  """The CPU custom-VJP remat (transformer._recompute_in_backward) runs as the scan body: the
  compiled gradient's temporaries shrink as in the loop, and stay near the loop's."""
  config = get_preset("tiny").replace(num_layers=6, embed_dim=64, mlp_dim=1024, num_heads=4,
                                      num_kv_heads=2, head_dim=16, vocab_size=64)
  ids = jax.random.randint(jax.random.key(0), (8, 256), 0, 64)

  def temp_bytes(policy, scan):
    model = transformer.create_model(config.replace(remat_policy=policy, scan_layers=scan))
    graphdef, state = nnx.split(model)

    def loss(state):
      return jnp.mean(nnx.merge(graphdef, state).forward(ids).hidden ** 2)

    return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

  scan_none, scan_full = temp_bytes("none", True), temp_bytes("full", True)
  loop_full = temp_bytes("full", False)
  assert scan_full < 0.6 * scan_none, (scan_full, scan_none)
  assert scan_full < 1.2 * loop_full, (scan_full, loop_full)
