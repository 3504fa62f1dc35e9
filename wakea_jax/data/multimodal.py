"""Multimodal chat records: validation, tokenisation with media placeholders, model inputs.

A record is a chat record (records.py: `messages`, or `prompt` + `completion`) with media:

  {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                {"role": "assistant", "content": "Red."}],
   "images": ["shapes/0001.png"], "audios": ["clips/0001.wav"]}

`images` / `audios` list the media in the order their placeholders appear in the rendered
chat (the strings `MediaConfig.image_placeholder` / `audio_placeholder`, default `<image>` and
`<audio>`, written in message text). A path is relative to the data file's directory (to the
directory itself for a `datasets` directory). In a `datasets` directory the TRL-style `images`
column may hold the `datasets.Image` feature, which reads as `{"bytes": ..., "path": ...}`
dicts (the bytes are decoded; without bytes the path is read) or PIL images.

`load_source(spec, config)` validates every record when the source is loaded, like
sources.py, and `on_error="skip_and_count"` skips and counts the same way. Besides the chat
checks, an error names the location and the field: a missing or unreadable image or audio
file (`data/x.jsonl:3: field 'images[0]': image file /d/a.png does not exist`), a clip at the
wrong sample rate or longer than the feature extractor's window (Whisper would cut it), media
of a modality the run has no encoder for, and a placeholder count that differs from the media
count (both named). With `MediaConfig.decode_on_load=False` only existence is checked then
(large sets), and an unreadable file fails when its example is decoded, naming it.

Tokenisation (`tokenize`) renders the chat with chat.py, spans and loss mask included, and
splits every span at the placeholder strings: each becomes ONE placeholder id (the model's
`image_token_id` / `audio_token_id`), then `models.multimodal.expand_placeholders` repeats it
to the item's token count (`VisionLanguageConfig.image_tokens` per image; for a clip,
`models.audio.output_lengths` of its real mel frames), the loss mask alongside and 0 on every
media position. The text around a placeholder is encoded on each side separately, as with
HF processors, where the placeholder is a special token.

`to_model_inputs` (and the grain `MapTransform` `ModelInputs`, so decoding runs in grain's
workers) decodes the media and returns `input_ids`, `loss_mask`, `pixel_values` [n, 3, H, W]
(data/images.py) and/or `input_features` [n, mels, frames] + `feature_attention_mask`
[n, frames] (data/audio.py), the arrays `VisionLanguageModel` / `AudioLanguageModel` take.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from wakea_jax.data import chat, dataset_dirs
from wakea_jax.data.audio import FeatureConfig, load_audio, log_mel_features
from wakea_jax.data.config import ON_ERROR
from wakea_jax.data.images import ImageConfig, load_image, preprocess_batch
from wakea_jax.data.records import Record, to_record, type_name
from wakea_jax.data.sources import Source, raw_records, validate_all
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.models.audio import output_lengths
from wakea_jax.models.multimodal import expand_placeholders

MEDIA_FIELDS = ("images", "audios")


@dataclasses.dataclass(frozen=True)
class MediaConfig:
  """How media records are read and tokenised for one model.

  A modality is enabled by its preprocessing config (`image` / `audio`) together with its
  placeholder token id; a record with media of a disabled modality is an error.
  image_tokens     placeholder tokens per image (`VisionLanguageConfig.image_tokens`).
  audio_avg_pool   the audio tower pools (Qwen2-Audio; `AudioEncoderConfig.avg_pool`).
  resample_audio   resample clips at another rate (`load_audio(resample_to_config=True)`)
                   instead of refusing them.
  decode_on_load   decode every file when the source is loaded (else only check it exists).
  """

  image: ImageConfig | None = None
  image_token_id: int | None = None
  image_tokens: int = 0
  audio: FeatureConfig | None = None
  audio_token_id: int | None = None
  audio_avg_pool: bool = True
  image_placeholder: str = "<image>"
  audio_placeholder: str = "<audio>"
  resample_audio: bool = False
  decode_on_load: bool = True

  def __post_init__(self) -> None:
    if not self.image_placeholder or not self.audio_placeholder:
      raise ValueError("MediaConfig placeholders must be non-empty strings")
    if self.image_placeholder in self.audio_placeholder or (
        self.audio_placeholder in self.image_placeholder):
      raise ValueError(f"placeholders {self.image_placeholder!r} and {self.audio_placeholder!r} "
                       "must not contain each other")
    if (self.image is None) != (self.image_token_id is None):
      raise ValueError("MediaConfig: give both image and image_token_id, or neither")
    if (self.audio is None) != (self.audio_token_id is None):
      raise ValueError("MediaConfig: give both audio and audio_token_id, or neither")
    if self.image is not None and self.image_tokens < 1:
      raise ValueError(f"MediaConfig.image_tokens must be >= 1, got {self.image_tokens}")
    if self.image_token_id is not None and self.image_token_id == self.audio_token_id:
      raise ValueError(f"image and audio placeholder ids are both {self.image_token_id}")

  @classmethod
  def for_vision(cls, model: Any, image: ImageConfig, **kwargs: Any) -> MediaConfig:
    """For a `VisionLanguageConfig` (its image_token_id and image_tokens)."""
    return cls(image=image, image_token_id=model.image_token_id,
               image_tokens=model.image_tokens, **kwargs)

  @classmethod
  def for_audio(cls, model: Any, audio: FeatureConfig, **kwargs: Any) -> MediaConfig:
    """For an `AudioLanguageConfig` (its audio_token_id and the tower's pooling)."""
    return cls(audio=audio, audio_token_id=model.audio_token_id,
               audio_avg_pool=model.audio.avg_pool, **kwargs)

  def placeholders(self) -> dict[str, str]:
    """Media field -> its placeholder string."""
    return {"images": self.image_placeholder, "audios": self.audio_placeholder}


class MultimodalSource(Source):
  """A `Source` whose items also carry `"images"` and `"audios"`: resolved paths (str) or
  `{"bytes": ...}` dicts, in placeholder order."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = super().__getitem__(index)
    record = self.records[index]
    item["images"] = record.get("images", [])
    item["audios"] = record.get("audios", [])
    return item


# ------------------------------------------------------------------------------------------
# Reading one media item
# ------------------------------------------------------------------------------------------


def _image_ref(value: Any, base: pathlib.Path, where: str, field: str) -> str | dict[str, bytes]:
  """A path (resolved against `base`) or {"bytes": ...}; PIL images are stored as PNG bytes."""
  if isinstance(value, Image.Image):
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue()}
  if isinstance(value, Mapping):
    data = value.get("bytes")
    if data is not None:
      if not isinstance(data, bytes | bytearray) or not data:
        raise ValueError(f"{where}: field '{field}.bytes' must be non-empty bytes, got "
                         f"{type_name(data)}")
      return {"bytes": bytes(data)}
    value = value.get("path")
    field = f"{field}.path"
  return _path_ref(value, base, where, field)


def _path_ref(value: Any, base: pathlib.Path, where: str, field: str) -> str:
  if not isinstance(value, str) or not value:
    raise ValueError(f"{where}: field '{field}' must be a file path, got {type_name(value)}")
  return os.fspath(base / value)


def _decode_image(ref: str | Mapping[str, bytes], where: str, field: str) -> Image.Image:
  try:
    if isinstance(ref, str):
      return load_image(ref)
    with Image.open(io.BytesIO(ref["bytes"])) as image:
      image.load()
      return image.copy()
  except FileNotFoundError as err:
    raise ValueError(f"{where}: field '{field}': {err}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
    what = "" if isinstance(ref, str) else "the stored bytes are not a readable image: "
    raise ValueError(f"{where}: field '{field}': {what}{err}") from None


def _decode_audio(path: str, config: MediaConfig, where: str, field: str) -> np.ndarray:
  assert config.audio is not None
  try:
    samples = load_audio(path, config.audio, resample_to_config=config.resample_audio)
  except (FileNotFoundError, ValueError) as err:
    raise ValueError(f"{where}: field '{field}': {err}") from None
  if samples.shape[0] > config.audio.n_samples:
    raise ValueError(
        f"{where}: field '{field}': {path} is {samples.shape[0] / config.audio.sampling_rate:.2f}"
        f" s long, longer than the feature extractor's {config.audio.chunk_length} s window "
        "(the rest would be cut off); split the clip")
  return samples


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def to_multimodal_record(raw: Any, where: str, base: str | os.PathLike[str],
                         config: MediaConfig) -> Record:
  """Validates one raw record (chat, media files, placeholder counts); returns the chat
  record (records.py) plus "images" / "audios" as resolved refs. Raises ValueError starting
  with `where` and naming the field."""
  record = to_record(raw, where)
  base = pathlib.Path(base)
  messages = record.get("messages", record.get("prompt", []) + record.get("completion", []))
  text = chat.render_text(messages, tools=record.get("tools"))
  for field, placeholder in config.placeholders().items():
    values = raw.get(field)
    if values is None:
      values = []
    if not isinstance(values, list):
      raise ValueError(f"{where}: field '{field}' must be a list, got {type_name(values)}")
    found = text.count(placeholder)
    if found != len(values):
      raise ValueError(f"{where}: the messages have {found} {placeholder!r} placeholder(s) but "
                       f"field '{field}' lists {len(values)} item(s); write one placeholder "
                       "per item, in order")
    if not values:
      continue
    enabled = config.image if field == "images" else config.audio
    if enabled is None:
      raise ValueError(f"{where}: field '{field}' has {len(values)} item(s) but this run has "
                       f"no {field[:-1]} encoder configured")
    refs: list[Any] = []
    for k, value in enumerate(values):
      item = f"{field}[{k}]"
      if field == "images":
        ref = _image_ref(value, base, where, item)
        if config.decode_on_load:
          _decode_image(ref, where, item)
      else:
        ref = _path_ref(value, base, where, item)
        if config.decode_on_load:
          _decode_audio(ref, config, where, item)
      if isinstance(ref, str) and not config.decode_on_load and not os.path.isfile(ref):
        raise ValueError(f"{where}: field '{item}': file {ref} does not exist")
      refs.append(ref)
    record[field] = refs
  return record


def load_source(spec: str | os.PathLike[str], config: MediaConfig, *,
                on_error: str = "raise") -> MultimodalSource:
  """Loads and validates a .jsonl/.json/.parquet file or a `datasets` directory of media
  records (see the module docstring)."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  path, _ = dataset_dirs.split_spec(spec)
  base = path if path.is_dir() else path.parent
  records, origins, skipped = validate_all(
      raw_records(spec), lambda raw, where: to_multimodal_record(raw, where, base, config),
      name=os.fspath(spec), on_error=on_error)
  return MultimodalSource(os.fspath(spec), records, origins, skipped)


# ------------------------------------------------------------------------------------------
# Tokenisation
# ------------------------------------------------------------------------------------------


def tokenize(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, config: MediaConfig,
             *, tools: Sequence[Mapping[str, Any]] | None = None,
             add_generation_prompt: bool = False,
             template_kwargs: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32 [t], loss_mask int32 [t]) of the chat, each placeholder string one
  placeholder id (mask 0), not yet expanded. `chat.render` otherwise: same spans, same
  encoding of trusted and untrusted text."""
  ids_of = {}
  if config.image_token_id is not None:
    ids_of[config.image_placeholder] = config.image_token_id
  if config.audio_token_id is not None:
    ids_of[config.audio_placeholder] = config.audio_token_id
  # pylint: disable=protected-access  (chat's span renderer; one package)
  spans = chat._chat_spans(messages, tokenizer, tools, add_generation_prompt, template_kwargs)
  pattern = chat._plan(tokenizer).control_pattern
  split = (re.compile("|".join(re.escape(p) for p in sorted(ids_of, key=len, reverse=True)))
           if ids_of else None)
  ids: list[int] = []
  mask: list[int] = []

  def encode(text: str, trusted: bool, train: bool) -> None:
    piece = (tokenizer.encode(text) if trusted
             else chat._encode_untrusted(tokenizer, text, pattern))
    clash = set(piece) & set(ids_of.values())
    if clash:
      raise ValueError(f"the text {text[:60]!r} encodes to the placeholder id(s) "
                       f"{sorted(clash)}; placeholder ids must be dedicated tokens")
    ids.extend(piece)
    mask.extend([int(train)] * len(piece))

  for span in spans:
    pos = 0
    for match in (split.finditer(span.text) if split is not None else ()):
      if match.start() > pos:
        encode(span.text[pos:match.start()], span.trusted, span.train)
      ids.append(ids_of[match.group()])
      mask.append(0)
      pos = match.end()
    if pos < len(span.text):
      encode(span.text[pos:], span.trusted, span.train)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def audio_token_counts(feature_attention_mask: np.ndarray, config: MediaConfig) -> np.ndarray:
  """Placeholder tokens per clip [n] from the clips' real mel frames [n, frames]."""
  frames = np.asarray(feature_attention_mask).astype(np.int64).sum(-1)
  return np.asarray(output_lengths(frames, avg_pool=config.audio_avg_pool), np.int64)


def expand(input_ids: np.ndarray, loss_mask: np.ndarray, config: MediaConfig, *,
           image_count: int = 0, audio_token_counts: Sequence[int] | np.ndarray = ()
           ) -> tuple[np.ndarray, np.ndarray]:
  """Each single placeholder id -> its item's token count of ids; the loss mask alongside,
  forced to 0 on every media position."""
  ids, mask = np.asarray(input_ids), np.asarray(loss_mask)
  if config.image_token_id is not None:
    ids, mask = expand_placeholders(ids, config.image_token_id,
                                    [config.image_tokens] * image_count, mask)
  elif image_count:
    raise ValueError(f"{image_count} image(s) but no image_token_id configured")
  if config.audio_token_id is not None:
    ids, mask = expand_placeholders(ids, config.audio_token_id, audio_token_counts, mask)
  elif len(audio_token_counts):
    raise ValueError(f"{len(audio_token_counts)} clip(s) but no audio_token_id configured")
  media = np.isin(ids, [i for i in (config.image_token_id, config.audio_token_id)
                        if i is not None])
  return ids.astype(np.int32), np.where(media, 0, mask).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Model inputs
# ------------------------------------------------------------------------------------------


def decode_media(item: Mapping[str, Any], config: MediaConfig) -> dict[str, Any]:
  """One `MultimodalSource` item's media, decoded and preprocessed (its messages are not
  tokenised): `origin`, then `pixel_values` float32 [n_images, 3, H, W] when images are
  configured, `input_features` float32 [n_clips, mels, frames] and `feature_attention_mask`
  int32 [n_clips, frames] when audio is. Errors start with the origin and name the field."""
  where = item.get("origin", "<record>")
  images = list(item.get("images") or [])
  audios = list(item.get("audios") or [])
  out: dict[str, Any] = {"origin": where}
  if config.image is not None:
    decoded = [_decode_image(ref, where, f"images[{k}]") for k, ref in enumerate(images)]
    try:
      out["pixel_values"] = preprocess_batch(decoded, config.image)
    except ValueError as err:
      raise ValueError(f"{where}: field 'images': {err}") from None
  if config.audio is not None:
    clips = [_decode_audio(ref, config, where, f"audios[{k}]") for k, ref in enumerate(audios)]
    if clips:
      features, frame_mask = log_mel_features(clips, config.audio)
    else:
      features = np.zeros((0, config.audio.feature_size, config.audio.num_frames), np.float32)
      frame_mask = np.zeros((0, config.audio.num_frames), np.int32)
    out["input_features"], out["feature_attention_mask"] = features, frame_mask
  return out


def to_model_inputs(item: Mapping[str, Any], tokenizer: Tokenizer, config: MediaConfig
                    ) -> dict[str, Any]:
  """One `MultimodalSource` item -> the model's inputs (decoding its media here).

  input_ids, loss_mask   int32 [t], placeholders expanded, loss 0 on media positions
  pixel_values           float32 [n_images, 3, H, W]   (when images are configured)
  input_features         float32 [n_clips, mels, frames] (when audio is configured)
  feature_attention_mask int32 [n_clips, frames]
  origin                 the record's location
  Errors start with the origin and name the field."""
  out = decode_media(item, config)
  counts: np.ndarray = np.zeros((0,), np.int64)
  if config.audio is not None:
    counts = audio_token_counts(out["feature_attention_mask"], config)
  out.update(tokenize_item(item, tokenizer, config, audio_token_counts=counts))
  return out


def tokenize_item(item: Mapping[str, Any], tokenizer: Tokenizer, config: MediaConfig, *,
                  audio_token_counts: Sequence[int] | np.ndarray = ()) -> dict[str, Any]:
  """One `MultimodalSource` item's `input_ids` and `loss_mask` (int32 [t], placeholders
  expanded: `image_tokens` per image, `audio_token_counts` per clip) without decoding its
  media, e.g. when the batch carries cached encoder features. Errors start with the origin."""
  where = item.get("origin", "<record>")
  images = list(item.get("images") or [])
  out: dict[str, Any] = {}
  counts = audio_token_counts
  try:
    ids, mask = tokenize(item["messages"], tokenizer, config, tools=item.get("tools"))
    num_prompt = int(item.get("num_prompt_messages") or 0)
    if num_prompt:
      # Completion-only loss, as pipeline.py: the prompt rendered with its generation prompt
      # is the prefix before the completion; its own assistant turns are context.
      prompt_ids, _ = tokenize(item["messages"][:num_prompt], tokenizer, config,
                               tools=item.get("tools"), add_generation_prompt=True)
      if not np.array_equal(ids[:len(prompt_ids)], prompt_ids):
        raise ValueError("the rendered prompt is not a prefix of the rendered conversation; "
                         "cannot mask the prompt")
      mask[:len(prompt_ids)] = 0
    out["input_ids"], out["loss_mask"] = expand(ids, mask, config, image_count=len(images),
                                                audio_token_counts=counts)
  except ValueError as err:
    raise ValueError(f"{where}: {err}") from None
  return out


class ModelInputs(grain.transforms.Map):
  """`to_model_inputs` as a grain transform, so media decode in grain's worker processes."""

  def __init__(self, tokenizer: Tokenizer, config: MediaConfig) -> None:
    self.tokenizer = tokenizer
    self.config = config

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    """One source item -> model inputs."""
    return to_model_inputs(element, self.tokenizer, self.config)


__all__ = ["MEDIA_FIELDS", "MediaConfig", "ModelInputs", "MultimodalSource",
           "audio_token_counts", "decode_media", "expand", "load_source", "to_model_inputs",
           "to_multimodal_record", "tokenize", "tokenize_item"]
