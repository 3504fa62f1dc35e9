"""The synthetic media tasks (data/tasks/shapes.py, tones.py): determinism, balanced answers,
records that load through multimodal.load_source, and that the pixels / samples say what the
answer says (connected components, dominant colours, beep envelopes, zero crossings)."""

import collections
import wave

import numpy as np
import pytest
from PIL import Image

from wakea_jax.data import multimodal
from wakea_jax.data.audio import load_audio, log_mel_features
from wakea_jax.data.images import ImageConfig
from wakea_jax.data.sources import write_jsonl
from wakea_jax.data.tasks import shapes, tones
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.rl import answers

# Byte-fallback ids of 0xFE / 0xFF: no UTF-8 text encodes to them (as test_multimodal_records).
IMAGE_ID, AUDIO_ID = 267, 268
NUM_SHAPES, NUM_TONES = 48, 24   # whole blocks: every kind's answers exactly balanced


@pytest.fixture(scope="module")
def shape_sets(tmp_path_factory):
  """size -> (directory, records)."""
  out = {}
  for size, n in ((32, NUM_SHAPES), (64, 16)):
    directory = tmp_path_factory.mktemp(f"shapes{size}")
    out[size] = directory, shapes.write(directory, n, seed=3, size=size)
  return out


@pytest.fixture(scope="module")
def tone_set(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tones")
  return directory, tones.write(directory, NUM_TONES, seed=3)


def _files(directory, records, field):
  return [(directory / r[field][0]).read_bytes() for r in records]


# ------------------------------------------------------------------------------------------
# Determinism, splits, balance, record format
# ------------------------------------------------------------------------------------------


def test_shapes_deterministic_and_prefix_stable(shape_sets, tmp_path):
  directory, records = shape_sets[32]
  again = shapes.write(tmp_path / "a", NUM_SHAPES, seed=3)
  assert again == records
  assert _files(tmp_path / "a", again, "images") == _files(directory, records, "images")
  prefix = shapes.write(tmp_path / "b", 8, seed=3)
  assert prefix == records[:8]
  assert _files(tmp_path / "b", prefix, "images") == _files(directory, records[:8], "images")
  held_out = shapes.write(tmp_path / "c", 8, seed=3, split=1)
  assert held_out[0]["images"] == ["images/1_0.png"]
  assert not set(_files(tmp_path / "c", held_out, "images")) & set(
      _files(directory, records, "images"))


def test_tones_deterministic(tone_set, tmp_path):
  directory, records = tone_set
  again = tones.write(tmp_path, NUM_TONES, seed=3)
  assert again == records
  assert _files(tmp_path, again, "audios") == _files(directory, records, "audios")
  other = tones.write(tmp_path / "held", 4, seed=3, split=1)
  assert other[0]["audios"] == ["audios/1_0.wav"]
  assert _files(tmp_path / "held", other, "audios")[0] != _files(directory, records, "audios")[0]


@pytest.mark.parametrize("task", ["shapes", "tones"])
def test_answers_balanced(task, shape_sets, tone_set):
  module, records = (shapes, shape_sets[32][1]) if task == "shapes" else (tones, tone_set[1])
  kinds = collections.Counter(r["category"] for r in records)
  assert set(kinds) == set(module.KINDS) and len(set(kinds.values())) == 1
  for kind in module.KINDS:
    answers = collections.Counter(r["answer"] for r in records if r["category"] == kind)
    assert set(answers) == set(module.CHOICES[kind]) and len(set(answers.values())) == 1
  for r in records:
    (user, assistant) = r["messages"]
    assert user["content"].startswith("<image>" if task == "shapes" else "<audio>")
    assert assistant == {"role": "assistant", "content": r["answer"]}
    assert r["answer"].islower() and " " not in r["answer"]


def test_prompts_and_baselines(shape_sets, tone_set):
  records = shape_sets[32][1]
  rl = shapes.prompts(records)
  assert [m["role"] for m in rl[0]["messages"]] == ["user"]
  assert {k: rl[0][k] for k in ("images", "answer", "category")} == {
      k: records[0][k] for k in ("images", "answer", "category")}
  assert records[0]["messages"][1]["role"] == "assistant"    # the input is not modified
  # colour, count: 1/4; position, compare (the question names two answers): 1/2.
  assert shapes.chance_accuracy(records) == pytest.approx(0.375)
  assert shapes.majority_accuracy(records) == pytest.approx((3 + 3 + 3 + 3) / NUM_SHAPES)
  # tones: count 1/4, pitch and length 1/2; balanced, so majority == chance.
  tone_records = tone_set[1]
  assert tones.chance_accuracy(tone_records) == pytest.approx((0.25 + 0.5 + 0.5) / 3)
  assert tones.majority_accuracy(tone_records, train=tone_records) == pytest.approx(
      tones.chance_accuracy(tone_records))
  assert "audios" in tones.prompts(tone_records)[0]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown kind"):
    shapes.write(tmp_path, 1, kinds=("colour", "size"))
  with pytest.raises(ValueError, match="size must be >= 32"):
    shapes.write(tmp_path, 1, size=16)
  with pytest.raises(ValueError, match="unknown kind"):
    tones.write(tmp_path, 1, kinds=("loudness",))


# ------------------------------------------------------------------------------------------
# Loading through multimodal.load_source, and the model inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_load_source(size, shape_sets):
  directory, records = shape_sets[size]
  write_jsonl(records, directory / "train.jsonl")
  config = multimodal.MediaConfig(image=ImageConfig(height=size, width=size),
                                  image_token_id=IMAGE_ID, image_tokens=(size // 8) ** 2)
  source = multimodal.load_source(directory / "train.jsonl", config)
  assert len(source) == len(records)
  inputs = multimodal.to_model_inputs(source[0], default_tokenizer(), config)
  assert inputs["pixel_values"].shape == (1, 3, size, size)
  assert (inputs["input_ids"] == IMAGE_ID).sum() == (size // 8) ** 2


def test_tones_load_source_and_features(tone_set):
  directory, records = tone_set
  write_jsonl(records, directory / "train.jsonl")
  config = multimodal.MediaConfig(audio=tones.FEATURES, audio_token_id=AUDIO_ID)
  source = multimodal.load_source(directory / "train.jsonl", config)
  assert len(source) == len(records)
  inputs = multimodal.to_model_inputs(source[0], default_tokenizer(), config)
  assert inputs["input_features"].shape == (1, 32, 100)
  assert inputs["feature_attention_mask"].sum() == 100
  assert (inputs["input_ids"] == AUDIO_ID).sum() == 25      # 100 frames -> conv 50 -> pool 25
  clip = load_audio(directory / records[1]["audios"][0], tones.FEATURES)
  features, _ = log_mel_features([clip], tones.FEATURES)
  assert np.isfinite(features).all() and features[0, :24].std() > 0.1
  with wave.open(str(directory / records[0]["audios"][0])) as f:
    assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (
        1, 2, 8000, 8000)


# ------------------------------------------------------------------------------------------
# The content says what the answer says
# ------------------------------------------------------------------------------------------


def _components(mask):
  """Labels [h, w] of the 4-connected components of a bool mask (-1 off the mask): each
  pixel takes the smallest label among its neighbours until nothing changes."""
  big = mask.size
  labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
  while True:
    padded = np.pad(labels, 1, constant_values=big)
    neighbours = np.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                           padded[1:-1, :-2], padded[1:-1, 2:]])
    new = np.where(mask, neighbours.min(0), big)
    if np.array_equal(new, labels):
      return np.where(mask, labels, -1)
    labels = new


def _nearest_colour(pixels):
  """Colour name [n] of each RGB pixel [n, 3]."""
  names = list(shapes.COLOURS)
  palette = np.asarray([shapes.COLOURS[c] for c in names], np.int64)
  distance = ((pixels[:, None, :].astype(np.int64) - palette[None]) ** 2).sum(-1)
  return np.asarray(names)[distance.argmin(-1)]


@pytest.mark.parametrize("size", [32, 64])
def test_shape_pixels_match_answers(size, shape_sets):
  directory, records = shape_sets[size]
  for r in records:
    pixels = np.asarray(Image.open(directory / r["images"][0]))
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    background = pixels[0, 0]                 # a 1 px margin keeps the corners clear
    assert background.max() <= shapes.MAX_BACKGROUND and len(set(background)) == 1
    mask = (pixels != background).any(-1)
    labels = _components(mask)
    count = len(set(labels[mask].tolist()))
    colours = collections.Counter(_nearest_colour(pixels[mask]).tolist())
    kind, answer = r["category"], r["answer"]
    if kind == "colour":
      assert count == 1 and colours.most_common(1)[0][0] == answer
    elif kind == "count":
      assert count == shapes.NUMBERS.index(answer) + 1 and len(colours) == 1
    elif kind == "position":
      ys, xs = np.nonzero(mask)
      along = xs if answer in ("left", "right") else ys
      assert count == 1
      if answer in ("left", "top"):
        assert along.max() < size // 2
      else:
        assert along.min() >= size // 2
    else:  # compare: two shapes, the answer's colour covers at least twice the pixels
      asked = [c for c in shapes.COLOURS if f"the {c} " in r["messages"][0]["content"]]
      assert count == 2 and answer in asked and set(colours) == set(asked)
      other = next(c for c in asked if c != answer)
      assert colours[answer] >= 2 * colours[other]


def _shape_kind(component):
  """square / circle / triangle: a square fills its bounding box; a circle's top and bottom
  rows are as wide as each other, an (upward) triangle's top row is narrower."""
  ys, xs = np.nonzero(component)
  fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
  top, bottom = component[ys.min()].sum(), component[ys.max()].sum()
  return "square" if fill == 1 else "circle" if top == bottom else "triangle"


def test_described_answers_say_what_the_pixels_show(shape_sets, tmp_path):
  """`described` changes only the assistant turns; each description lists every shape of the
  picture in reading order, with its kind, its colour where asked and its cell on the 4 x 4
  grid, all read back from the pixels here, and its last word is the answer."""
  directory, plain = shape_sets[32]
  records = shapes.write(tmp_path, NUM_SHAPES, seed=3, described=0.5)
  assert _files(tmp_path, records, "images") == _files(directory, plain, "images")
  assert [r["messages"][0] for r in records] == [r["messages"][0] for r in plain]
  replies = [r["messages"][1]["content"] for r in records]
  described = [reply != r["answer"] for reply, r in zip(replies, records)]
  assert 0.3 < np.mean(described) < 0.7 and all(
      reply == r["answer"] for reply, r, d in zip(replies, records, described) if not d)
  for r, reply in zip(records, replies):
    if reply == r["answer"]:
      continue
    assert answers.extract_answer(reply, fallback="last_word") == r["answer"]
    pixels = np.asarray(Image.open(tmp_path / r["images"][0]))
    mask = (pixels != pixels[0, 0]).any(-1)
    labels = _components(mask)
    items = []
    for label in sorted(set(labels[mask].tolist())):
      component = labels == label
      ys, xs = np.nonzero(component)
      x = int((xs.min() + (xs.max() - xs.min() + 1) / 2) // 8)
      y = int((ys.min() + (ys.max() - ys.min() + 1) / 2) // 8)
      colour = collections.Counter(_nearest_colour(pixels[component]).tolist()).most_common(1)
      named = _shape_kind(component)
      if r["category"] in ("colour", "compare"):
        named = f"{colour[0][0]} {named}"
      items.append((y, x, f"{named} {x}{y}"))
    expected = ", ".join(text for _, _, text in sorted(items)) + f": {r['answer']}"
    assert reply == expected, r
  with pytest.raises(ValueError, match="described"):
    shapes.write(tmp_path, 1, described=1.5)


def _segments(samples, rate=tones.RATE):
  """(start, length) in samples of each run of 5 ms windows with a peak above 0.05."""
  window = rate // 200
  loud = np.abs(samples[:len(samples) // window * window]).reshape(-1, window).max(-1) > 0.05
  edges = np.diff(np.concatenate([[0], loud.astype(int), [0]]))
  starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
  return [(s * window, (e - s) * window) for s, e in zip(starts, ends, strict=True)]


def test_tone_samples_match_answers(tone_set):
  directory, records = tone_set
  for r in records:
    samples = load_audio(directory / r["audios"][0], tones.FEATURES)
    assert samples.shape == (8000,) and np.abs(samples).max() <= tones.MAX_AMPLITUDE + 1e-3
    segments = _segments(samples)
    kind, answer = r["category"], r["answer"]
    if kind == "count":
      assert len(segments) == tones.CHOICES["count"].index(answer) + 1
      continue
    assert len(segments) == 2
    if kind == "pitch":
      # Zero crossings per sample ~ 2 f / rate: the pitch of each tone.
      rates = [np.mean(np.diff(np.signbit(samples[s:s + n])) != 0) for s, n in segments]
      assert ("up" if rates[1] > 1.5 * rates[0] else
              "down" if rates[0] > 1.5 * rates[1] else "?") == answer
    else:
      lengths = [n for _, n in segments]
      assert ("first" if lengths[0] > lengths[1] else "second") == answer
