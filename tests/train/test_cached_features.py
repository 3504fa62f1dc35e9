"""media.cache_features: a frozen encoder's stored output trains the projector exactly as the
pixels / log-mels do; the cache is keyed by the encoder and the data; the config is checked."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from tests.models.test_media import P, _audio_model, _vision_model
from tests.train.test_multimodal_run import _config
from wakea_jax import config_lib
from wakea_jax.config_files import get_config
from wakea_jax.models.media import with_media
from wakea_jax.objectives.sft import sft_loss_fn
from wakea_jax.train import cached_features, multimodal
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import setup as setup_lib
from wakea_jax.trainers import run

PROJECTOR = nnx.All(nnx.Param, nnx.PathContains("projector"))


def _loss_and_projector_grads(model, batch):
  graphdef, projector, rest = nnx.split(model, PROJECTOR, ...)

  def loss(p, b):
    return with_media(sft_loss_fn)(nnx.merge(graphdef, p, rest), b, jax.random.key(0))[0]

  return jax.jit(jax.value_and_grad(loss))(projector, batch)


def _assert_same(model, raw, media_keys):
  """The SFT loss and projector gradients from `raw`'s media equal those from the stored
  tower output of the same media (computed by the cache's own jitted encoder)."""
  features, mask = jax.jit(cached_features.encode_batch)(model, {k: raw[k] for k in media_keys})
  cached = {k: v for k, v in raw.items() if k not in media_keys}
  keys = (("image_tower_features", "image_mask") if "pixel_values" in raw
          else ("audio_tower_features", "audio_tower_mask"))
  cached.update(zip(keys, (np.asarray(features), np.asarray(mask))))
  want_loss, want_grads = _loss_and_projector_grads(model, raw)
  got_loss, got_grads = _loss_and_projector_grads(model, cached)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(want_grads)) > 0


def _token_batch(rows):
  ids = np.asarray(rows, np.int32)
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": (ids[:, 1:] != P).astype(np.float32)}


def test_cached_features_give_the_pixels_loss_and_projector_gradients():
  model = _vision_model()
  tokens = model.config.image_tokens
  rows = [[3] + [P] * tokens + [4] + [P] * tokens + [5, 6],
          [7] + [P] * tokens + [8, 9, 10] + [0] * tokens]
  batch = _token_batch(rows)
  batch["pixel_values"] = np.random.default_rng(0).standard_normal(
      (2, 2, 3, 16, 16)).astype(np.float32)
  batch["image_mask"] = np.asarray([[1, 1], [1, 0]], np.int32)
  _assert_same(model, batch, ("pixel_values", "image_mask"))


def test_cached_features_give_the_log_mels_loss_and_projector_gradients():
  model = _audio_model()
  frames = np.zeros((2, 2, 16), np.int32)
  frames[0, 0] = 1                         # a full clip: 4 tokens
  frames[0, 1, :9] = 1                     # 9 frames: 2 tokens
  frames[1, 0, :16] = 1                    # row 1: one clip, one padding slot
  batch = _token_batch([[3] + [P] * 4 + [4] + [P] * 2 + [5, 6],
                        [7] + [P] * 4 + [8, 9, 10, 0, 0]])
  batch["input_features"] = np.random.default_rng(1).standard_normal(
      (2, 2, 8, 16)).astype(np.float32)
  batch["feature_attention_mask"] = frames
  _assert_same(model, batch, ("input_features", "feature_attention_mask"))


def test_stage1_run_logs_the_same_losses_with_the_cache(tmp_path):
  logged = {}
  for cache in (False, True):
    config = _config(tmp_path, train=("projector",))
    config.media.cache_features = cache
    config.export.enabled = False
    config.train.checkpoint_every = 4
    run(config, tmp_path / f"cache_{cache}")
    records = metrics_lib.read_jsonl(tmp_path / f"cache_{cache}" / "metrics.jsonl")
    logged[cache] = {k: [(r["step"], r[k]) for r in records if k in r]
                     for k in ("loss", "eval_loss", "grad_norm")}
  assert len(logged[True]["loss"]) == 4 and len(logged[True]["eval_loss"]) == 1, logged
  for key in ("loss", "eval_loss"):
    assert [s for s, _ in logged[True][key]] == [s for s, _ in logged[False][key]]
    np.testing.assert_allclose([v for _, v in logged[True][key]],
                               [v for _, v in logged[False][key]], atol=1e-5, rtol=0)
  # The projector's gradient scales with its input, so its norm shows a wrong cache (1e-4 on
  # the stored features moves it past this tolerance; the loss alone barely moves).
  np.testing.assert_allclose([v for _, v in logged[True]["grad_norm"]],
                             [v for _, v in logged[False]["grad_norm"]], rtol=1e-5)
  cache_dirs = list((tmp_path / "cache_True" / cached_features.CACHE_DIR).iterdir())
  assert len(cache_dirs) == 1
  assert {p.name for p in cache_dirs[0].iterdir()} >= {
      "train.features.npy", "train.mask.npy", "train.json", "eval.features.npy", "eval.json"}


def _built(config):
  media = config_lib.media_config(config)
  return setup_lib.setup(config_lib.run_config(config), with_media(sft_loss_fn),
                         build=multimodal.builder(media))


def _prepare(built, config, workdir):
  model = nnx.merge(built.graphdef, built.state.params, built.state.frozen)
  media = multimodal.media_config(model, config_lib.media_config(config))
  source = multimodal._source((config.data.sources,), media, "raise", "sources")
  return cached_features.prepare(built, media, workdir, sources={"train": source},
                                 max_media=1, batch_size=8)["train"]


def test_cache_is_reused_for_the_same_encoder_and_rebuilt_for_another(tmp_path):
  config = _config(tmp_path, train=("projector",))
  config.media.cache_features = True
  built = _built(config)
  first = _prepare(built, config, tmp_path / "w")
  stamp = (tmp_path / "w" / cached_features.CACHE_DIR / first.directory.split("/")[-1]
           / "train.features.npy").stat().st_mtime_ns
  again = _prepare(built, config, tmp_path / "w")          # a restart: reused, not rewritten
  assert again.directory == first.directory
  assert (tmp_path / "w" / cached_features.CACHE_DIR / first.directory.split("/")[-1]
          / "train.features.npy").stat().st_mtime_ns == stamp
  config.seed = 1                                          # another encoder: rebuilt
  other = _prepare(_built(config), config, tmp_path / "w")
  assert other.directory != first.directory
  assert not np.allclose(other.row(0)["image_tower_features"],
                         first.row(0)["image_tower_features"])
  np.testing.assert_array_equal(other.row(0)["image_mask"], [1])
  # Another image under the same name (a changed dataset): rebuilt too.
  image = tmp_path / "data" / "images" / "0_0.png"
  image.write_bytes(image.read_bytes())
  os.utime(image, ns=(0, 0))
  assert _prepare(built, config, tmp_path / "w").directory not in (first.directory,
                                                                   other.directory)


def test_cache_features_needs_a_frozen_encoder_and_sft():
  config = get_config("multimodal:test")
  config.media.cache_features = True
  with pytest.raises(ValueError, match=r"config.media.cache_features.*config.media.train"):
    config_lib.media_config(config)
  dpo = get_config("multimodal:test_dpo")
  dpo.media.update(cache_features=True, train=("projector",))
  with pytest.raises(ValueError, match=r"cache_features is supported for SFT only"):
    _built(dpo)
