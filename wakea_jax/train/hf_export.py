"""What a Hugging Face export carries beside the weights, so that a user can use it as it is:
`AutoTokenizer.from_pretrained(dir)` gives the run's tokenizer with its chat template, and
`model.generate` stops at the end of a turn and never emits an id the tokenizer lacks.

`side_files(tokenizer, model_config)` -> {file name: bytes} for `checkpoints.hf.save_model`:

* the tokenizer's files (`checkpoints.tokenizer_files`): an HF tokenizer's own files, or the
  bundled SentencePiece model converted to an equivalent tokenizer.json; a tokenizer without
  a chat template gets `CHATML_TEMPLATE`, the jinja form of the ChatML layout that
  `wakea_jax.data.chat` renders for such tokenizers (what the run trained on);
* generation_config.json: eos_token_id = the chat stop ids (end of turn, then EOS) plus any
  the source checkpoint's generation config lists, and `suppress_tokens` = the embedding rows
  past the tokenizer's ids (masked by our sampler too; see `sampling.sampler`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import logging

from wakea_jax.checkpoints import loader
from wakea_jax.checkpoints import tokenizer_files as tokenizer_files_lib
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.models.config import ModelConfig

# The ChatML renderer of wakea_jax.data.chat as a jinja chat template (bundled tokenizer).
CHATML_TEMPLATE = tokenizer_lib.ASSETS_DIR / "chat_template.jinja"


def chatml_template() -> str | None:
  """The bundled ChatML chat template, or None (with a warning) if the file is missing."""
  if not CHATML_TEMPLATE.is_file():
    logging.warning("%s is missing: the HF export's tokenizer gets no chat template",
                    CHATML_TEMPLATE)
    return None
  return CHATML_TEMPLATE.read_text(encoding="utf-8")


def _generation_base(*directories: pathlib.Path | None) -> dict[str, Any] | None:
  """The first generation_config.json among `directories` (a source checkpoint's)."""
  for directory in directories:
    if directory is None:
      continue
    file = directory / "generation_config.json"
    if file.is_file():
      try:
        values = json.loads(file.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from e
      if isinstance(values, dict):
        return values
  return None


def _hf_dir(path: str) -> pathlib.Path | None:
  """`path` as an HF checkpoint directory, or None when it is not one."""
  if not path:
    return None
  try:
    kind, directory = loader.resolve(path)
  except FileNotFoundError:
    return None
  return directory if kind == "hf" else None


def hf_base_model(init_from: str) -> str | None:
  """The HF directory a run imported (absolute), for an adapter's base_model_name_or_path."""
  directory = _hf_dir(init_from)
  return str(directory.absolute()) if directory is not None else None


def side_files(tokenizer: tokenizer_lib.Tokenizer, model_config: ModelConfig, *,
               init_from: str = "") -> dict[str, bytes]:
  """Tokenizer files and generation_config.json for an HF export (module docstring).

  `init_from` (the run's, if any) is where a source generation_config.json may be found
  besides the tokenizer's directory. A tokenizer that cannot be written (no path, a
  SentencePiece model with no exact fast equivalent) is left out with a warning: the
  weights are still exported.
  """
  source = getattr(tokenizer, "path", None)
  files: dict[str, bytes] = {}
  if source is None:
    logging.warning("the tokenizer %r has no path; the HF export has no tokenizer files",
                    tokenizer)
  else:
    try:
      files = tokenizer_files_lib.tokenizer_files(source, chat_template=chatml_template(),
                                                  model_max_length=model_config.max_seq_len)
    except (NotImplementedError, ValueError) as e:
      logging.warning("the HF export has no tokenizer files: %s", e)
  source_dir = None
  if source is not None:
    source = pathlib.Path(source)
    source_dir = source if source.is_dir() else source.parent
  base = _generation_base(source_dir, _hf_dir(init_from))
  files["generation_config.json"] = tokenizer_files_lib.generation_config(
      eos_token_ids=chat_stop_ids(tokenizer), bos_token_id=tokenizer.bos_id,
      pad_token_id=tokenizer.pad_id,
      suppress_tokens=range(tokenizer.vocab_size, model_config.vocab_size), base=base)
  return files
