"""Trains a SentencePiece tokenizer for wakea_jax.

  python tools/train_tokenizer.py --input=a.txt,b.txt --out=/tmp/tok --vocab_size=1024

writes /tmp/tok.model and /tmp/tok.vocab. With the defaults it reproduces the bundled
wakea_jax/data/assets/tokenizer.model from wakea_jax/data/assets/corpus.txt. The logic lives
in wakea_jax.data.train_tokenizer so that it can be imported and tested.
"""

from collections.abc import Sequence

from absl import app, flags

from wakea_jax.data.tokenizer import DEFAULT_CORPUS_PATH, SentencePieceTokenizer
from wakea_jax.data.train_tokenizer import (
    DEFAULT_CHARACTER_COVERAGE,
    MODEL_TYPES,
    train_sentencepiece,
)

_INPUT = flags.DEFINE_list("input", [str(DEFAULT_CORPUS_PATH)],
                           "Comma-separated UTF-8 text files, one sentence a line.")
_OUT = flags.DEFINE_string("out", None, "Output prefix; writes PREFIX.model and PREFIX.vocab.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1024, "Number of pieces, control tokens included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", list(MODEL_TYPES), "SentencePiece model type.")
_CHARACTER_COVERAGE = flags.DEFINE_float(
    "character_coverage", DEFAULT_CHARACTER_COVERAGE,
    "Share of characters given their own piece; the rest use bytes.")
flags.mark_flag_as_required("out")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model_path = train_sentencepiece(
      _INPUT.value,
      _OUT.value,
      _VOCAB_SIZE.value,
      model_type=_MODEL_TYPE.value,
      character_coverage=_CHARACTER_COVERAGE.value,
  )
  tok = SentencePieceTokenizer(model_path)
  print(f"wrote {model_path} ({model_path.stat().st_size} bytes, vocab_size={tok.vocab_size})")
  print(f"special ids: {tok.special_ids}")


if __name__ == "__main__":
  app.run(main)
