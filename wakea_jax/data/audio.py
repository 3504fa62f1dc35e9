"""Whisper's log-mel front end in NumPy, and WAV reading with the standard library.

`log_mel_features(waveforms, config)` equals transformers' `WhisperFeatureExtractor` (within
float32 rounding): each clip is padded with `padding_value` or truncated to `n_samples`
(`chunk_length` seconds), then

  periodic Hann window of n_fft, hop `hop_length`, centred frames (reflect padding, as
  torch.stft) -> |STFT|^2 -> slaney mel filters (0-8 kHz, slaney norm) -> log10(max(., 1e-10))
  -> drop the last frame -> max(x, max(x) - 8) per clip -> (x + 4) / 4

giving [batch, feature_size, n_samples // hop_length] float32 plus the frame mask (1 for
frames of real audio: every `hop_length`-th sample of the sample mask, as the extractor's
`return_attention_mask`). The formula is Whisper's (arXiv 2212.04356; openai/whisper
`audio.py log_mel_spectrogram`). `FeatureConfig.from_json` reads a `preprocessor_config.json`.

`read_wav(path)` reads 16-bit PCM WAV (mono, or several channels averaged to mono) into
float32 in [-1, 1); `load_audio(path, config)` also checks the sample rate: a different rate
is an error naming the file, unless `resample=True` asks for a polyphase resample
(scipy.signal.resample_poly). Every error names the file.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import wave
from collections.abc import Sequence

import numpy as np

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """The fields of a Whisper `preprocessor_config.json` the features depend on."""

  feature_size: int = 80
  sampling_rate: int = 16_000
  hop_length: int = 160
  chunk_length: int = 30
  n_fft: int = 400
  padding_value: float = 0.0

  def __post_init__(self) -> None:
    for name in ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"FeatureConfig.{name} must be a positive int, got {value!r}")

  @property
  def n_samples(self) -> int:
    """Samples per clip after padding/truncation: chunk_length seconds."""
    return self.chunk_length * self.sampling_rate

  @property
  def num_frames(self) -> int:
    """Mel frames per clip (the extractor's `nb_max_frames`)."""
    return self.n_samples // self.hop_length

  @classmethod
  def from_json(cls, path: PathLike) -> FeatureConfig:
    """Reads a `preprocessor_config.json`; errors name the file and the field."""
    try:
      raw = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    kind = raw.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
      raise ValueError(f"{path}: field 'feature_extractor_type' is {kind!r}; only "
                       "'WhisperFeatureExtractor' is supported")
    if raw.get("dither", 0.0) != 0.0:
      raise ValueError(f"{path}: field 'dither' is {raw['dither']!r}; random dithering is not "
                       "supported (features must be deterministic)")
    if raw.get("padding_side", "right") != "right":
      raise ValueError(f"{path}: field 'padding_side' is {raw['padding_side']!r}; only "
                       "'right' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
      config = cls(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: {e}") from None
    for derived in ("n_samples", "nb_max_frames"):
      ours = config.n_samples if derived == "n_samples" else config.num_frames
      if derived in raw and raw[derived] != ours:
        raise ValueError(f"{path}: field '{derived}' is {raw[derived]!r} but chunk_length, "
                         f"sampling_rate and hop_length give {ours}")
    return config


# ------------------------------------------------------------------------------------------
# Mel filters (slaney scale and norm, as librosa / transformers.audio_utils.mel_filter_bank)
# ------------------------------------------------------------------------------------------

_MIN_LOG_HZ, _MIN_LOG_MEL, _LOGSTEP = 1000.0, 15.0, 27.0 / math.log(6.4)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  mel = 3.0 * hz / 200.0
  log = hz >= _MIN_LOG_HZ
  return np.where(log, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) * _LOGSTEP,
                  mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  hz = 200.0 * mel / 3.0
  return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp((mel - _MIN_LOG_MEL) / _LOGSTEP), hz)


@functools.lru_cache(maxsize=8)
def mel_filters(n_fft: int, n_mels: int, sampling_rate: int, max_hz: float = 8000.0
                ) -> np.ndarray:
  """Triangular slaney-normalised filters [n_fft // 2 + 1, n_mels] (float64, read-only)."""
  mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(max_hz), n_mels + 2)
  hz_points = _mel_to_hz(mel_points)
  fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
  slopes = hz_points[None, :] - fft_freqs[:, None]
  down = -slopes[:, :-2] / np.diff(hz_points)[:-1]
  up = slopes[:, 2:] / np.diff(hz_points)[1:]
  filters = np.maximum(0.0, np.minimum(down, up))
  filters *= 2.0 / (hz_points[2:n_mels + 2] - hz_points[:n_mels])[None, :]
  filters.setflags(write=False)
  return filters


# ------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------


def log_mel_spectrogram(waveform: np.ndarray, config: FeatureConfig) -> np.ndarray:
  """Whisper log-mel of one (already padded) clip [samples] -> [feature_size, samples // hop].

  Float64 STFT and mel products, float32 out (torch computes in float32; the two agree to
  ~1e-5 after the log).
  """
  n_fft, hop = config.n_fft, config.hop_length
  x = np.asarray(waveform, np.float64)
  if x.ndim != 1:
    raise ValueError(f"a waveform must be 1-D [samples], got shape {x.shape}")
  if x.shape[0] <= n_fft // 2:
    raise ValueError(f"a waveform of {x.shape[0]} samples is too short for n_fft {n_fft}")
  x = np.pad(x, n_fft // 2, mode="reflect")                  # torch.stft(center=True)
  num = 1 + (x.shape[0] - n_fft) // hop
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop][:num]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)   # periodic Hann
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2          # [frames, freqs]
  mel = power[:-1] @ mel_filters(n_fft, config.feature_size, config.sampling_rate)
  log_spec = np.log10(np.maximum(mel, 1e-10)).T                       # [mels, frames]
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)


