r"""Checkpoint conversion binary. Exactly one direction per call:

  python -m wakea_jax.convert --from_hf=HF_DIR --out=MODEL_DIR          # HF -> our model dir
  python -m wakea_jax.convert --checkpoint=MODEL_DIR --to_hf=HF_DIR     # our model dir -> HF
  python -m wakea_jax.convert --from_hf=HF_DIR --to_hf=HF_DIR2          # HF -> HF (round trip)

--dtype sets the stored dtype (default: keep the source's); --architecture the HF family
written by --to_hf (default: inferred from the model's features). --tokenizer (with --to_hf)
writes that tokenizer's files, a chat template and a generation_config.json beside the
weights (train/hf_export.py), so transformers' AutoTokenizer loads the directory:

  python -m wakea_jax.convert --checkpoint=/tmp/sft/export/model --to_hf=/tmp/sft_hf \
      --tokenizer=bundled
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from wakea_jax.checkpoints import export, hf
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models.transformer import Transformer
from wakea_jax.sampling.sampler import check_vocab
from wakea_jax.train import hf_export

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("from_hf", None, "HF checkpoint directory to read.")
  flags.DEFINE_string("to_hf", None, "HF checkpoint directory to write.")
  flags.DEFINE_string("out", None, "Model directory to write (with --from_hf).")
  flags.DEFINE_string("checkpoint", None, "Model directory to read (with --to_hf).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Stored dtype; default: the source's.")
  flags.DEFINE_enum("architecture", None, sorted(hf.ARCHITECTURES),
                    "HF architecture for --to_hf; default: inferred.")
  flags.DEFINE_bool("overwrite", False,
                    "Also replace a non-empty output directory that is no checkpoint.")
  flags.DEFINE_string("tokenizer", None,
                      "With --to_hf: the tokenizer to write beside the weights (a .model, a "
                      "tokenizer.json or an HF directory; 'bundled' for the bundled one). "
                      "Default: none from --checkpoint, the source's files from --from_hf.")

USAGE = ("choose exactly one direction: --from_hf=DIR --out=DIR (HF -> model dir), "
         "--checkpoint=DIR --to_hf=DIR (model dir -> HF), or --from_hf=DIR --to_hf=DIR (HF -> HF)")


class ConvertUsageError(ValueError):
  """A bad combination of arguments (main reports it as a usage error)."""


# Files of an HF directory that travel with the weights in an HF -> HF conversion.
_HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "added_tokens.json", "chat_template.jinja")


def _hf_dtype(directory: str) -> str:
  """The dtype an HF checkpoint's config.json says it is stored in (float32 if unsaid)."""
  config = hf.read_hf_config(directory)
  name = config.get("dtype") or config.get("torch_dtype") or "float32"
  return name if name in ("float32", "bfloat16", "float16") else "float32"


def _tokenizer_files(tokenizer: str, model: Transformer, init_from: str) -> dict[str, bytes]:
  """The export files of --tokenizer ('bundled': the bundled tokenizer) for `model`."""
  path = tokenizer_lib.DEFAULT_TOKENIZER_PATH if tokenizer == "bundled" else tokenizer
  tok = tokenizer_lib.load_tokenizer(path)
  check_vocab(tok, model.config, model_source="the converted model")
  return hf_export.side_files(tok, model.config, init_from=init_from)


def run(*, from_hf: str | None = None, to_hf: str | None = None, out: str | None = None,
        checkpoint: str | None = None, dtype: str | None = None, architecture: str | None = None,
        overwrite: bool = False, tokenizer: str | None = None) -> pathlib.Path:
  """Converts one checkpoint (see the module docstring); returns the directory written."""
  given = {name for name, value in (("from_hf", from_hf), ("to_hf", to_hf), ("out", out),
                                    ("checkpoint", checkpoint)) if value}
  if given not in ({"from_hf", "out"}, {"checkpoint", "to_hf"}, {"from_hf", "to_hf"}):
    raise ConvertUsageError(f"{USAGE}; got {sorted('--' + g for g in given) or 'none'}")
  if architecture is not None and not to_hf:
    raise ConvertUsageError("--architecture applies only to --to_hf")
  if tokenizer and not to_hf:
    raise ConvertUsageError("--tokenizer applies only to --to_hf")
  if from_hf:
    model = hf.load_model(from_hf, param_dtype=dtype or _hf_dtype(from_hf))
    if out:
      return export.save_model_dir(model, out, overwrite=overwrite)
    if tokenizer:
      return hf.save_model(model, to_hf, dtype=dtype, architecture=architecture,
                           overwrite=overwrite, files=_tokenizer_files(tokenizer, model, from_hf))
    side = [p for p in (pathlib.Path(from_hf) / n for n in _HF_SIDE_FILES) if p.is_file()]
    return hf.save_model(model, to_hf, dtype=dtype, architecture=architecture,
                         overwrite=overwrite, extra_files=side)
  model = export.load_model_dir(checkpoint)
  files = _tokenizer_files(tokenizer, model, "") if tokenizer else None
  return hf.save_model(model, to_hf, dtype=dtype, architecture=architecture,
                       overwrite=overwrite, files=files)


def main(argv: Sequence[str]) -> None:
  """Converts per the flags and prints the directory written."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    written = run(from_hf=FLAGS.from_hf, to_hf=FLAGS.to_hf, out=FLAGS.out,
                  checkpoint=FLAGS.checkpoint, dtype=FLAGS.dtype,
                  architecture=FLAGS.architecture, overwrite=FLAGS.overwrite,
                  tokenizer=FLAGS.tokenizer)
  except ConvertUsageError as e:
    raise app.UsageError(str(e)) from e
  print(f"wrote {written}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
