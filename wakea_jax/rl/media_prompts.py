"""RL prompts with images or audio: their token ids and their per-row media arrays.

A prompt record (rl/prompts.py) may carry `"images"` / `"audios"` lists like an SFT media
record (data/multimodal.py; paths are resolved against the prompt file's directory when it
is loaded). `PromptMedia` renders such a prompt with one placeholder id per item, expanded
to the item's token count, ending with the assistant generation prompt, and decodes its media
into the per-row layout of `models/media.py`, which the sampler's prefill
(`Sampler.generate(media=)`) and the learner's scoring and loss (through
`models.scoring.score_tokens`, which binds a batch's media) both take. Decoded media are
cached per prompt, so a prompt drawn again is not decoded again.

Errors name the prompt's origin and the field (a missing file, a placeholder count that
differs from the media count, more items than `slots`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wakea_jax.data import media_batches
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.rl.prompts import MEDIA_FIELDS, PromptRecord

_MAX_CACHE = 4096
_SETTING = "media.max_media"


class PromptMedia:
  """Renders media prompts and lays out their media for one model (see the module doc)."""

  def __init__(self, tokenizer: Tokenizer, media: mm_data.MediaConfig, slots: int) -> None:
    if slots < 1:
      raise ValueError(f"media slots per row must be >= 1, got {slots}")
    self.tokenizer, self.media, self.slots = tokenizer, media, slots
    self._cache: dict[tuple[str, str], dict[str, Any]] = {}

  def _item(self, prompt: PromptRecord) -> dict[str, Any]:
    key = (prompt.origin, repr(prompt.messages))
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    where = prompt.origin or "<prompt>"
    refs = {f: list(prompt.meta.get(f) or []) for f in MEDIA_FIELDS}
    for field, values in refs.items():
      enabled = self.media.image if field == "images" else self.media.audio
      if values and enabled is None:
        raise ValueError(f"{where}: field '{field}' has {len(values)} item(s) but the model "
                         f"takes no {field[:-1]}s")
    item = {"messages": list(prompt.messages), **refs, "origin": where}
    inputs = mm_data.decode_media(item, self.media)   # errors name the field and file
    counts = (mm_data.audio_token_counts(inputs["feature_attention_mask"], self.media)
              if self.media.audio is not None else ())
    try:
      # The prompt ends with the generation prompt; expand checks the placeholder counts.
      ids, _ = mm_data.tokenize(item["messages"], self.tokenizer, self.media,
                                add_generation_prompt=True)
      ids, _ = mm_data.expand(ids, np.zeros_like(ids), self.media,
                              image_count=len(item["images"]), audio_token_counts=counts)
    except ValueError as err:
      raise ValueError(f"{where}: {err}") from None
    out = {"ids": ids.tolist(),
           **media_batches.media_slots(inputs, self.media, where, images=self.slots,
                                       audios=self.slots, setting=_SETTING)}
    if len(self._cache) >= _MAX_CACHE:
      self._cache.clear()
    self._cache[key] = out
    return out

  def render(self, prompt: PromptRecord) -> list[int]:
    """The prompt's ids, placeholders expanded, ending with the generation prompt."""
    return list(self._item(prompt)["ids"])

  def arrays(self, prompts: Sequence[PromptRecord]) -> dict[str, np.ndarray]:
    """The per-row media arrays [len(prompts), slots, ...] of `prompts`, in order."""
    items = [self._item(p) for p in prompts]
    keys = [k for k in items[0] if k != "ids"] if items else []
    return {k: np.stack([item[k] for item in items]) for k in keys}


__all__ = ["PromptMedia"]
