"""Frozen-encoder features computed once per record, for multimodal SFT (media.cache_features).

When `media.train` leaves the encoder frozen (LLaVA's stage 1, or a decoder-only stage), the
tower's output for a record never changes, and running it every step is wasted work.
`prepare` runs the frozen part once, jitted, over every record of the train (and eval)
source in fixed-size batches and stores it under `workdir/media_features/<fingerprint>/`
(data/feature_cache.py: a memmapped .npy per split, written under a temporary name and
renamed). The batches then carry the stored features and the model runs only the projector
and the decoder on them, so the projector and decoder get exactly the gradients they would
from the pixels / log-mels.

The frozen part is everything before the projector: for vision the tower plus LLaVA's
feature-layer selection (`VisionLanguageModel.encode_images`), for audio the tower with its
pooling (`AudioLanguageModel.encode_audios`).

The fingerprint hashes the tower's parameter values, the tower's and the preprocessing's
configs, the slot count and each source's files and media files (data/feature_cache.py), so
a changed encoder (another init_from or seed) or dataset never reuses a stale cache, while a
restart or resume of the same run finds the one it built. The digest is of the tower the
run builds (from scratch or `init_from`), which a resume's checkpoint holds unchanged since it
is frozen; resuming a workdir under another seed or init_from is not supported (the
checkpoint's tower would win, the cache would be the new one's). Stale directories are left
in place; delete `workdir/media_features` to reclaim the space.

On several processes the build is a collective: each process decodes its share of every
batch, the tower runs on the global mesh, and process 0 writes the gathered rows (the workdir
is shared, as for checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from wakea_jax.data import feature_cache
from wakea_jax.data.media_batches import media_slots
from wakea_jax.data.multimodal import MediaConfig, MultimodalSource, decode_media
from wakea_jax.models.multimodal import VisionLanguageModel
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.parallel import multihost
from wakea_jax.train import setup as setup_lib

CACHE_DIR = "media_features"


def kind_of(model: nnx.Module) -> str:
  """"vision" or "audio"."""
  return "vision" if isinstance(model, VisionLanguageModel) else "audio"


def encode_batch(model: nnx.Module, media: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The frozen part on a batch in the per-row layout -> (features float32 [b, k, T, D],
  mask int32: image_mask [b, k] or the real tokens [b, k, T])."""
  if isinstance(model, VisionLanguageModel):
    pixels = media["pixel_values"]
    b, k = pixels.shape[:2]
    features = model.encode_images(pixels.reshape((b * k,) + pixels.shape[2:]))
    return (features.reshape((b, k) + features.shape[1:]).astype(jnp.float32),
            media["image_mask"].astype(jnp.int32))
  clips, frames = media["input_features"], media["feature_attention_mask"]
  b, k = clips.shape[:2]
  hidden, token_mask = model.encode_audios(clips.reshape((b * k,) + clips.shape[2:]),
                                           frames.reshape((b * k,) + frames.shape[2:]))
  return (hidden.reshape((b, k) + hidden.shape[1:]).astype(jnp.float32),
          token_mask.reshape(b, k, -1).astype(jnp.int32))