def pad_or_trim(waveform: np.ndarray, config: FeatureConfig) -> tuple[np.ndarray, int]:
  """(the clip padded with padding_value or cut to n_samples, its real sample count)."""
  x = np.asarray(waveform, np.float32).reshape(-1)
  n = min(x.shape[0], config.n_samples)
  out = np.full(config.n_samples, config.padding_value, np.float32)
  out[:n] = x[:n]
  return out, n


def log_mel_features(waveforms: Sequence[np.ndarray] | np.ndarray, config: FeatureConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
  """WhisperFeatureExtractor(waveforms, return_attention_mask=True) for mono clips at
  `config.sampling_rate`: (input_features [b, feature_size, num_frames] float32,
  attention_mask [b, num_frames] int32)."""
  if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
    waveforms = [waveforms]
  features, masks = [], []
  for waveform in waveforms:
    padded, n = pad_or_trim(waveform, config)
    features.append(log_mel_spectrogram(padded, config))
    sample_mask = np.arange(config.n_samples) < n
    # The extractor keeps every hop-th sample of the sample mask, minus the last when the
    # clip is not a whole number of hops (its STFT's dropped frame).
    frame_mask = sample_mask[::config.hop_length][:config.num_frames]
    masks.append(frame_mask.astype(np.int32))
  return np.stack(features), np.stack(masks)


# ------------------------------------------------------------------------------------------
# WAV files
# ------------------------------------------------------------------------------------------


def read_wav(path: PathLike, data: bytes | None = None) -> tuple[np.ndarray, int]:
  """(samples [n] float32 in [-1, 1), sample rate) of a 16-bit PCM WAV file; several channels
  are averaged to mono. Raises ValueError naming the file for anything else (8/24/32-bit or
  float samples, compressed data, a damaged or truncated file), FileNotFoundError if absent.
  With `data`, the WAV file's bytes (e.g. sent to the server), `path` only names them."""
  if data is None:
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: audio file not found")
  try:
    with wave.open(str(path) if data is None else io.BytesIO(data), "rb") as f:
      channels, width, rate, count = (f.getnchannels(), f.getsampwidth(), f.getframerate(),
                                      f.getnframes())
      if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is supported "
                         "(convert it, e.g. `ffmpeg -i IN -c:a pcm_s16le OUT.wav`)")
      frames = f.readframes(count)
  except (wave.Error, EOFError) as e:
    raise ValueError(f"{path}: not a readable PCM WAV file ({e}); only 16-bit PCM WAV is "
                     "supported") from e
  if channels < 1 or rate <= 0:
    raise ValueError(f"{path}: invalid WAV header ({channels} channels, {rate} Hz)")
  if len(frames) != count * channels * width:
    raise ValueError(f"{path}: truncated WAV file: the header declares {count} frames, the "
                     f"data holds {len(frames) // (channels * width)}")
  samples = np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
  return samples.reshape(-1, channels).mean(axis=1, dtype=np.float32), rate


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
  """Polyphase resampling (scipy.signal.resample_poly, Kaiser-windowed FIR) to target_rate."""
  from scipy import signal  # only for this opt-in path
  g = math.gcd(rate, target_rate)
  return signal.resample_poly(samples, target_rate // g, rate // g).astype(np.float32)


def load_audio(path: PathLike, config: FeatureConfig, *, resample_to_config: bool = False,
               data: bytes | None = None) -> np.ndarray:
  """Mono float32 samples of the WAV file `path` at `config.sampling_rate` (with `data`, of
  those WAV bytes, `path` naming them, as `read_wav`).

  A different sample rate is a ValueError naming the file, unless `resample_to_config=True`
  asks for a polyphase resample (which changes the signal; opt in knowingly).
  """
  samples, rate = read_wav(path, data)
  if rate == config.sampling_rate:
    return samples
  if not resample_to_config:
    raise ValueError(f"{path}: sample rate is {rate} Hz, but the feature extractor expects "
                     f"{config.sampling_rate} Hz; resample the file (or pass "
                     "resample_to_config=True for a polyphase resample)")
  return resample(samples, rate, config.sampling_rate)


def write_wav(path: PathLike, samples: np.ndarray, rate: int) -> None:
  """Writes float samples in [-1, 1] ([n] mono or [n, channels]) as 16-bit PCM WAV."""
  x = np.asarray(samples, np.float64)
  x = x[:, None] if x.ndim == 1 else x
  pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
  with wave.open(str(path), "wb") as f:
    f.setnchannels(x.shape[1])
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(pcm.tobytes())


__all__ = ["FeatureConfig", "load_audio", "log_mel_features", "log_mel_spectrogram",
           "mel_filters", "pad_or_trim", "read_wav", "resample", "write_wav"]

