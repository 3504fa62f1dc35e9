"""Logits parity with transformers (Llama, Qwen2, Qwen3): import, export, packing, bf16,
sharded loading and the convert round trip.

Every weight of the tiny HF models is randomised, norms and biases included: HF initialises
norms to one and biases to zero, which would hide a mis-mapped tensor.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.checkpoints.torch_models import randomise_torch  # noqa: E402
from wakea_jax import convert  # noqa: E402
from wakea_jax.checkpoints import hf  # noqa: E402
from wakea_jax.models.transformer import create_model  # noqa: E402
from wakea_jax.parallel import mesh as mesh_lib  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # Small, so that the scaled frequencies matter at the test length of 40.
               "original_max_position_embeddings": 64}
# family -> (config class, extra config fields, save_pretrained kwargs)
FAMILIES = {
    "llama_tied_llama3rope": ("LlamaConfig", dict(tie_word_embeddings=True,
                                                  rope_parameters=LLAMA3_ROPE), {}),
    "llama_head_dim": ("LlamaConfig", dict(head_dim=24, rope_theta=500_000.0), {}),
    "qwen2_bias": ("Qwen2Config", dict(rope_theta=1_000_000.0), {}),
    "qwen3_qknorm_sharded": ("Qwen3Config", dict(head_dim=24), dict(max_shard_size="50KB")),
}
LENGTHS = (40, 31, 17)


def _randomise_ours(model, seed: int) -> None:
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    noise = rng.standard_normal(var.get_value().shape).astype(np.float32)
    name = str(path[-2:])
    if "norm" in name:
      value = 1.0 + 0.2 * noise
    else:
      value = (0.2 if "bias" in name else 0.08) * noise
    flat.append((path, var.replace(jnp.asarray(value))))
  nnx.update(model, nnx.from_flat_state(flat))


def _batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 256, (len(LENGTHS), max(LENGTHS)))
  mask = (np.arange(max(LENGTHS))[None] < np.asarray(LENGTHS)[:, None]).astype(np.int64)
  return ids * mask, mask  # right padding with token 0


def _hf_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids),
                attention_mask=None if mask is None else torch.as_tensor(mask))
  return out.logits.float().numpy()


def _our_logits(model, ids, mask=None, **kwargs):
  return np.asarray(model(jnp.asarray(ids, jnp.int32),
                          attention_mask=None if mask is None else jnp.asarray(mask), **kwargs))


def _max_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


def _hf_config(family):
  cls_name, extra, _ = FAMILIES[family]
  return getattr(transformers, cls_name)(**BASE, **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (directory, HF model): tiny random models saved once with save_pretrained."""
  out = {}
  for seed, family in enumerate(sorted(FAMILIES)):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family)).eval()
    randomise_torch(model, seed=seed)
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory, **FAMILIES[family][2])
    out[family] = (directory, model)
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_parity(family, checkpoints):
  directory, ref = checkpoints[family]
  model = hf.load_model(directory)
  ids, mask = _batch()
  diff = _max_diff(_our_logits(model, ids, mask), _hf_logits(ref, ids, mask), mask)
  print(f"parity import {family}: {diff:.2e}")
  assert diff < TOL
  if "sharded" in family:
    assert (directory / "model.safetensors.index.json").is_file()
  if "tied" in family:
    assert model.config.tie_embeddings and model.config.rope_scaling is not None
    # The scaling must matter at this length, or the test would not check it.
    unscaled = hf.load_model(directory, rope_scaling=None)
    assert _max_diff(_our_logits(unscaled, ids, mask), _hf_logits(ref, ids, mask), mask) > 1e-2
  if "qwen2" in family:  # the biases were randomised, so a dropped bias would show above
    assert model.config.qkv_bias


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_parity(family, tmp_path):
  config = hf.config_from_hf(_hf_config(family).to_dict())
  model = create_model(config)
  _randomise_ours(model, seed=7)
  out = hf.save_model(model, tmp_path / "hf", max_shard_size="60KB" if "sharded" in family
                      else "5GB")
  assert (out / "model.safetensors.index.json").is_file() == ("sharded" in family)
  ref, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(ref).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
  ids, mask = _batch()
  diff = _max_diff(_our_logits(model, ids, mask), _hf_logits(ref.eval(), ids, mask), mask)
  print(f"parity export {family}: {diff:.2e}")
  assert diff < TOL
  # And back: the reloaded parameters are bit-identical.
  reloaded = hf.load_model(out)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                               nnx.to_flat_state(nnx.state(reloaded, nnx.Param))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_segments_match_separate_sequences(family, checkpoints):
  directory, ref = checkpoints[family]
  model = hf.load_model(directory)
  rng = np.random.default_rng(2)
  sequences = [rng.integers(1, 256, n) for n in (13, 20, 5)]
  total = sum(len(s) for s in sequences) + 2  # two padding slots at the end
  ids = np.zeros((1, total), np.int64)
  segment_ids = np.zeros((1, total), np.int32)
  start = 0
  for i, seq in enumerate(sequences):
    ids[0, start:start + len(seq)] = seq
    segment_ids[0, start:start + len(seq)] = i + 1
    start += len(seq)
  packed = _our_logits(model, ids, segment_ids=jnp.asarray(segment_ids))
  diff, start = 0.0, 0
  for seq in sequences:
    expected = _hf_logits(ref, seq[None])[0]
    diff = max(diff, float(np.abs(packed[0, start:start + len(seq)] - expected).max()))
    start += len(seq)
  print(f"parity packed {family}: {diff:.2e}")
  assert diff < TOL


