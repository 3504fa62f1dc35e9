"""The sample binary with --image / --audio: a LLaVA or Qwen2-Audio directory (config.json +
preprocessor_config.json), the bundled tokenizer, media prefilled with the prompt."""

import json

import numpy as np
import pytest
from absl import app
from flax import nnx
from PIL import Image

from tests.randomise import randomise
from wakea_jax import sample
from wakea_jax.checkpoints.llava import save_llava
from wakea_jax.checkpoints.qwen2_audio import save_qwen2_audio
from wakea_jax.data.audio import write_wav
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models.audio import AudioEncoderConfig
from wakea_jax.models.config import get_preset
from wakea_jax.models.multimodal import (
    AudioLanguageConfig,
    AudioLanguageModel,
    VisionLanguageConfig,
    VisionLanguageModel,
)
from wakea_jax.models.projector import ProjectorConfig
from wakea_jax.models.vision import VisionConfig

PLACEHOLDER = 1024            # the first id past the bundled tokenizer's 1024
TEXT = get_preset("tiny", vocab_size=1152, num_layers=1)


def _save(cls, config, save, path):
  model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  randomise(model, seed=1)
  save(model, path)
  return model


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("sample_media") / "llava"
  config = VisionLanguageConfig(
      text=TEXT, vision=VisionConfig(variant="clip", embed_dim=16, mlp_dim=32, num_layers=2,
                                     num_heads=2, image_size=16, patch_size=8),
      projector=ProjectorConfig(in_dim=16, out_dim=TEXT.embed_dim), image_token_id=PLACEHOLDER)
  _save(VisionLanguageModel, config, save_llava, path)
  (path / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
      "crop_size": {"height": 16, "width": 16}}))
  for seed, name in ((0, "a.png"), (1, "b.png")):
    image = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)
    Image.fromarray(image).save(path.parent / name)
  return path


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("sample_media") / "qwen2_audio"
  config = AudioLanguageConfig(
      text=TEXT.replace(qkv_bias=True),   # Qwen2
      audio=AudioEncoderConfig(num_mel_bins=8, d_model=16, encoder_layers=1,
                               encoder_attention_heads=2, encoder_ffn_dim=32,
                               max_source_positions=8, avg_pool=True),
      audio_token_id=PLACEHOLDER)
  _save(AudioLanguageModel, config, save_qwen2_audio, path)
  (path / "preprocessor_config.json").write_text(json.dumps({
      "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 8,
      "sampling_rate": 16000, "hop_length": 1000, "chunk_length": 1, "n_fft": 400}))
  t = np.arange(9600) / 16000
  write_wav(path.parent / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 16000)
  return path


def _check(transcripts, out, prompt, max_new_tokens):
  assert transcripts[0].startswith(f"user: {prompt}\nassistant: ")
  assert 1 <= len(out.tokens[0]) <= max_new_tokens
  assert all(0 <= t < 1024 for t in out.tokens[0])     # never the placeholder or padded ids
  assert out.num_tool_calls == [0]


def test_sample_with_an_image(llava_dir):
  image = str(llava_dir.parent / "a.png")
  transcripts, out = sample.run(str(llava_dir), ["What is this?"], image_paths=[image],
                                max_new_tokens=5)
  _check(transcripts, out, "What is this?", 5)
  # The image reaches the model: another one gives other log-probs.
  _, other = sample.run(str(llava_dir), ["What is this?"], tools=(), max_new_tokens=5,
                        image_paths=[str(llava_dir.parent / "b.png")])
  assert (other.tokens != out.tokens
          or np.abs(other.logprobs[0] - out.logprobs[0]).max() > 1e-4)
  # The placeholder is put first and expanded to the image's 4 tokens; one written in the
  # prompt is used where it is.
  model = sample.load_checkpoint(str(llava_dir))
  config, _, _ = sample.media_inputs(model, str(llava_dir), [image], [])
  tok = default_tokenizer()
  first = sample.media_prompt_ids("Hi", "", tok, config, images=1,
                                  audio_counts=np.zeros(0))
  inside = sample.media_prompt_ids("Hi <image>", "", tok, config, images=1,
                                   audio_counts=np.zeros(0))
  assert first.count(PLACEHOLDER) == inside.count(PLACEHOLDER) == 4
  assert first.index(PLACEHOLDER) < inside.index(PLACEHOLDER)
  with pytest.raises(app.UsageError, match=r"prompt 0 has 2 '<image>' placeholder\(s\) but 1"):
    sample.run(str(llava_dir), ["<image><image> two?"], image_paths=[image])
  # With tools the image prompt runs in the tool loop: greedy and without a call (a random
  # model), the same tokens as without tools; the image still reaches the model.
  _, looped = sample.run(str(llava_dir), ["What is this?"], image_paths=[image],
                         tools=("calculator",), max_new_tokens=5, max_tool_calls=1,
                         max_tool_tokens=32)
  assert looped.tokens == out.tokens and looped.num_tool_calls == [0]
  np.testing.assert_allclose(looped.logprobs[0], out.logprobs[0], atol=1e-5)
  with pytest.raises(app.UsageError, match="--audio needs an audio-language checkpoint"):
    sample.run(str(llava_dir), ["x"], audio_paths=[image])


def test_sample_with_audio(audio_dir, tmp_path):
  clip = str(audio_dir.parent / "a.wav")
  transcripts, out = sample.run(str(audio_dir), ["Describe <audio> please."],
                                audio_paths=[clip], max_new_tokens=5)
  _check(transcripts, out, "Describe <audio> please.", 5)
  with pytest.raises(app.UsageError, match="--image needs a vision-language checkpoint"):
    sample.run(str(audio_dir), ["x"], image_paths=[clip])
  # Without its preprocessor_config.json: an error naming the file.
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in audio_dir.iterdir():
    if f.name != "preprocessor_config.json":
      (bare / f.name).symlink_to(f)
  with pytest.raises(FileNotFoundError, match=r"--audio: .*bare/preprocessor_config.json is "
                                              "missing"):
    sample.run(str(bare), ["x"], audio_paths=[clip])
