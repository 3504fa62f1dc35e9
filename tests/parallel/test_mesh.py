"""Mesh construction, logical-axis rules, and sharded-vs-single-device equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.parallel import mesh as mesh_lib

CFG = get_preset("tiny", qkv_bias=True, qk_norm=True, num_kv_heads=2)


def test_eight_fake_devices_exist():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before importing jax"


@pytest.mark.parametrize("shape,expected", [
    ((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ({"tensor": 4, "data": -1}, (2, 1, 4)),
])
def test_resolve_mesh_shape(shape, expected):
  assert mesh_lib.resolve_mesh_shape(shape, 8) == expected


@pytest.mark.parametrize("shape,match", [
    ((3, -1, 1), "not divisible"), ((-1, -1, 1), "at most one"), ((2, 2, 1), "needs 4"),
    ((2, 2), "one size per axis"), ({"model": 2}, "unknown mesh axes"), ((0, 8, 1), "positive"),
])
def test_resolve_mesh_shape_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.resolve_mesh_shape(shape, 8)


def test_mesh_config_devices_selects_the_first_devices():
  """mesh.devices: 0 spans every device, N the first N; bad values name the field."""
  assert mesh_lib.MeshConfig().create().devices.size == 8
  mesh = mesh_lib.MeshConfig(data=-1, tensor=2, devices=4).create()
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])
  assert list(mesh_lib.MeshConfig(devices=1).create().devices.flat) == [jax.devices()[0]]
  with pytest.raises(ValueError, match="mesh.devices=9, but this process has 8"):
    mesh_lib.MeshConfig(devices=9).create()
  with pytest.raises(ValueError, match="mesh.devices must be >= 0"):
    mesh_lib.MeshConfig(devices=-1)
  with pytest.raises(ValueError, match="needs 2 devices, but 1 are used"):
    mesh_lib.MeshConfig(data=2, devices=1).create()


def test_logical_to_spec():
  rules = mesh_lib.DEFAULT_RULES
  assert mesh_lib.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert mesh_lib.logical_to_spec(("act_batch", None), rules) == P(("data", "fsdp"), None)
  # A mesh axis is used once per array.
  both = (("a", "tensor"), ("b", "tensor"))
  assert mesh_lib.logical_to_spec(("a", "b"), both) == P("tensor", None)
  # A dimension the mesh axis does not divide is replicated over it.
  mesh = mesh_lib.create_mesh((1, 2, 4))
  assert mesh_lib.logical_to_spec(("embed", "kv_heads"), rules, mesh, (64, 2)) == P("fsdp", None)
  with pytest.raises(KeyError, match="no sharding rule"):
    mesh_lib.logical_to_spec(("nonexistent",), rules)


def test_rules_validation():
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    mesh_lib.normalize_rules([("embed", "model")])
  with pytest.raises(ValueError, match="more than once"):
    mesh_lib.normalize_rules([("embed", "fsdp"), ("embed", None)])
  assert mesh_lib.normalize_rules({"embed": ["fsdp", "tensor"]}) == (("embed", ("fsdp", "tensor")),)


def _loss_fn(graphdef):
  def loss(state, ids, segment_ids):
    logits = nnx.merge(graphdef, state)(ids[:, :-1], segment_ids=segment_ids[:, :-1])
    targets = ids[:, 1:]
    mask = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)
  return loss


@pytest.mark.parametrize("mesh_shape, dtype", [((2, 2, 2), "float32"), ((1, 8, 1), "float32"),
                                               ((1, 1, 8), "float32"), ((2, 2, 2), "bfloat16"),
                                               ((1, 1, 8), "bfloat16")])
def test_sharded_loss_and_grads_equal_single_device(mesh_shape, dtype):
  """Also in bfloat16 compute (layers.lowp_matmul's written-out backward, its transposed
  copies of sharded activations): the same numbers up to the order of float32 sums and a
  bfloat16 rounding of the activation gradients."""
  cfg = CFG.replace(dtype=dtype)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(1, cfg.vocab_size, (8, 17)), jnp.int32)
  segment_ids = jnp.asarray(np.repeat([[1] * 9 + [2] * 6 + [0] * 2], 8, axis=0), jnp.int32)

  single = transformer.create_model(cfg, seed=0)
  graphdef, state = nnx.split(single)
  loss = _loss_fn(graphdef)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(state, ids, segment_ids)

  mesh = mesh_lib.create_mesh(mesh_shape)
  sharded = transformer.create_model(cfg, seed=0, mesh=mesh)
  s_graphdef, s_state = nnx.split(sharded)
  # The parameters really are distributed (not just replicated).
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(s_state)}
  assert any(s != "PartitionSpec()" for s in specs), specs
  batch = mesh_lib.shard_batch({"ids": ids, "seg": segment_ids}, mesh)
  # As the trainer does: gradients are laid out like the parameters.
  grad_shardings = mesh_lib.state_shardings(s_state, mesh)
  step = jax.jit(jax.value_and_grad(_loss_fn(s_graphdef)),
                 out_shardings=(jax.sharding.NamedSharding(mesh, P()), grad_shardings))
  with mesh_lib.logical_rules(mesh):
    got_loss, got_grads = step(s_state, batch["ids"], batch["seg"])
  pairs = [(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())
           for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads))]
  max_diff = max(float(np.abs(a - b).max()) for a, b in pairs)
  min_cos = min(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in pairs)
  print(f"sharded {mesh_shape} {dtype} vs single: loss diff {abs(got_loss - ref_loss):.2e}, "
        f"max grad diff {max_diff:.2e}, min cosine {min_cos:.6f}")
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got_grads))
  if dtype == "float32":
    np.testing.assert_allclose(got_loss, ref_loss, atol=1e-5, rtol=0)
    assert max_diff < 1e-5
  else:
    np.testing.assert_allclose(got_loss, ref_loss, atol=1e-3, rtol=0)
    assert min_cos > 0.999
  for g, p in zip(jax.tree.leaves(got_grads), jax.tree.leaves(s_state)):
    assert g.sharding.is_equivalent_to(p.sharding, g.ndim)


def test_shard_batch_rejects_indivisible_batch():
  mesh = mesh_lib.create_mesh((2, 2, 2))
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 batch shards"):
    mesh_lib.shard_batch(np.zeros((6, 4), np.int32), mesh)
