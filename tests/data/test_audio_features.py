"""Whisper log-mel features against transformers' WhisperFeatureExtractor, the preprocessor
config, and WAV reading: good files, and bad ones whose errors name the file."""

import json
import wave

import numpy as np
import pytest

from wakea_jax.data.audio import (
  FeatureConfig,
  load_audio,
  log_mel_features,
  mel_filters,
  read_wav,
  write_wav,
)

RATE = 16_000


def _clips(seconds: float) -> list[np.ndarray]:
  """A tone, a chirp, noise, near-silence and a clip longer than the window (truncated)."""
  rng = np.random.default_rng(0)
  t = np.arange(int(RATE * (seconds + 0.7))) / RATE
  return [
      (0.5 * np.sin(2 * np.pi * 440.0 * t[:RATE // 2])).astype(np.float32),
      (0.3 * np.sin(2 * np.pi * (200.0 + 2000.0 * t[:12_345]) * t[:12_345])).astype(np.float32),
      (0.1 * rng.standard_normal(3_001)).astype(np.float32),
      np.zeros(300, np.float32),
      (0.3 * rng.standard_normal(t.shape[0])).astype(np.float32),
  ]


@pytest.mark.parametrize("feature_size,chunk_length", [(80, 2), (128, 1)])
def test_log_mel_equals_whisper_feature_extractor(feature_size, chunk_length, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")  # the extractor's torch STFT path, the one users get
  extractor = transformers.WhisperFeatureExtractor(feature_size=feature_size,
                                                   chunk_length=chunk_length)
  extractor.save_pretrained(tmp_path)
  config = FeatureConfig.from_json(tmp_path / "preprocessor_config.json")
  assert config == FeatureConfig(feature_size=feature_size, chunk_length=chunk_length)
  np.testing.assert_allclose(mel_filters(400, feature_size, RATE), extractor.mel_filters,
                             atol=1e-12)
  clips = _clips(chunk_length)
  theirs = extractor(clips, sampling_rate=RATE, return_attention_mask=True, return_tensors="np")
  features, mask = log_mel_features(clips, config)
  assert features.shape == theirs["input_features"].shape == (5, feature_size,
                                                              100 * chunk_length)
  assert features.dtype == np.float32
  # float32 torch STFT vs our float64 one: ~3e-5 at most after the log.
  np.testing.assert_allclose(features, theirs["input_features"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(mask, theirs["attention_mask"])
  assert mask[0].sum() == 50 and mask[-1].all()


def test_frame_mask_of_a_window_that_is_not_whole_hops():
  config = FeatureConfig(feature_size=16, chunk_length=1, hop_length=150)
  features, mask = log_mel_features(np.ones(1000, np.float32) * 0.1, config)
  assert features.shape == (1, 16, 106) and mask.shape == (1, 106)
  assert mask.sum() == 7  # samples 0, 150, ..., 900


def test_preprocessor_config_errors(tmp_path):
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps({"feature_extractor_type": "WhisperFeatureExtractor",
                              "feature_size": 80, "dither": 0.1}))
  with pytest.raises(ValueError, match=f"{path}: field 'dither'"):
    FeatureConfig.from_json(path)
  path.write_text(json.dumps({"feature_size": "80"}))
  with pytest.raises(ValueError, match=f"{path}: FeatureConfig.feature_size must be"):
    FeatureConfig.from_json(path)
  path.write_text(json.dumps({"chunk_length": 30, "n_samples": 16000}))
  with pytest.raises(ValueError, match="field 'n_samples' is 16000 but .* give 480000"):
    FeatureConfig.from_json(path)


def test_wav_mono_stereo_and_resampling(tmp_path):
  t = np.arange(RATE // 4) / RATE
  tone = 0.5 * np.sin(2 * np.pi * 300.0 * t)
  write_wav(tmp_path / "mono.wav", tone, RATE)
  samples, rate = read_wav(tmp_path / "mono.wav")
  assert rate == RATE and samples.dtype == np.float32
  np.testing.assert_allclose(samples, tone, atol=1 / 32768)
  write_wav(tmp_path / "stereo.wav", np.stack([tone, 0.5 * tone], axis=1), RATE)
  np.testing.assert_allclose(read_wav(tmp_path / "stereo.wav")[0], 0.75 * tone, atol=1 / 32768)
  config = FeatureConfig(feature_size=16, chunk_length=1)
  assert load_audio(tmp_path / "mono.wav", config).shape == (RATE // 4,)
  # Another rate: a clear error by default, a polyphase resample when asked for.
  t8 = np.arange(8_000 // 4) / 8_000
  write_wav(tmp_path / "8k.wav", 0.5 * np.sin(2 * np.pi * 300.0 * t8), 8_000)
  with pytest.raises(ValueError, match=r"8k\.wav: sample rate is 8000 Hz, but the feature "
                                       r"extractor expects 16000 Hz"):
    load_audio(tmp_path / "8k.wav", config)
  resampled = load_audio(tmp_path / "8k.wav", config, resample_to_config=True)
  assert resampled.shape == (RATE // 4,)
  np.testing.assert_allclose(resampled[200:-200], tone[200:-200], atol=0.02)


def test_bad_wav_files_name_the_file(tmp_path):
  eight_bit = tmp_path / "eight_bit.wav"
  with wave.open(str(eight_bit), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(1)
    f.setframerate(RATE)
    f.writeframes(bytes(range(100)))
  with pytest.raises(ValueError, match=r"eight_bit\.wav: 8-bit samples; only 16-bit PCM"):
    read_wav(eight_bit)
  good = tmp_path / "good.wav"
  write_wav(good, np.zeros(1000), RATE)
  truncated = tmp_path / "truncated.wav"
  truncated.write_bytes(good.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"truncated\.wav: truncated WAV file: the header "
                                       r"declares 1000 frames, the data holds 478"):
    read_wav(truncated)
  not_wav = tmp_path / "notes.wav"
  not_wav.write_text("not audio")
  with pytest.raises(ValueError, match=r"notes\.wav: not a readable PCM WAV file"):
    read_wav(not_wav)
  with pytest.raises(FileNotFoundError, match=r"absent\.wav: audio file not found"):
    read_wav(tmp_path / "absent.wav")
