"""Multimodal SFT over the shared run setup: stages, resume-ready batches, the HF export."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from wakea_jax import config_lib
from wakea_jax.checkpoints.llava import load_llava
from wakea_jax.config_files import get_config
from wakea_jax.data import media_batches, sources
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data.images import ImageConfig
from wakea_jax.models.media import bind_media
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import multimodal
from wakea_jax.trainers import run

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _records(directory, n, seed):
  rng = np.random.default_rng(seed)
  (directory / "images").mkdir(parents=True, exist_ok=True)
  out = []
  for i in range(n):
    name = list(COLOURS)[i % 3]
    pixels = np.zeros((16, 16, 3), np.uint8)
    x, y = rng.integers(0, 8, 2)
    pixels[y:y + 8, x:x + 8] = COLOURS[name]
    Image.fromarray(pixels).save(directory / "images" / f"{seed}_{i}.png")
    out.append({"messages": [{"role": "user", "content": "<image>What colour is it?"},
                             {"role": "assistant", "content": name}],
                "images": [f"images/{seed}_{i}.png"]})
  return out


def moved(a, b, part):
  return any(not np.allclose(x, y) for x, y in zip(
      jax.tree.leaves(nnx.state(getattr(a, part), nnx.Param)),
      jax.tree.leaves(nnx.state(getattr(b, part), nnx.Param))))


def _config(tmp_path, train=("encoder", "projector", "language_model")):
  data = tmp_path / "data"
  data.mkdir(exist_ok=True)
  sources.write_jsonl(_records(data, 24, 0), data / "train.jsonl")
  sources.write_jsonl(_records(data, 8, 1), data / "eval.jsonl")
  config = get_config("multimodal:test")
  config.data.sources = str(data / "train.jsonl")
  config.data.eval_sources = str(data / "eval.jsonl")
  config.media.train = train
  return config


def test_projector_stage_trains_only_the_projector_and_exports_llava(tmp_path):
  config = _config(tmp_path, train=("projector",))
  last = run(config, tmp_path / "stage1")
  assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])
  exported = tmp_path / "stage1" / "export" / "hf"
  model = load_llava(exported)
  assert (exported / "preprocessor_config.json").is_file()
  assert ImageConfig.from_json(exported).height == 16

  # Stage 1 moved the projector alone: the tower and decoder are the seed's initial ones.
  initial, _ = multimodal.builder(config_lib.media_config(config))(
      config_lib.run_config(config), mesh_lib.create_mesh({"data": -1}), mesh_lib.DEFAULT_RULES,
      tokenizer_lib.tokenizer_from(""))
  assert moved(initial, model, "projector")
  assert not moved(initial, model, "vision_tower")
  assert not moved(initial, model, "language_model")

  # Stage 2 starts from stage 1's workdir; with the whole model training, the tower and the
  # decoder move too.
  config2 = _config(tmp_path)
  config2.init_from = str(tmp_path / "stage1")
  run(config2, tmp_path / "stage2")
  stage2 = load_llava(tmp_path / "stage2" / "export" / "hf")

  for part in ("vision_tower", "projector", "language_model"):
    assert moved(model, stage2, part), part

  # The exported model answers a batch the way the trained one scored it: its logits on an
  # eval batch give the eval loss the run logged (same data path, same fusion).
  tokenizer = tokenizer_lib.tokenizer_from("")
  media = mm_data.MediaConfig.for_vision(model.config, ImageConfig.from_json(exported))
  source = mm_data.load_source(tmp_path / "data" / "eval.jsonl", media)
  batch = media_batches.eval_batches(
      source, tokenizer, media,
      media_batches.MediaBatchConfig(seq_len=48, batch_size=8, max_images=1))[0]
  logits = jax.jit(lambda ids, pv, m: bind_media(model, {"pixel_values": pv,
                                                         "image_mask": m})(ids))(
      batch["input_ids"], batch["pixel_values"], batch["image_mask"])
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  loss = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  np.testing.assert_allclose(loss, last["eval_loss"], rtol=1e-4)


def _image_source(tmp_path):
  """(config, tokenizer, MediaConfig, the train source) of the 16 px image records."""
  config = _config(tmp_path)
  media = mm_data.MediaConfig(image=ImageConfig(height=16, width=16), image_token_id=1024,
                              image_tokens=4)
  return (config, tokenizer_lib.tokenizer_from(""), media,
          mm_data.load_source(config.data.sources, media))


def _resumed_batches_match(source, tokenizer, media, batching):
  """A second iterator set to the first's state after one batch gives its next 3 batches;
  returns them."""
  first = media_batches.MediaBatchIterator(source, tokenizer, media, batching)
  next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(3)]
  second = media_batches.MediaBatchIterator(source, tokenizer, media, batching)
  second.set_state(state)
  for want in expected:
    got = next(second)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  return expected


def test_media_batches_resume_and_bad_records_name_the_field(tmp_path):
  config, tokenizer, media, source = _image_source(tmp_path)
  batching = media_batches.MediaBatchConfig(seq_len=48, batch_size=4, max_images=1)
  expected = _resumed_batches_match(source, tokenizer, media, batching)
  assert expected[0]["pixel_values"].shape == (4, 1, 3, 16, 16)
  assert (expected[0]["input_ids"] == 1024).sum() == 4 * 4
  assert expected[0]["loss_mask"][expected[0]["targets"] == 1024].sum() == 0

  short = media_batches.MediaBatchConfig(seq_len=8, batch_size=4, max_images=1)
  with pytest.raises(ValueError, match=r"train.jsonl:\d+: the example has \d+ tokens .*seq_len"):
    next(media_batches.MediaBatchIterator(source, tokenizer, media, short))
  none = media_batches.MediaBatchConfig(seq_len=48, batch_size=4, max_images=0)
  with pytest.raises(ValueError, match=r"set data.max_images"):
    media_batches.MediaBatchIterator(source, tokenizer, media, none)
  config.media.placeholder_id = 2000
  with pytest.raises(ValueError, match=r"placeholder id 2000 needs config.model.vocab_size"):
    run(config, tmp_path / "bad")


def test_packed_media_rows_keep_each_example_with_its_own_image_and_resume(tmp_path):
  """`packing=True`: rows hold several examples; split at its segments, every packed row is
  exactly the examples' unpacked rows (tokens, targets, loss mask, restarted positions),
  each with its own image in segment order (so the scatter puts it on its own
  placeholders), every example once; resume is exact; and an SFT run trains on them."""
  config, tokenizer, media, source = _image_source(tmp_path)
  plain = media_batches.MediaBatchConfig(seq_len=48, batch_size=4, max_images=1)
  packed = dataclasses.replace(plain, packing=True, max_images=3, seq_len=80)
  alone, keys = {}, []      # two records may draw the same picture: then the same row
  for batch in media_batches.eval_batches(source, tokenizer, media, plain):
    for i in np.nonzero(batch["segment_ids"].any(-1))[0]:
      keys.append(batch["pixel_values"][i, 0].tobytes())
      alone[keys[-1]] = {k: v[i] for k, v in batch.items()}
  assert len(keys) == 24
  seen, most = [], 0
  for batch in media_batches.eval_batches(source, tokenizer, media, packed):
    for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
      segments = [s for s in np.unique(row["segment_ids"]) if s > 0]
      most = max(most, len(segments))
      assert int(row["image_mask"].sum()) == len(segments)
      for k, segment in enumerate(segments):
        want = alone[row["pixel_values"][k].tobytes()]
        n = int(want["segment_ids"].sum())
        at = row["segment_ids"] == segment
        for key in ("input_ids", "targets", "loss_mask"):
          np.testing.assert_array_equal(row[key][at], want[key][:n])
        np.testing.assert_array_equal(row["positions"][at], np.arange(n))
        seen.append(row["pixel_values"][k].tobytes())
      assert not row["pixel_values"][len(segments):].any()
  assert most >= 2 and sorted(seen) == sorted(keys)
  _resumed_batches_match(source, tokenizer, media, packed)
  config.data.packing = True
  config.data.seq_len = 64       # two examples a row
  config.media.max_media = 2
  last = run(config, tmp_path / "packed")
  assert np.isfinite(last["loss"])
