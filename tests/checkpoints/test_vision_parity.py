"""Parity with transformers for the SigLIP and CLIP vision towers and LLaVA's projector:
import (last hidden state, pooled output, every hidden state), export reloaded by
transformers, the older "vision_model." layout, nested vision configs, and load errors.

Tiny random-init HF models (hidden 32, 2 layers, image 32, patch 8) with every weight
randomised (norms near 1, biases non-zero) so that a mis-mapped tensor shows.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.checkpoints.torch_models import randomise_torch  # noqa: E402
from wakea_jax.checkpoints import hf  # noqa: E402
from wakea_jax.checkpoints import projector as projector_ckpt  # noqa: E402
from wakea_jax.checkpoints import vision as vision_ckpt  # noqa: E402
from wakea_jax.models import vision  # noqa: E402
from wakea_jax.parallel import mesh as mesh_lib  # noqa: E402

TOL = 1e-4
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)
VARIANTS = {
    "siglip_head": ("SiglipVisionConfig", "SiglipVisionModel", dict(vision_use_head=True)),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", {}),
}


def _pixels(batch: int = 2, height: int = 32, width: int = 32) -> np.ndarray:
  return np.random.default_rng(3).standard_normal((batch, 3, height, width)).astype(np.float32)


# A non-square size for interpolated position embeddings: the 4 x 4 grid resized to 5 x 6.
OTHER_SIZE = (40, 48)


def _hf_outputs(model, pixels, **kwargs):
  with torch.no_grad():
    out = model(pixel_values=torch.as_tensor(pixels), output_hidden_states=True, **kwargs)
  return out


def _assert_same(ours: vision.VisionOutput, theirs) -> None:
  np.testing.assert_allclose(ours.last_hidden_state, theirs.last_hidden_state.numpy(), atol=TOL)
  np.testing.assert_allclose(ours.pooled, theirs.pooler_output.numpy(), atol=TOL)
  assert len(ours.hidden_states) == len(theirs.hidden_states) == TINY["num_hidden_layers"] + 1
  for a, b in zip(ours.hidden_states, theirs.hidden_states):
    np.testing.assert_allclose(a, b.numpy(), atol=TOL)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_tower(request, tmp_path_factory):
  """(variant, HF model, its checkpoint directory, its outputs on `_pixels()`, and on
  `_pixels(2, *OTHER_SIZE)` with interpolated position embeddings)."""
  config_cls, model_cls, extra = VARIANTS[request.param]
  config = getattr(transformers, config_cls)(**TINY, **extra)
  model = getattr(transformers, model_cls)(config).eval()
  randomise_torch(model, seed=len(request.param), weight_scale=0.1)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory)
  return (request.param, model, directory, _hf_outputs(model, _pixels()),
          _hf_outputs(model, _pixels(2, *OTHER_SIZE), interpolate_pos_encoding=True))


def _forward(tower: vision.VisionTower) -> tuple[vision.VisionOutput, vision.VisionOutput]:
  """Both forwards of `hf_tower` in one jit (compiling costs ~2 s; op-by-op eager is ~5x
  slower here)."""
  graphdef, state = nnx.split(tower)

  @jax.jit
  def run(state, pixels, other):
    return (vision.apply(graphdef, state, pixels),
            # Interpolation changes only the embeddings (hidden state 0): no layers needed.
            vision.apply(graphdef, state, other, num_layers=0, interpolate_pos_encoding=True))

  return run(state, _pixels(), _pixels(2, *OTHER_SIZE))


@pytest.fixture(scope="module")
def ours(hf_tower):
  """Our tower loaded from the HF directory and its outputs as in `hf_tower`."""
  tower = vision_ckpt.load_vision_tower(hf_tower[2])
  return (tower, *_forward(tower))


def _flat(tower) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def test_import_matches_transformers(hf_tower, ours):
  name, _, _, theirs, theirs_other = hf_tower
  tower, out, out_other = ours
  assert tower.config.variant == name.split("_")[0]
  assert tower.config.use_head == (name == "siglip_head")
  _assert_same(out, theirs)
  # Bicubic position embeddings, 4 x 4 -> 5 x 6 (CLIP: after its pre-LN).
  assert out_other.hidden_states[0].shape[1] == 30 + (name == "clip")
  np.testing.assert_allclose(out_other.hidden_states[0], theirs_other.hidden_states[0].numpy(),
                             atol=TOL)
  # LLaVA's selection: the second-to-last layer, CLS dropped for CLIP ("default").
  strategy = "default" if name == "clip" else "full"
  want = theirs.hidden_states[-2].numpy()
  np.testing.assert_allclose(vision.select_features(out, -2, strategy),
                             want[:, 1:] if name == "clip" else want, atol=TOL)


def test_export_reloads_in_transformers(hf_tower, ours, tmp_path):
  name, model, _, theirs, _ = hf_tower
  tower = ours[0]
  out = vision_ckpt.save_vision_tower(tower, tmp_path / "export")
  reloaded = getattr(transformers, VARIANTS[name][1]).from_pretrained(out).eval()
  again = _hf_outputs(reloaded, _pixels())
  np.testing.assert_allclose(again.last_hidden_state.numpy(), theirs.last_hidden_state.numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(again.pooler_output.numpy(), theirs.pooler_output.numpy(),
                             atol=1e-6)
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), key)


def test_prefixed_layout_and_nested_config(hf_tower, ours, tmp_path):
  """transformers 4.x wrote "vision_model."-prefixed names; LLaVA nests the vision config."""
  name, _, directory, *_ = hf_tower
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
  tensors["vision_model.embeddings.position_ids"] = np.arange(16)[None]  # an old buffer
  tensors["visual_projection.weight"] = np.zeros((4, 32), np.float32)  # CLIPModel's, not ours
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  vision_config = json.loads((directory / "config.json").read_text())
  outer = "clip" if name == "clip" else "siglip"
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": outer, "vision_config": vision_config, "text_config": {}}))
  # Placed on a (data 1, fsdp 2, tensor 4) mesh as it is read.
  mesh = mesh_lib.create_mesh((1, 2, 4))
  tower = vision_ckpt.load_vision_tower(tmp_path, mesh=mesh)
  assert tower.config == ours[0].config
  assert tower.layers[1].mlp.up_proj.get_value().sharding.spec == P("fsdp", "tensor")
  assert tower.layers[0].attn.q_proj.get_value().sharding.spec == P("fsdp", "tensor", None)
  want = _flat(ours[0])  # the same parameters as the parity-tested import
  for path, value in _flat(tower).items():
    np.testing.assert_array_equal(value, want[path], str(path))


def test_config_defaults_and_errors(tmp_path):
  # A LLaVA config whose vision_config names only what differs from CLIPVisionConfig.
  llava = {"model_type": "llava", "vision_config": {"hidden_size": 1024, "image_size": 336,
                                                     "patch_size": 14, "num_hidden_layers": 24,
                                                     "num_attention_heads": 16,
                                                     "intermediate_size": 4096}}
  config = vision_ckpt.vision_config_from_hf(llava)
  assert (config.variant, config.hidden_act, config.norm_eps, config.num_positions) == (
      "clip", "quick_gelu", 1e-5, 577)
  with pytest.raises(ValueError, match=r"vision_config.*'hidden_size'.*integer"):
    vision_ckpt.vision_config_from_hf({"model_type": "llava", "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 3.5}})
  with pytest.raises(NotImplementedError, match="model_type 'vit'"):
    vision_ckpt.vision_config_from_hf({"model_type": "vit"})


def test_load_errors_name_file_and_tensor(hf_tower, tmp_path):
  directory = hf_tower[2]
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  config = (directory / "config.json").read_text()
  (tmp_path / "config.json").write_text(config)
  bad = dict(tensors)
  bad["encoder.layers.1.mlp.fc1.weight"] = bad["encoder.layers.1.mlp.fc1.weight"][:, :16]
  safetensors.numpy.save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.1\.mlp\.fc1\.weight.*shape"):
    vision_ckpt.load_vision_tower(tmp_path)
  bad = {k: v for k, v in tensors.items() if k != "post_layernorm.bias"}
  bad["encoder.layers.0.extra"] = np.zeros(2, np.float32)
  safetensors.numpy.save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="post_layernorm.bias.*missing"):
    vision_ckpt.load_vision_tower(tmp_path)
  safetensors.numpy.save_file({**tensors, "encoder.layers.0.extra": np.zeros(2, np.float32)},
                              str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected.*encoder\.layers\.0\.extra"):
    vision_ckpt.load_vision_tower(tmp_path)


def test_llava_projector_parity(tmp_path):
  """LLaVA's multi_modal_projector from its config and tensors, both ways."""
  from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
  hf_config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY),
      text_config=transformers.LlamaConfig(hidden_size=48, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           vocab_size=64),
      vision_feature_layer=[-2, -1])
  module = LlavaMultiModalProjector(hf_config).eval()
  randomise_torch(module, seed=7, weight_scale=0.1)
  for prefix in projector_ckpt.PROJECTOR_PREFIXES:
    directory = tmp_path / prefix.rstrip(".")
    directory.mkdir()
    safetensors.numpy.save_file({prefix + k: v.numpy() for k, v in module.state_dict().items()},
                                str(directory / "model.safetensors"))
    raw = hf_config.to_dict()
    (directory / "config.json").write_text(json.dumps(raw))
    config = projector_ckpt.projector_config_from_hf(raw)
    assert (config.in_dim, config.out_dim, config.hidden_act, config.bias) == (
        64, 48, "gelu", True)
    reader = hf.SafetensorsReader(directory)
    ours = projector_ckpt.read_projector_params(reader, config, None, "config.json")
    features = np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)
    with torch.no_grad():
      theirs = module(torch.as_tensor(features)).numpy()
    np.testing.assert_allclose(ours(features), theirs, atol=TOL)
  exported = {k.removeprefix("multi_modal_projector."): torch.as_tensor(v)
              for k, v in projector_ckpt.projector_tensors(ours)}
  fresh = LlavaMultiModalProjector(hf_config).eval()
  fresh.load_state_dict(exported, strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(fresh(torch.as_tensor(features)).numpy(), theirs, atol=1e-6)