def _to_numpy(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def encoder_digest(built: setup_lib.Setup) -> str:
  """sha256 of the frozen tower's parameter values (paths, dtypes, shapes and bytes)."""
  model = nnx.merge(built.graphdef, built.state.params, built.state.frozen)
  tower = model.vision_tower if kind_of(model) == "vision" else model.audio_tower
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(tower))
  for path, leaf in leaves:
    value = _to_numpy(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def fingerprint_parts(built: setup_lib.Setup, media: MediaConfig, max_media: int,
                      sources: Mapping[str, MultimodalSource]) -> dict[str, Any]:
  """Everything the stored features depend on (see the module docstring)."""
  config = nnx.merge(built.graphdef, built.state.params, built.state.frozen).config
  tower = ({"vision": dataclasses.asdict(config.vision),
            "layers": config.feature_layers,
            "strategy": config.vision_feature_select_strategy}
           if hasattr(config, "vision") else {"audio": dataclasses.asdict(config.audio)})
  return {"encoder": encoder_digest(built), "tower": tower, "media": repr(media),
          "max_media": max_media,
          "sources": {split: feature_cache.source_fingerprint(source)
                      for split, source in sources.items()}}


class _Slots(grain.transforms.Map):
  """A record index -> its decoded media in the slot layout (the batch keys of models/media)."""

  def __init__(self, source: MultimodalSource, media: MediaConfig, max_media: int):
    self.source, self.media, self.max_media = source, media, max_media

  def map(self, index: int) -> dict[str, np.ndarray]:
    """Record `index`'s slots."""
    item = self.source[index]
    slots = self.max_media
    return media_slots(decode_media(item, self.media), self.media, item["origin"],
                       images=slots if self.media.image is not None else 0,
                       audios=slots if self.media.audio is not None else 0,
                       setting="config.media.max_media")


def encoder(built: setup_lib.Setup) -> Any:
  """The jitted `encode_batch` of the run's model: (params, frozen, batch) -> (features,
  mask)."""
  graphdef = built.graphdef
  return jax.jit(lambda params, frozen, batch: encode_batch(
      nnx.merge(graphdef, params, frozen), batch))


def build_split(built: setup_lib.Setup, source: MultimodalSource, media: MediaConfig, *,
                max_media: int, batch_size: int, worker_count: int, directory: pathlib.Path,
                split: str, encode: Any = None) -> feature_cache.CachedFeatures:
  """Runs the frozen part (`encode`, default `encoder(built)`) over every record of `source`
  in global batches of `batch_size` (the last padded with repeats of the last record, whose
  extra rows are dropped) and writes the split; a collective on several processes."""
  kind = kind_of(nnx.merge(built.graphdef, built.state.params, built.state.frozen))
  records, count, index = len(source), jax.process_count(), jax.process_index()
  if not records:
    raise ValueError(f"{source.name}: no records to cache encoder features for "
                     "(config.media.cache_features)")
  local = batch_size // count
  chunks = -(-records // batch_size)
  indices = [min(c * batch_size + index * local + j, records - 1)
             for c in range(chunks) for j in range(local)]
  ds = grain.MapDataset.source(indices).map(_Slots(source, media, max_media))
  batches = ds.to_iter_dataset().batch(local)
  if worker_count:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  mesh, rules = built.mesh, built.rules
  encode = encode or encoder(built)
  writer = None
  try:
    for c, batch in enumerate(batches):
      with mesh_lib.logical_rules(mesh, rules):
        features, mask = encode(built.state.params, built.state.frozen,
                                mesh_lib.shard_batch(batch, mesh, rules))
      features, mask = (multihost.gather_rows(multihost.to_host(x)) for x in (features, mask))
      if index == 0:
        if writer is None:
          writer = feature_cache.SplitWriter(directory, split, kind, records,
                                             features.shape[1:], mask.shape[1:])
        writer.write(c * batch_size, features, mask)
    if writer is None:   # not process 0
      return feature_cache.CachedFeatures(str(directory), split, kind, records)
    return writer.finish({"source": source.name})
  except BaseException:
    if writer is not None:
      writer.abort()
    raise


def prepare(built: setup_lib.Setup, media: MediaConfig, workdir: pathlib.Path, *,
            sources: Mapping[str, MultimodalSource], max_media: int, batch_size: int,
            worker_count: int = 0) -> dict[str, feature_cache.CachedFeatures]:
  """The cached features of each split in `sources` ("train", "eval"): reused when the
  fingerprint's directory holds them all, else built there (see the module docstring)."""
  parts = fingerprint_parts(built, media, max_media, sources)
  directory = pathlib.Path(workdir) / CACHE_DIR / feature_cache.fingerprint(parts)
  found = {split: feature_cache.open_split(directory, split, len(source))
           for split, source in sources.items()}
  if multihost.all_true(all(v is not None for v in found.values())):
    logging.info("reusing the cached encoder features in %s", directory)
    return {split: cached for split, cached in found.items() if cached is not None}
  out = {}
  ok = False
  encode = encoder(built)
  try:
    for split, source in sources.items():
      start = time.perf_counter()
      out[split] = build_split(built, source, media, max_media=max_media,
                               batch_size=batch_size, worker_count=worker_count,
                               directory=directory, split=split, encode=encode)
      logging.info("cached the encoder features of %d %s records in %s (%.1f s)",
                   len(source), split, directory, time.perf_counter() - start)
    if jax.process_index() == 0:
      (directory / "fingerprint.json").write_text(
          json.dumps(parts, indent=2, default=str) + "\n")
    ok = True
  finally:
    # Holds the other processes until process 0 has renamed the files into place.
    released = multihost.all_true(ok)
  if not released:
    raise RuntimeError(f"building the encoder feature cache in {directory} failed on another "
                       "process")
  return out


__all__ = ["CACHE_DIR", "build_split", "encode_batch", "encoder", "encoder_digest",
           "fingerprint_parts", "kind_of", "prepare"]
