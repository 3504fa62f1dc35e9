"""What the composite (multimodal) HF checkpoints share: where transformers keeps the language
model inside LLaVA and Qwen2-Audio alike, finding a part's prefix from the keys, and refusing
keys that belong to no part. Used by `checkpoints/llava.py`, `qwen2_audio.py` and `audio.py`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Collection, Mapping

# Decoder tensor prefix -> where each layout keeps it (`hf.read_model`'s `prefixes`):
#   "saved": released checkpoints and transformers' save_pretrained, 4.x and 5.x;
#   "transformers5": transformers 5's in-memory state_dict names.
LM_PREFIXES: dict[str, dict[str, str]] = {
    "saved": {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
    "transformers5": {"model.": "model.language_model.", "lm_head.": "lm_head."},
}


def find_prefix(names: Collection[str], candidates: tuple[str, ...], marker: str,
                directory: pathlib.Path, what: str) -> str:
  """The first of `candidates` under which the tensor `marker` is among `names`; ValueError
  naming `what` and the names looked for if none."""
  for prefix in candidates:
    if prefix + marker in names:
      return prefix
  raise ValueError(f"{directory}: no {what} tensors (looked for "
                   f"{[p + marker for p in candidates]})")


def lm_prefixes(names: Collection[str], directory: pathlib.Path) -> dict[str, str]:
  """The `LM_PREFIXES` layout the keys `names` use (found from the embedding table)."""
  found = find_prefix(names, tuple(p["model."] for p in LM_PREFIXES.values()),
                      "embed_tokens.weight", directory, "language model")
  return next(p for p in LM_PREFIXES.values() if p["model."] == found)


def check_parts(weight_map: Mapping[str, str], parts: tuple[str, ...],
                directory: pathlib.Path, architecture: str) -> None:
  """Raises ValueError naming them (and a file) if keys of `weight_map` (name -> file) lie
  under none of the `parts` prefixes."""
  orphans = sorted(k for k in weight_map if not k.startswith(parts))
  if orphans:
    raise ValueError(f"{directory}: unexpected tensor(s) {orphans[:5]} ({len(orphans)} in all, "
                     f"e.g. in {weight_map[orphans[0]]}) belong to no part of {architecture}")


__all__ = ["LM_PREFIXES", "check_parts", "find_prefix", "lm_prefixes"]
