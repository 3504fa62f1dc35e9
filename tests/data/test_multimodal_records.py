"""Multimodal records: validation errors naming file:line and field, skip_and_count, and
placeholder expansion with the loss mask 0 on media tokens (host-side; no jit)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from wakea_jax.data import audio, chat, multimodal
from wakea_jax.data.images import ImageConfig
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models.audio import output_lengths

# Byte-fallback ids of 0xFE / 0xFF: no UTF-8 text encodes to them, so they are dedicated.
IMAGE_ID, AUDIO_ID = 267, 268
RATE = 8000
FEATURES = audio.FeatureConfig(feature_size=8, sampling_rate=RATE, hop_length=80,
                               chunk_length=1, n_fft=160)
CONFIG = multimodal.MediaConfig(image=ImageConfig(height=8, width=8), image_token_id=IMAGE_ID,
                                image_tokens=5, audio=FEATURES, audio_token_id=AUDIO_ID)


def _png(path, colour=(255, 0, 0), size=(6, 4)):
  Image.new("RGB", size, colour).save(path)


def _wav(path, seconds=0.5, rate=RATE):
  t = np.arange(int(seconds * rate)) / rate
  audio.write_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def _chat(user, answer="Red."):
  return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture
def files(tmp_path):
  (tmp_path / "media").mkdir()
  _png(tmp_path / "media" / "a.png")
  _png(tmp_path / "media" / "b.png", (0, 0, 255))
  _wav(tmp_path / "media" / "beep.wav")
  _wav(tmp_path / "media" / "fast.wav", rate=2 * RATE)
  _wav(tmp_path / "media" / "long.wav", seconds=1.5)
  (tmp_path / "media" / "bad.png").write_text("not an image")
  return tmp_path


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_good_records_load_and_become_model_inputs(files):
  path = _write(files / "train.jsonl", [
      {"messages": _chat("<image><image>Which is red?", "The first."),
       "images": ["media/a.png", "media/b.png"]},
      {"messages": _chat("<audio>How many beeps?", "One."), "audios": ["media/beep.wav"]},
      {"messages": _chat("No media here.", "Fine.")},
  ])
  source = multimodal.load_source(path, CONFIG)
  assert len(source) == 3 and source.skipped == []
  assert source[0]["images"] == [str(files / "media" / "a.png"), str(files / "media" / "b.png")]
  assert source[1]["audios"] == [str(files / "media" / "beep.wav")]

  tok = default_tokenizer()
  image_inputs = multimodal.to_model_inputs(source[0], tok, CONFIG)
  ids, mask = image_inputs["input_ids"], image_inputs["loss_mask"]
  assert image_inputs["pixel_values"].shape == (2, 3, 8, 8)
  assert image_inputs["input_features"].shape == (0, 8, 100)
  assert (ids == IMAGE_ID).sum() == 2 * CONFIG.image_tokens and not (ids == AUDIO_ID).any()
  assert ids.shape == mask.shape and mask.dtype == np.int32
  assert not mask[ids == IMAGE_ID].any() and mask.sum() > 0
  # The 10 image ids are one run right after the user header; the text equals chat.render's.
  at = np.flatnonzero(ids == IMAGE_ID)
  assert (np.diff(at) == 1).all()
  text_ids = np.delete(ids, at)
  assert tok.decode(text_ids.tolist()).startswith("<|im_start|>user\nWhich is red?")

  audio_inputs = multimodal.to_model_inputs(source[1], tok, CONFIG)
  frames = audio_inputs["feature_attention_mask"]
  assert audio_inputs["input_features"].shape == (1, 8, 100) and frames.sum() == 50
  expected = int(output_lengths(np.asarray([50]), avg_pool=True)[0])
  assert (audio_inputs["input_ids"] == AUDIO_ID).sum() == expected == 12
  assert not audio_inputs["loss_mask"][audio_inputs["input_ids"] == AUDIO_ID].any()
  assert audio_inputs["pixel_values"].shape == (0, 3, 8, 8)

  # Without media the ids and mask are chat.render's.
  plain = multimodal.to_model_inputs(source[2], tok, CONFIG)
  rendered = chat.render(source[2]["messages"], tok)
  np.testing.assert_array_equal(plain["input_ids"], rendered.input_ids)
  np.testing.assert_array_equal(plain["loss_mask"], rendered.loss_mask)


def test_expansion_counts_and_mask():
  ids = np.array([1, IMAGE_ID, 2, AUDIO_ID, 3, IMAGE_ID, 4])
  mask = np.array([0, 1, 1, 1, 1, 0, 1])  # media positions forced to 0 whatever they held
  out_ids, out_mask = multimodal.expand(ids, mask, CONFIG, image_count=2,
                                        audio_token_counts=[3])
  image, clip = [IMAGE_ID] * 5, [AUDIO_ID] * 3
  assert out_ids.tolist() == [1] + image + [2] + clip + [3] + image + [4]
  assert out_mask.tolist() == [0] + [0] * 5 + [1] + [0] * 3 + [1] + [0] * 5 + [1]
  with pytest.raises(ValueError, match=r"2 placeholder token\(s\).*3 media item\(s\)"):
    multimodal.expand(ids, mask, CONFIG, image_count=3, audio_token_counts=[3])


def test_prompt_completion_masks_only_the_completion(files):
  path = _write(files / "pc.jsonl", [
      {"prompt": [{"role": "user", "content": "<image>Colour?"},
                  {"role": "assistant", "content": "Red."},
                  {"role": "user", "content": "Again?"}],
       "completion": [{"role": "assistant", "content": "Still red."}],
       "images": ["media/a.png"]}])
  item = multimodal.load_source(path, CONFIG)[0]
  out = multimodal.to_model_inputs(item, default_tokenizer(), CONFIG)
  trained = out["input_ids"][out["loss_mask"] == 1]
  assert default_tokenizer().decode(trained.tolist()) == "Still red.<|im_end|>"


def test_datasets_images_column_with_bytes(tmp_path):
  datasets = pytest.importorskip("datasets")
  buffer = io.BytesIO()
  Image.new("RGB", (5, 7), (0, 255, 0)).save(buffer, format="PNG")
  rows = {"messages": [_chat("<image>Colour?", "Green."), _chat("<image>Colour?", "Green.")],
          "images": [[{"bytes": buffer.getvalue(), "path": None}],
                     [{"bytes": b"\x89PNG broken", "path": None}]]}
  features = datasets.Features({
      "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
      "images": datasets.Sequence(datasets.Image())})
  datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
  with pytest.raises(ValueError, match=r"ds\[1\]: field 'images\[0\]': the stored bytes"):
    multimodal.load_source(tmp_path / "ds", CONFIG)
  source = multimodal.load_source(tmp_path / "ds", CONFIG, on_error="skip_and_count")
  assert len(source) == 1 and len(source.skipped) == 1
  out = multimodal.to_model_inputs(source[0], default_tokenizer(), CONFIG)
  assert out["pixel_values"].shape == (1, 3, 8, 8)
  assert (out["input_ids"] == IMAGE_ID).sum() == 5


BAD = [
    ({"messages": _chat("<image>Hi"), "images": ["media/absent.png"]},
     r"field 'images\[0\]': image file .*absent\.png does not exist"),
    ({"messages": _chat("<image>Hi"), "images": ["media/bad.png"]},
     r"field 'images\[0\]': .*bad\.png: not a readable image"),
    ({"messages": _chat("<audio>Hi"), "audios": ["media/fast.wav"]},
     r"field 'audios\[0\]': .*fast\.wav: sample rate is 16000 Hz.*expects 8000 Hz"),
    ({"messages": _chat("<audio>Hi"), "audios": ["media/absent.wav"]},
     r"field 'audios\[0\]': .*absent\.wav: audio file not found"),
    ({"messages": _chat("<audio>Hi"), "audios": ["media/long.wav"]},
     r"field 'audios\[0\]': .*long\.wav is 1\.50 s long, longer than .* 1 s window"),
    ({"messages": _chat("<image>Hi"), "images": ["media/a.png", "media/b.png"]},
     r"the messages have 1 '<image>' placeholder\(s\) but field 'images' lists 2 item"),
    ({"messages": _chat("<audio><audio>Hi")},
     r"the messages have 2 '<audio>' placeholder\(s\) but field 'audios' lists 0 item"),
    ({"messages": _chat("<image>Hi"), "images": "media/a.png"},
     r"field 'images' must be a list, got str"),
    ({"messages": _chat("<image>Hi"), "images": [3]},
     r"field 'images\[0\]' must be a file path, got int"),
    ({"messages": [{"role": "user", "content": "<image>Hi"}], "images": ["media/a.png"]},
     r"field 'messages' has no assistant message"),
]


@pytest.mark.parametrize("record, error", BAD)
def test_bad_records_name_line_and_field(files, record, error):
  good = {"messages": _chat("<image>Fine", "Yes."), "images": ["media/a.png"]}
  path = _write(files / "bad.jsonl", [good, record])
  with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {error}"):
    multimodal.load_source(path, CONFIG)


def test_skip_and_count(files):
  good = {"messages": _chat("<image>Fine", "Yes."), "images": ["media/a.png"]}
  path = _write(files / "mixed.jsonl", [good] + [record for record, _ in BAD] + [good])
  source = multimodal.load_source(path, CONFIG, on_error="skip_and_count")
  assert len(source) == 2 and source.origins == [f"{path}:1", f"{path}:{len(BAD) + 2}"]
  assert len(source.skipped) == len(BAD)
  assert all(message.startswith(f"{path}:") for message in source.skipped)


def test_disabled_modality_and_lazy_decoding(files):
  vision_only = multimodal.MediaConfig(image=ImageConfig(height=8, width=8),
                                       image_token_id=IMAGE_ID, image_tokens=5,
                                       decode_on_load=False)
  path = _write(files / "x.jsonl", [
      {"messages": _chat("<image>Hi"), "images": ["media/bad.png"]},
      {"messages": _chat("<audio>Hi"), "audios": ["media/beep.wav"]}])
  with pytest.raises(ValueError, match=r"x\.jsonl:2: field 'audios' has 1 item\(s\) but this "
                     r"run has no audio encoder"):
    multimodal.load_source(path, vision_only)
  # Not decoded on load: the unreadable image fails when its example is decoded, named.
  source = multimodal.load_source(path, vision_only, on_error="skip_and_count")
  assert len(source) == 1
  with pytest.raises(ValueError, match=r"x\.jsonl:1: field 'images\[0\]': .*bad\.png"):
    multimodal.ModelInputs(default_tokenizer(), vision_only).map(source[0])


def test_config_checks():
  with pytest.raises(ValueError, match="both image and image_token_id"):
    multimodal.MediaConfig(image=ImageConfig(height=8, width=8))
  with pytest.raises(ValueError, match="must not contain each other"):
    multimodal.MediaConfig(image_placeholder="<a>", audio_placeholder="<a>x")


def test_media_slots_pad_mask_and_name_the_cap(files):
  """Every objective's rows lay media out through `media_slots`: items first, zeros after,
  `image_mask` marking the items; more items than slots is an error naming the record, the
  field and the setting that caps it."""
  from wakea_jax.data.media_batches import media_slots
  from wakea_jax.rl.media_prompts import PromptMedia
  from wakea_jax.rl.prompts import PromptRecord
  images = [str(files / "media" / name) for name in ("a.png", "b.png")]
  item = {"messages": _chat("<image><image>What?"), "images": images, "audios": [],
          "origin": "x.jsonl:3"}
  inputs = multimodal.decode_media(item, CONFIG)
  out = media_slots(inputs, CONFIG, "x.jsonl:3", images=3, audios=1)
  assert out["pixel_values"].shape == (3, 3, 8, 8)
  np.testing.assert_array_equal(out["pixel_values"][:2], inputs["pixel_values"])
  assert not out["pixel_values"][2].any()
  np.testing.assert_array_equal(out["image_mask"], [1, 1, 0])
  assert out["input_features"].shape == (1, 8, FEATURES.num_frames)
  assert not out["feature_attention_mask"].any()
  with pytest.raises(ValueError, match=r"x.jsonl:3: field 'images' has 2 item\(s\), more than "
                                       r"the 1 slot\(s\) per row \(data.max_images\)"):
    media_slots(inputs, CONFIG, "x.jsonl:3", images=1, audios=1)
  prompt = PromptRecord(messages=({"role": "user", "content": "<image><image>What?"},),
                        origin="p.jsonl:7", meta={"images": images})
  with pytest.raises(ValueError, match=r"p.jsonl:7: field 'images' .*\(media.max_media\)"):
    PromptMedia(default_tokenizer(), CONFIG, slots=1).render(prompt)
  rendered = PromptMedia(default_tokenizer(), CONFIG, slots=2)
  ids = rendered.render(prompt)
  assert ids.count(IMAGE_ID) == 2 * CONFIG.image_tokens
  np.testing.assert_array_equal(rendered.arrays([prompt])["image_mask"], [[1, 1]])
