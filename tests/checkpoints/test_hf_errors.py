"""Bad HF checkpoints, configs, model directories and convert flags give errors naming the
file, field or tensor (plus the model-directory round trip). No torch needed: checkpoints
are written with our own save_model."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from wakea_jax import convert
from wakea_jax.checkpoints import export, hf
from wakea_jax.models.config import ModelConfig, RopeScaling
from wakea_jax.models.transformer import create_model
from wakea_jax.parallel import mesh as mesh_lib

CONFIG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48, max_seq_len=128)
HF_BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.fixture
def checkpoint(tmp_path):
  return hf.save_model(create_model(CONFIG), tmp_path / "hf")


def _edit_config(directory, **changes):
  values = json.loads((directory / "config.json").read_text())
  values.update(changes)
  (directory / "config.json").write_text(json.dumps(values))


def _edit_tensors(directory, edit):
  file = str(directory / "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_model(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    hf.load_model(tmp_path)


def test_missing_weights(checkpoint):
  (checkpoint / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_model(checkpoint)


def test_missing_shard(tmp_path):
  out = hf.save_model(create_model(CONFIG), tmp_path / "hf", max_shard_size="10KB")
  shards = sorted(out.glob("model-*.safetensors"))
  assert len(shards) > 1
  shards[1].unlink()
  with pytest.raises(FileNotFoundError, match=shards[1].name):
    hf.load_model(out)


def test_unsupported_architecture(checkpoint):
  _edit_config(checkpoint, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(NotImplementedError,
                     match=r"config\.json: architectures \['GPT2LMHeadModel'\] not supported"):
    hf.load_model(checkpoint)


def test_missing_tensor(checkpoint):
  _edit_tensors(checkpoint, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*missing"):
    hf.load_model(checkpoint)


def test_unexpected_tensor(checkpoint):
  def add(tensors):
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  _edit_tensors(checkpoint, add)
  with pytest.raises(ValueError, match=r"unexpected tensor.*o_proj\.bias.*model\.safetensors"):
    hf.load_model(checkpoint)


def test_wrong_shape_names_tensor_file_and_shapes(checkpoint):
  _edit_config(checkpoint, intermediate_size=40)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\."
                     r"\w+_proj\.weight' has shape \(48, 32\), expected \(40, 32\)"):
    hf.load_model(checkpoint)


def test_stale_rotary_buffers_are_ignored(checkpoint):
  def add(tensors):
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  _edit_tensors(checkpoint, add)
  assert hf.load_model(checkpoint).config.num_layers == 1


@pytest.mark.parametrize("changes, error, pattern", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, NotImplementedError,
     "rope_parameters.rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, NotImplementedError,
     "rope_scaling.rope_type='linear'"),
    ({"attention_bias": True}, NotImplementedError, "attention_bias"),
    ({"mlp_bias": True}, NotImplementedError, "mlp_bias"),
    ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, NotImplementedError,
     "sliding"),
    ({"hidden_size": None}, ValueError, "hidden_size"),
    ({"num_key_value_heads": 3}, ValueError, "num_kv_heads"),
])
def test_config_errors_name_the_field(changes, error, pattern):
  with pytest.raises(error, match=pattern):
    hf.config_from_hf({**HF_BASE, **changes}, source="x/config.json")


def test_old_and_new_rope_layouts_agree():
  params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
  old = hf.config_from_hf({**HF_BASE, "rope_theta": 5e5,
                           "rope_scaling": {"type": "llama3", **params}})
  new = hf.config_from_hf({**HF_BASE, "rope_parameters": {"rope_type": "llama3",
                                                          "rope_theta": 5e5, **params}})
  assert old == new
  assert new.rope_theta == 5e5 and new.rope_scaling == RopeScaling(**params)
  qwen3 = hf.config_from_hf({**HF_BASE, "architectures": ["Qwen3ForCausalLM"]})
  assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128  # Qwen3Config default


def test_save_rejects_incompatible_architecture_and_nonempty_dir(tmp_path):
  model = create_model(CONFIG.replace(qkv_bias=True))
  with pytest.raises(ValueError, match="LlamaForCausalLM needs qkv_bias=False"):
    hf.save_model(model, tmp_path / "a", architecture="LlamaForCausalLM")
  with pytest.raises(ValueError, match="Qwen3ForCausalLM needs"):
    hf.save_model(model, tmp_path / "a", architecture="Qwen3ForCausalLM")
  out = hf.save_model(model, tmp_path / "a")  # inferred: Qwen2
  assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
  hf.save_model(model, out, dtype="bfloat16")  # a previous checkpoint is replaced
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporaries left behind
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="without config.json"):
    hf.save_model(model, tmp_path / "b")
  with pytest.raises(FileExistsError, match="without model_config.json"):
    export.save_model_dir(model, tmp_path / "b")
  assert (tmp_path / "b" / "notes.txt").read_text() == "keep me"


class _Wrapped(nnx.Module):  # stands in for a LoRA / quantized weight module

  def __init__(self, weight):
    self.base = weight


def test_save_rejects_unmerged_weight_modules(tmp_path):
  model = create_model(CONFIG)
  model.layers[0].attn.q_proj = _Wrapped(model.layers[0].attn.q_proj)
  with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj\.base.*merge"):
    hf.save_model(model, tmp_path / "hf")
  model.layers[0].attn.q_proj = _Wrapped(nnx.Variable(model.layers[0].attn.q_proj.base[...]))
  with pytest.raises(ValueError, match=r"not a plain nnx\.Param: \['layers\.0\.attn\.q_proj'\]"):
    hf.save_model(model, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_parse_size():
  assert hf.parse_size("50KB") == 50_000 and hf.parse_size("2GiB") == 2 * 2**30
  assert hf.parse_size(123) == 123
  with pytest.raises(ValueError, match="max_shard_size"):
    hf.parse_size("lots")


def test_model_dir_round_trip_and_errors(tmp_path):
  model = create_model(CONFIG.replace(value_head=True), seed=3)
  out = export.save_model_dir(model, tmp_path / "m")
  loaded = export.load_model_dir(out)
  assert loaded.config == model.config
  np.testing.assert_array_equal(loaded.layers[0].attn.q_proj[...], model.layers[0].attn.q_proj[...])
  np.testing.assert_array_equal(loaded.value_head[...], model.value_head[...])
  sharded = export.load_model_dir(out, mesh=mesh_lib.create_mesh((2, 2, 2)))
  q_proj = sharded.layers[0].attn.q_proj[...]
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_array_equal(q_proj, model.layers[0].attn.q_proj[...])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load_model_dir(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
    export.load_model_dir(tmp_path)
  (out / "model_config.json").write_text(json.dumps({**CONFIG.to_dict(), "colour": "red"}))
  with pytest.raises(ValueError, match="model_config.json.*colour"):
    export.load_model_dir(out)
  (out / "model_config.json").write_text(json.dumps(CONFIG.replace(mlp_dim=40).to_dict()))
  with pytest.raises(ValueError, match="cannot restore"):
    export.load_model_dir(out)


@pytest.mark.parametrize("kwargs", [
    {},
    {"from_hf": "a"},
    {"to_hf": "a"},
    {"from_hf": "a", "out": "b", "to_hf": "c"},
    {"checkpoint": "a", "out": "b"},
    {"from_hf": "a", "checkpoint": "b"},
])
def test_convert_requires_exactly_one_direction(kwargs):
  with pytest.raises(convert.ConvertUsageError, match="exactly one direction"):
    convert.run(**kwargs)


def test_convert_architecture_needs_to_hf():
  with pytest.raises(convert.ConvertUsageError, match="--architecture"):
    convert.run(from_hf="a", out="b", architecture="LlamaForCausalLM")


def test_config_overrides_and_value_head(checkpoint, tmp_path):
  model = hf.load_model(checkpoint, value_head=True, max_seq_len=64, param_dtype="bfloat16")
  assert model.config.max_seq_len == 64 and model.config.param_dtype == "bfloat16"
  assert model.value_head[...].shape == (32,) and float(model.value_bias[...]) == 0.0
  assert 0 < float(np.std(np.asarray(model.value_head[...], np.float32))) < 0.1
  out = hf.save_model(model, tmp_path / "out")  # the value head is dropped, with a warning
  assert not hf.load_model(out).config.value_head
