"""LlavaForConditionalGeneration parity with transformers: logits on image + text input
(placeholders expanded as the processor does, three images over two rows), import of the
saved, released and in-memory key layouts, our export reloaded by transformers, and errors.

Two tiny random-initialised HF models are saved to a temp dir: a CLIP tower + Llama LM
(vision_feature_layer -2, strategy "default", untied) and a SigLIP tower with its pooling
head + Qwen2 LM (layers [-3, -1] concatenated, strategy "full", tied embeddings, projector
without bias and with tanh GELU). Every weight is randomised (norms and biases too: HF's ones
and zeros would hide a mis-mapped tensor).
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.checkpoints.torch_models import randomise_torch  # noqa: E402
from wakea_jax.checkpoints import llava  # noqa: E402
from wakea_jax.models.multimodal import expand_placeholders  # noqa: E402

TOL = 1e-4
IMAGE_TOKEN = 63
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8)
LM = dict(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=64)
VARIANTS = {
    "clip_llama": dict(vision_config=dict(model_type="clip_vision_model", **TOWER),
                       text_config=dict(model_type="llama", **LM)),
    "siglip_qwen2": dict(vision_config=dict(model_type="siglip_vision_model",
                                            vision_use_head=True, **TOWER),
                         text_config=dict(model_type="qwen2", tie_word_embeddings=True, **LM),
                         vision_feature_layer=[-3, -1], vision_feature_select_strategy="full",
                         projector_hidden_act="gelu_pytorch_tanh",
                         multimodal_projector_bias=False),
}
TOKENS_PER_IMAGE = (TOWER["image_size"] // TOWER["patch_size"]) ** 2  # 16 (CLIP: CLS dropped)


def _inputs(tokens: int):
  """Two rows of 34 tokens, three images: one in row 0, two in row 1 (the first at its
  start). One placeholder per image expanded to its token count, as HF's processor does."""
  i = IMAGE_TOKEN
  row0 = expand_placeholders(np.array([5, i] + list(range(2, tokens + 3))), i, [tokens])[0]
  row1 = expand_placeholders(np.array([i, 7, i, 10]), i, [tokens, tokens])[0]
  pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
  return np.stack([row0, row1]).astype(np.int64), pixels


def _theirs(model, ids, pixels):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                 attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, pixels):
  return nnx.merge(graphdef, state)(ids, pixels)


def _ours(model, ids, pixels):
  """Our logits, under one jit."""
  return np.asarray(_forward(*nnx.split(model), ids.astype(np.int32), pixels))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """variant -> (directory, HF model), each built and saved once, when first asked for."""
  cache = {}

  def get(variant):
    if variant not in cache:
      config = transformers.LlavaConfig(image_token_index=IMAGE_TOKEN, **VARIANTS[variant])
      model = transformers.LlavaForConditionalGeneration(config).eval()
      randomise_torch(model, seed=7)
      path = tmp_path_factory.mktemp(variant)
      model.save_pretrained(path)
      cache[variant] = path, model
    return cache[variant]

  return get


@pytest.fixture(params=sorted(VARIANTS))
def hf_model(request, saved):
  return saved(request.param)


def test_logits_import_and_export(hf_model, tmp_path):
  path, model = hf_model
  ids, pixels = _inputs(TOKENS_PER_IMAGE)
  theirs = _theirs(model, ids, pixels)
  ours_model = llava.load_llava(path)
  assert ours_model.config.image_tokens == TOKENS_PER_IMAGE
  assert ours_model.config.text.tie_embeddings == model.config.tie_word_embeddings
  ours = _ours(ours_model, ids, pixels)
  assert ours.shape == theirs.shape == (2, 34, LM["vocab_size"])
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  # The same weights under transformers 5's in-memory names load to the same parameters.
  renamed = tmp_path / "renamed"
  renamed.mkdir()
  (renamed / "config.json").write_bytes((path / "config.json").read_bytes())
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  assert "model.language_model.embed_tokens.weight" in state
  safetensors.numpy.save_file(state, str(renamed / "model.safetensors"),
                              metadata={"format": "pt"})
  again = llava.load_llava(renamed)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(ours_model))
  # Export (the released layout, vision_tower.vision_model.*): transformers reloads it with
  # the same logits.
  llava.save_llava(ours_model, tmp_path / "export")
  exported = safetensors.numpy.load_file(str(tmp_path / "export" / "model.safetensors"))
  assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in exported
  assert ("language_model.lm_head.weight" in exported) != model.config.tie_word_embeddings
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / "export").eval()
  np.testing.assert_allclose(_theirs(reloaded, ids, pixels), theirs, atol=TOL, rtol=0)
  if model.config.tie_word_embeddings:  # the export reloaded by us: the released layout
    reread = llava.load_llava(tmp_path / "export")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(reread), nnx.state(ours_model))


