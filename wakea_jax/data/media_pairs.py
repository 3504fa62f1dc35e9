"""Preference pairs with images or audio, for DPO / IPO / SimPO / ORPO on a multimodal model.

A pair record is a preference record (data/preferences.py) with `"images"` / `"audios"` as
in an SFT media record (data/multimodal.py): the media belong to the prompt, so both sides
see them, and their placeholders (`<image>` / `<audio>`) are written in the prompt's text.

  {"prompt": [{"role": "user", "content": "<image>What colour is the shape?"}],
   "chosen": "red", "rejected": "blue", "images": ["img/0.png"]}

`load_dataset` returns a `PreferenceDataset` whose sides are tokenised with the placeholders
expanded to each item's token count (never trained on), and whose batches carry the pair's
media for both halves in the per-row layout of `models/media.py` (chosen rows then rejected
rows, like the token arrays), so the preference losses run through `models.media.with_media`
unchanged. Paths are resolved against the file's directory; errors name the record and the
field (a missing file, a placeholder count that differs from the media count, more items
than `slots`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wakea_jax.data import dataset_dirs, media_batches
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data import preferences as pref_lib
from wakea_jax.data.tokenizer import Tokenizer

MEDIA_FIELDS = ("images", "audios")


def _resolved(pair: Mapping[str, Any], base: pathlib.Path) -> dict[str, Any]:
  out = dict(pair)
  for field in MEDIA_FIELDS:
    if isinstance(out.get(field), list):
      out[field] = [os.fspath(base / v) if isinstance(v, str) else v for v in out[field]]
  return out


class _PairMedia:
  """Decodes a pair's media once (cached by location) for both its sides and its arrays."""

  def __init__(self, tokenizer: Tokenizer, media: mm_data.MediaConfig, slots: int) -> None:
    self.tokenizer, self.media, self.slots = tokenizer, media, slots
    self._cache: dict[str, dict[str, Any]] = {}

  def inputs(self, pair: Mapping[str, Any], where: str) -> dict[str, Any]:
    hit = self._cache.get(where)
    if hit is None:
      for field in MEDIA_FIELDS:
        enabled = self.media.image if field == "images" else self.media.audio
        if pair.get(field) and enabled is None:
          raise ValueError(f"{where}: field '{field}' has {len(pair[field])} item(s) but the "
                           f"model takes no {field[:-1]}s")
      item = {"messages": list(pair["prompt"]), "images": list(pair.get("images") or []),
              "audios": list(pair.get("audios") or []), "origin": where}
      # Decoded once per pair; tokenize_side's expand checks the placeholder counts.
      hit = mm_data.decode_media(item, self.media)
      hit["num_images"] = len(item["images"])
      self._cache = {where: hit}   # pairs are visited one after another
    return hit

  def tokenize_side(self, pair: Mapping[str, Any], side: str, tokenizer: Tokenizer
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    where = pair["_where"]
    inputs = self.inputs(pair, where)
    counts = (mm_data.audio_token_counts(inputs["feature_attention_mask"], self.media)
              if self.media.audio is not None else ())

    def expanded(messages: list[dict[str, Any]], generation: bool) -> tuple[np.ndarray, ...]:
      ids, mask = mm_data.tokenize(messages, tokenizer, self.media,
                                   add_generation_prompt=generation)
      return mm_data.expand(ids, mask, self.media, image_count=inputs["num_images"],
                            audio_token_counts=counts)

    try:
      ids, mask = expanded(list(pair["prompt"]) + list(pair[side]), False)
      prompt_ids, _ = expanded(list(pair["prompt"]), True)
    except ValueError as err:
      raise ValueError(f"{where}: field '{side}' (with the prompt): {err}") from None
    mask = mask.astype(np.float32)
    mask[:len(prompt_ids)] = 0.0
    return ids, mask, len(prompt_ids)

  def arrays(self, pair: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    return media_batches.media_slots(self.inputs(pair, where), self.media, where,
                                     images=self.slots, audios=self.slots,
                                     setting="media.max_media")


def load_dataset(specs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 tokenizer: Tokenizer, media: mm_data.MediaConfig, *, slots: int, seq_len: int,
                 overlength: str = "truncate", on_error: str = "raise"
                 ) -> pref_lib.PreferenceDataset:
  """The media pairs of one or more files / `datasets` directories (see the module doc)."""
  if isinstance(specs, (str, os.PathLike)):
    specs = [specs]
  pairs: list[dict[str, Any]] = []
  origins: list[str] = []
  skipped = 0
  for spec in specs:
    path, _ = dataset_dirs.split_spec(spec)
    base = path if path.is_dir() else path.parent
    found, where, bad = pref_lib.load_pairs(spec, on_error=on_error)
    pairs += [{**_resolved(p, base), "_where": w} for p, w in zip(found, where)]
    origins += where
    skipped += len(bad)
  helper = _PairMedia(tokenizer, media, slots)
  return pref_lib.PreferenceDataset(
      pairs, origins, tokenizer, seq_len=seq_len, overlength=overlength,
      name=",".join(str(s) for s in specs), skipped=skipped,
      tokenize_side=helper.tokenize_side, media_of=helper.arrays)


__all__ = ["load_dataset"]
