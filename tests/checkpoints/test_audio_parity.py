"""Audio encoder parity with transformers: Whisper (WhisperModel, WhisperForConditionalGeneration)
and Qwen2-Audio (Qwen2AudioForConditionalGeneration's audio tower and projector), import and
export, and import errors.

Tiny random-initialised HF models are saved to a temp dir; every weight is randomised (norms
and biases too: HF's ones and zeros would hide a mis-mapped tensor).
"""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.masking_utils import create_bidirectional_mask  # noqa: E402
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

from tests.checkpoints.torch_models import randomise_torch  # noqa: E402
from wakea_jax.checkpoints import audio as audio_ckpt  # noqa: E402
from wakea_jax.models.audio import encode  # noqa: E402

TOL = 1e-4
ENCODER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
               num_mel_bins=16, max_source_positions=12)
WHISPER = dict(ENCODER, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48,
               max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, decoder_start_token_id=1)
QWEN2_TEXT = dict(model_type="qwen2", hidden_size=40, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
FRAMES = 2 * ENCODER["max_source_positions"]


def _ours(encoder, features, mask=None):
  graphdef, state = nnx.split(encoder)
  out = encode(graphdef, state, features, mask, output_hidden_states=True)
  return [np.asarray(h) for h in out.hidden_states], np.asarray(out.token_mask)


def _theirs(encoder, features, mask=None):
  with torch.no_grad():
    out = encoder(torch.as_tensor(features), attention_mask=mask, output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def _close(ours, theirs):
  assert len(ours) == len(theirs)
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a.shape == b.shape, (i, a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"hidden state {i}")


def _features(batch: int = 2) -> np.ndarray:
  rng = np.random.default_rng(0)
  return rng.standard_normal((batch, ENCODER["num_mel_bins"], FRAMES)).astype(np.float32)


@pytest.fixture(scope="module")
def qwen2_audio_dir(tmp_path_factory):
  config = transformers.Qwen2AudioConfig(audio_config=ENCODER, text_config=QWEN2_TEXT)
  model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
  randomise_torch(model, seed=3)
  path = tmp_path_factory.mktemp("qwen2_audio")
  model.save_pretrained(path)
  return path, model


@pytest.mark.parametrize("architecture", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_import_and_export(tmp_path, architecture):
  model = getattr(transformers, architecture)(transformers.WhisperConfig(**WHISPER)).eval()
  randomise_torch(model, seed=1)
  model.save_pretrained(tmp_path / "hf")
  theirs_encoder = model.get_encoder()
  x = _features()
  theirs = _theirs(theirs_encoder, x)
  encoder = audio_ckpt.load_audio_encoder(tmp_path / "hf")
  assert not encoder.config.avg_pool and encoder.config.num_tokens == 12
  ours, token_mask = _ours(encoder, x)
  _close(ours, theirs)
  assert token_mask.all()
  # Export: a bare WhisperEncoder directory that transformers reloads with the same outputs,
  # and that we read back to the same parameters.
  audio_ckpt.save_audio_encoder(encoder, tmp_path / "export")
  reloaded = WhisperEncoder.from_pretrained(tmp_path / "export").eval()
  _close(_theirs(reloaded, x), theirs)
  again = audio_ckpt.load_audio_encoder(tmp_path / "export")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(encoder))


def test_qwen2_audio_tower_and_projector(qwen2_audio_dir, tmp_path):
  path, model = qwen2_audio_dir
  tower, projector = model.model.audio_tower, model.model.multi_modal_projector
  x = _features()
  frames = np.ones((2, FRAMES), np.int64)
  frames[1, 13:] = 0  # 13 real frames -> 7 positions -> 3 pooled tokens
  # The 4-D mask Qwen2AudioModel builds for its tower from the frame mask.
  conv_lengths, pooled = tower._get_feat_extract_output_lengths(torch.as_tensor(frames.sum(-1)))
  valid = (torch.arange(ENCODER["max_source_positions"])[None] < conv_lengths[:, None]).long()
  mask = create_bidirectional_mask(config=tower.config, attention_mask=valid,
                                   inputs_embeds=torch.zeros(2, valid.shape[1], 1))
  theirs = _theirs(tower, x, mask)
  unmasked = _theirs(tower, x)
  assert np.max(np.abs(theirs[-1][1] - unmasked[-1][1])) > 1e-2  # the mask matters
  encoder = audio_ckpt.load_audio_encoder(path)
  assert encoder.config.avg_pool and encoder.config.num_tokens == 6
  ours, token_mask = _ours(encoder, x, frames)
  _close(ours, theirs)
  np.testing.assert_array_equal(token_mask.sum(-1), pooled.numpy())
  ours_projector = audio_ckpt.load_audio_projector(path)
  with torch.no_grad():
    projected = projector(torch.as_tensor(theirs[-1])).numpy()
  np.testing.assert_allclose(np.asarray(ours_projector(ours[-1])), projected, atol=TOL, rtol=0)
  assert projected.shape == (2, 6, QWEN2_TEXT["hidden_size"])
  # Export to a bare Qwen2AudioEncoder; the composite's names for a composite exporter.
  audio_ckpt.save_audio_encoder(encoder, tmp_path / "export")
  reloaded = Qwen2AudioEncoder.from_pretrained(tmp_path / "export").eval()
  _close(_theirs(reloaded, x, mask), theirs)
  stored = safetensors.numpy.load_file(str(path / "model.safetensors"))
  exported = {**audio_ckpt.encoder_tensors(encoder, "audio_tower."),
              **audio_ckpt.projector_tensors(ours_projector)}
  assert exported.keys() <= stored.keys()
  for name, value in exported.items():
    np.testing.assert_array_equal(value, stored[name], err_msg=name)


def _damaged_copy(source, target, edit):
  shutil.copytree(source, target)
  tensors = safetensors.numpy.load_file(str(target / "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(target / "model.safetensors"))
  return target


def test_import_errors_name_the_file_and_tensor(qwen2_audio_dir, tmp_path):
  path, _ = qwen2_audio_dir
  bad = _damaged_copy(path, tmp_path / "missing",
                      lambda t: t.pop("audio_tower.layers.1.fc2.bias"))
  with pytest.raises(ValueError, match=r"audio_tower\.layers\.1\.fc2\.bias.*missing"):
    audio_ckpt.load_audio_encoder(bad)

  def reshape(t):
    t["audio_tower.conv1.weight"] = t["audio_tower.conv1.weight"][:, :8]
  bad = _damaged_copy(path, tmp_path / "shape", reshape)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'audio_tower\.conv1\.weight' "
                                       r"has shape \(32, 8, 3\), expected \(32, 16, 3\)"):
    audio_ckpt.load_audio_encoder(bad)

  def extra(t):
    t["audio_tower.layers.0.self_attn.k_proj.bias"] = np.zeros(32, np.float32)
  bad = _damaged_copy(path, tmp_path / "extra", extra)
  with pytest.raises(ValueError, match=r"unexpected audio encoder tensor.*k_proj\.bias"):
    audio_ckpt.load_audio_encoder(bad)

  config = json.loads((path / "config.json").read_text())
  config["audio_config"]["model_type"] = "wav2vec2"
  (tmp_path / "extra" / "config.json").write_text(json.dumps(config))
  with pytest.raises(NotImplementedError, match=r"config\.json: audio_config: model_type "
                                                r"'wav2vec2' is not an audio encoder"):
    audio_ckpt.load_audio_encoder(tmp_path / "extra")


def test_bfloat16_sharded_checkpoint_loads_exactly(qwen2_audio_dir, tmp_path):
  # Released Qwen2-Audio weights are bfloat16 and sharded: both go through the decoder's
  # safetensors reader. Loading only: no forward pass, nothing to compile.
  _, model = qwen2_audio_dir
  tower = model.model.audio_tower
  bf16 = type(model)(model.config).to(torch.bfloat16)
  bf16.load_state_dict(model.state_dict())
  bf16.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  encoder = audio_ckpt.load_audio_encoder(tmp_path, dtype="bfloat16")
  assert encoder.conv2[...].dtype == jax.numpy.bfloat16
  stored = tower.conv2.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(encoder.conv2[...], np.float32),
                                stored.transpose(2, 1, 0))
  projector = audio_ckpt.load_audio_projector(tmp_path)
  np.testing.assert_array_equal(
      np.asarray(projector.bias[...]),
      model.model.multi_modal_projector.linear.bias.detach().to(torch.bfloat16).float().numpy())