def test_placeholder_count_errors_name_both_counts(hf_model):
  path, _ = hf_model
  model = llava.load_llava(path)
  ids, pixels = _inputs(TOKENS_PER_IMAGE)
  ids[0, 3] = 8  # 15 placeholders left for the first image's 16 tokens
  with pytest.raises(ValueError, match=r"47 image placeholder token\(s\) \(id 63\) in "
                     r"input_ids but 48 image token\(s\) from 3 image item\(s\)"):
    model.forward(ids, pixels)


def _damaged(path, tmp_path, name, edit_tensors=None, edit_config=None):
  damaged = tmp_path / name
  damaged.mkdir()
  config = json.loads((path / "config.json").read_text())
  if edit_config:
    edit_config(config)
  (damaged / "config.json").write_text(json.dumps(config))
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  safetensors.numpy.save_file(tensors, str(damaged / "model.safetensors"))
  return damaged


def test_import_errors_name_the_file_and_tensor(saved, tmp_path):
  path, _ = saved("clip_llama")
  two = np.zeros(2, np.float32)
  for name, edit, match in [
      ("missing", lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"),
       r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight'\] \(1 in all\) missing"),
      ("missing_tower", lambda t: t.pop("vision_tower.encoder.layers.0.mlp.fc1.bias"),
       r"\['vision_tower\.encoder\.layers\.0\.mlp\.fc1\.bias'\] \(1 in all\) missing"),
      ("shape", lambda t: t.update({"multi_modal_projector.linear_2.bias": two}),
       r"model\.safetensors: tensor 'multi_modal_projector\.linear_2\.bias' has shape \(2,\), "
       r"expected \(40,\)"),
      ("orphan", lambda t: t.update({"audio_tower.x": two}),
       r"\['audio_tower\.x'\] .* belong to no part of LlavaForConditionalGeneration"),
  ]:
    with pytest.raises(ValueError, match=match):
      llava.load_llava(_damaged(path, tmp_path, name, edit_tensors=edit))
  for name, edit, error, match in [
      ("tower_type", lambda c: c["vision_config"].update(model_type="pixtral"),
       NotImplementedError, r"\(vision_config\): model_type 'pixtral' is not a supported "
       r"vision tower"),
      ("lm_type", lambda c: c["text_config"].update(model_type="mistral"),
       NotImplementedError, r"text_config\.model_type 'mistral' is not a supported language "
       r"model"),
      ("layer", lambda c: c.update(vision_feature_layer=3), ValueError,
       r"vision_feature_layer 3 is out of range for the tower's 3 hidden states"),
      ("token", lambda c: c.update(image_token_id=5), ValueError,
       r"image_token_index 63 and image_token_id 5 differ"),
  ]:
    with pytest.raises(error, match=match):
      llava.load_llava(_damaged(path, tmp_path, name, edit_config=edit))
  # Token pooling is ours alone: such a model has no HF form.
  config = llava.config_from_hf(json.loads((path / "config.json").read_text()))
  pooled = dataclasses.replace(config, projector=dataclasses.replace(config.projector,
                                                                     pool_window=2))
  with pytest.raises(ValueError, match=r"pools tokens \(pool_window=2\); HF's LLaVA has no "):
    llava.config_to_hf(pooled)


def test_released_config_gets_transformers_defaults():
  """llava-1.5-7b's config.json (transformers 4.36) names only the text sizes that differ
  from LlamaConfig's defaults; both readers fill in the same values."""
  released = {
      "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
      "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
      "projector_hidden_act": "gelu", "tie_word_embeddings": False, "vocab_size": 32064,
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5",
                      "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                      "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                        "model_type": "clip_vision_model", "num_attention_heads": 16,
                        "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
  ours = llava.config_from_hf(released)
  theirs = transformers.LlavaConfig(**{k: v for k, v in released.items()
                                       if k != "architectures"})
  text = theirs.text_config
  assert (ours.text.embed_dim, ours.text.mlp_dim, ours.text.num_layers, ours.text.num_heads,
          ours.text.num_kv_heads, ours.text.head_dim, ours.text.vocab_size,
          ours.text.max_seq_len, ours.text.norm_eps) == (
              text.hidden_size, text.intermediate_size, text.num_hidden_layers,
              text.num_attention_heads, text.num_key_value_heads, text.head_dim,
              text.vocab_size, text.max_position_embeddings, text.rms_norm_eps)
  vision = theirs.vision_config
  assert (ours.vision.variant, ours.vision.hidden_act, ours.vision.norm_eps) == (
      "clip", vision.hidden_act, vision.layer_norm_eps)
  assert ours.image_tokens == theirs.image_seq_length == 576
  assert (ours.projector.in_dim, ours.projector.out_dim) == (1024, 4096)
