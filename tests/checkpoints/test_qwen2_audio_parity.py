"""Qwen2AudioForConditionalGeneration parity with transformers: logits on audio + text input
(placeholders expanded as the processor does, one clip padded), import of the saved and the
in-memory key layouts, and our export reloaded by transformers.

A tiny random-initialised HF model is saved to a temp dir; every weight is randomised (norms
and biases too: HF's ones and zeros would hide a mis-mapped tensor).
"""

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
from wakea_jax.checkpoints import qwen2_audio  # noqa: E402

TOL = 1e-4
AUDIO = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
             num_mel_bins=16, max_source_positions=12)
TEXT = dict(model_type="qwen2", hidden_size=40, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
AUDIO_TOKEN = 63
FRAMES = 2 * AUDIO["max_source_positions"]


def _inputs():
  """Two rows of 12 tokens: a clip of 13 real frames (3 audio tokens), then a full clip (6).
  The padded clip comes first, so its padding tokens lie between real ones in the scatter's
  source and must be skipped."""
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, AUDIO["num_mel_bins"], FRAMES)).astype(np.float32)
  frame_mask = np.ones((2, FRAMES), np.int64)
  frame_mask[0, 13:] = 0
  a = AUDIO_TOKEN
  ids = np.array([[5] + [a] * 3 + [8, 9, 10, 11, 12, 13, 14, 15],
                  [5, 7] + [a] * 6 + [9, 11, 13, 2]], np.int64)
  return ids, features, frame_mask


def _theirs(model, ids, features, frame_mask):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids), input_features=torch.as_tensor(features),
                 feature_attention_mask=torch.as_tensor(frame_mask),
                 attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, features, frame_mask):
  return nnx.merge(graphdef, state)(ids, features, frame_mask)


def _ours(model, ids, features, frame_mask):
  """Our logits, under one jit."""
  return np.asarray(_forward(*nnx.split(model), ids.astype(np.int32), features,
                             frame_mask.astype(np.int32)))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  config = transformers.Qwen2AudioConfig(audio_config=AUDIO, text_config=TEXT,
                                         audio_token_index=AUDIO_TOKEN)
  model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
  randomise_torch(model, seed=5)
  path = tmp_path_factory.mktemp("qwen2_audio_lm")
  model.save_pretrained(path)
  return path, model


def test_logits_import_and_export(hf_model, tmp_path):
  path, model = hf_model
  ids, features, frame_mask = _inputs()
  theirs = _theirs(model, ids, features, frame_mask)
  ours_model = qwen2_audio.load_qwen2_audio(path)
  assert ours_model.config.audio_token_id == AUDIO_TOKEN
  ours = _ours(ours_model, ids, features, frame_mask)
  assert ours.shape == theirs.shape == (2, 12, TEXT["vocab_size"])
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  # The same checkpoint under transformers 5's in-memory names loads to the same parameters,
  # also with text_config.tie_word_embeddings set: Qwen2-Audio never ties lm_head (HF
  # declares no tied weights), so the stored lm_head is still read.
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  renamed = tmp_path / "renamed"
  renamed.mkdir()
  hf_config = json.loads((path / "config.json").read_text())
  hf_config["text_config"]["tie_word_embeddings"] = True
  (renamed / "config.json").write_text(json.dumps(hf_config))
  safetensors.numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()},
                              str(renamed / "model.safetensors"), metadata={"format": "pt"})
  assert "model.language_model.embed_tokens.weight" in model.state_dict()
  assert "language_model.model.embed_tokens.weight" in tensors
  again = qwen2_audio.load_qwen2_audio(renamed)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(ours_model))
  # Export: transformers reloads it with the same logits.
  qwen2_audio.save_qwen2_audio(ours_model, tmp_path / "export")
  reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
      tmp_path / "export").eval()
  np.testing.assert_allclose(_theirs(reloaded, ids, features, frame_mask), theirs, atol=TOL,
                             rtol=0)


def test_placeholder_count_errors_name_both_counts(hf_model):
  path, _ = hf_model
  model = qwen2_audio.load_qwen2_audio(path)
  ids, features, frame_mask = _inputs()
  ids[0, 3] = 8  # 2 placeholders left for the padded clip's 3 tokens
  with pytest.raises(ValueError, match=r"8 audio placeholder token\(s\) \(id 63\) in input_ids "
                     r"but 9 audio token\(s\) from 2 audio item\(s\)"):
    model.forward(ids, features, frame_mask)


def test_import_errors_name_the_file_and_tensor(hf_model, tmp_path):
  path, _ = hf_model
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  two = np.zeros(2, np.float32)
  for name, edit, match in [
      ("missing", lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"),
       r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight'\] \(1 in all\) missing"),
      ("unknown", lambda t: t.update({"language_model.model.extra.weight": two}),
       r"unexpected tensor\(s\) \['language_model\.model\.extra\.weight'\]"),
      ("orphan", lambda t: t.update({"vision_tower.x": two}),
       r"\['vision_tower\.x'\] .* belong to no part"),
  ]:
    damaged = tmp_path / name
    damaged.mkdir()
    (damaged / "config.json").write_bytes((path / "config.json").read_bytes())
    copy = dict(tensors)
    edit(copy)
    safetensors.numpy.save_file(copy, str(damaged / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
      qwen2_audio.load_qwen2_audio(damaged)