def test_bf16_checkpoint_loads(checkpoints, tmp_path):
  family = "qwen2_bias"
  _, ref = checkpoints[family]
  copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  rounded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  model = hf.load_model(tmp_path)
  ids, mask = _batch()
  diff = _max_diff(_our_logits(model, ids, mask), _hf_logits(rounded, ids, mask), mask)
  print(f"parity import bf16 {family}: {diff:.2e}")
  assert diff < TOL
  as_bf16 = hf.load_model(tmp_path, dtype="bfloat16")
  assert as_bf16.embed[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(as_bf16.embed[...], np.float32),
                                rounded.model.embed_tokens.weight.detach().numpy())


def test_sharded_load_matches_unsharded(checkpoints):
  family = "qwen3_qknorm_sharded"
  directory, _ = checkpoints[family]
  mesh = mesh_lib.create_mesh((2, 2, 2))
  sharded = hf.load_model(directory, mesh=mesh)
  q_proj = sharded.layers[0].attn.q_proj[...]
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(q_proj.addressable_shards) == 8
  ids, mask = _batch()
  ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # batch of 4
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def logits(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)

  with mesh_lib.logical_rules(mesh):
    got = np.asarray(logits(state, *mesh_lib.shard_batch((jnp.asarray(ids, jnp.int32),
                                                          jnp.asarray(mask)), mesh)))
  want = _our_logits(hf.load_model(directory), ids, mask)
  diff = _max_diff(got, want, mask)
  print(f"sharded load (2,2,2) vs unsharded {family}: {diff:.2e}")
  assert diff < 1e-5


def test_convert_round_trip(checkpoints, tmp_path):
  family = "llama_tied_llama3rope"
  directory, ref = checkpoints[family]
  convert.run(from_hf=str(directory), out=str(tmp_path / "native"))
  assert (tmp_path / "native" / "model_config.json").is_file()
  convert.run(checkpoint=str(tmp_path / "native"), to_hf=str(tmp_path / "hf"))
  convert.run(from_hf=str(directory), to_hf=str(tmp_path / "hf2"))
  assert (tmp_path / "hf2" / "generation_config.json").is_file()  # side files travel along
  ids, mask = _batch()
  want = _hf_logits(ref, ids, mask)
  for name in ("hf", "hf2"):
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / name, dtype=torch.float32, attn_implementation="eager").eval()
    diff = _max_diff(_hf_logits(back, ids, mask), want, mask)
    print(f"parity convert round trip {family} -> {name}: {diff:.2e}")
    assert diff < 1e-6
