"""Trains a SentencePiece model whose encoding composes cleanly with the chat renderer.

The settings are chosen so that `encode` is a pure, lossless segmentation of its input:

* `normalization_rule_name="identity"`: no NFKC, so accents, combining marks, full-width
  characters and tabs reach the model unchanged and decode back byte for byte.
* `add_dummy_prefix=False`, `remove_extra_whitespaces=False`: no space is invented at the start
  of each `encode` call and none is removed, so encoding segments one by one and concatenating
  the ids decodes to the concatenated text (the chat renderer relies on this).
* `byte_fallback=True`: characters outside the vocabulary become UTF-8 byte pieces instead of
  UNK, so any Unicode string round-trips.
* The chat tokens and "\\n" are user_defined_symbols: always one id, never merged with their
  neighbours. A line-based trainer never sees "\\n" otherwise, and making it atomic means a
  segment boundary after a role header's newline cannot split a merge.
* `split_digits=True`: one id per digit, which keeps arithmetic legible to a small model.
* `character_coverage=0.995` (default): the rarest characters get no piece of their own and
  are spelled in bytes; on a small multi-script corpus full coverage would spend most of the
  vocabulary on single CJK/emoji characters and leave few merges for English.
* `num_threads=1` and the whole corpus (no sampling) make training deterministic; sentences are
  fed from Python and the model is written from memory, so the model file records no input
  paths and is identical wherever it is trained.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from wakea_jax.data.tokenizer import CHAT_SPECIAL_TOKENS, DEFAULT_CORPUS_PATH

DEFAULT_USER_DEFINED_SYMBOLS: tuple[str, ...] = (*CHAT_SPECIAL_TOKENS, "\n")
MODEL_TYPES = ("bpe", "unigram")
DEFAULT_CHARACTER_COVERAGE = 0.995

# Fixed ids for the bundled model's control tokens; pad first so zero-padding is padding.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def read_sentences(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
  """Non-empty lines of the UTF-8 text files `inputs`, in order (CRLF tolerated)."""
  if not inputs:
    raise ValueError("no input files given")
  sentences: list[str] = []
  for raw_path in inputs:
    path = Path(raw_path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: training text file not found")
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
      raise ValueError(f"{path}: not UTF-8 text: {err}") from err
    sentences.extend(line.rstrip("\r") for line in text.split("\n") if line.strip())
  if not sentences:
    raise ValueError(f"{', '.join(map(str, inputs))}: no non-empty lines to train on")
  return sentences


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike[str]],
    out_prefix: str | os.PathLike[str],
    vocab_size: int = 1024,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = DEFAULT_USER_DEFINED_SYMBOLS,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
) -> Path:
  """Trains on the lines of `inputs` and writes `{out_prefix}.model` and `.vocab`.

    Returns the path of the `.model` file. The `.vocab` file lists `piece<TAB>score` per id,
    with newline/tab/CR inside pieces escaped as `\\n`, `\\t`, `\\r` (for reading only).
    """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  if vocab_size <= 0:
    raise ValueError(f"vocab_size must be positive, got {vocab_size}")
  sentences = read_sentences(inputs)
  out_prefix = Path(out_prefix)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user_defined_symbols),
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        max_sentence_length=max(4192, max(len(s.encode("utf-8")) for s in sentences)),
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as err:
    raise ValueError(f"SentencePiece training on {', '.join(map(str, inputs))} failed "
                     f"(vocab_size={vocab_size}, model_type={model_type}): {err}") from err
  model_proto = writer.getvalue()
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  model_path = out_prefix.with_name(out_prefix.name + ".model")
  model_path.write_bytes(model_proto)

  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  escape = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})
  vocab_lines = (f"{sp.id_to_piece(i).translate(escape)}\t{sp.get_score(i):g}\n"
                 for i in range(sp.get_piece_size()))
  out_prefix.with_name(out_prefix.name + ".vocab").write_text("".join(vocab_lines),
                                                              encoding="utf-8")
  return model_path


def train_task_tokenizer(
    lines: Iterable[str],
    model_path: str | os.PathLike[str],
    vocab_size: int,
    *,
    corpus_path: str | os.PathLike[str],
    user_defined_symbols: Sequence[str] = DEFAULT_USER_DEFINED_SYMBOLS,
) -> Path:
  """A task's tokenizer at `model_path`, trained once: on the bundled corpus plus the
  non-blank `lines` (written, in order, to `corpus_path`). An existing `model_path` is
  returned as it is and `lines` is not read, so a demonstration's re-run pays nothing; the
  model appears atomically (trained under `<stem>_tmp`, then renamed)."""
  model_path = Path(model_path)
  if model_path.exists():
    return model_path
  corpus_path = Path(corpus_path)
  corpus_path.parent.mkdir(parents=True, exist_ok=True)
  corpus_path.write_text("\n".join(line for line in lines if line.strip()) + "\n",
                         encoding="utf-8")
  trained = train_sentencepiece([str(DEFAULT_CORPUS_PATH), str(corpus_path)],
                                model_path.with_name(model_path.stem + "_tmp"), vocab_size,
                                user_defined_symbols=user_defined_symbols)
  os.replace(trained, model_path)
  return model_path


def train_bytelevel_bpe(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 1024,
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
) -> Path:
  """Trains a GPT-2/Qwen-style ByteLevel BPE and writes an HF tokenizer directory.

    Writes `tokenizer.json` (pad, bos, eos and the chat tokens as special added tokens, ids
    0.. in that order) and a `tokenizer_config.json` naming bos/eos/pad, and returns `out_dir`.
    Used to exercise `HFTokenizer` without the hub; no normaliser and no prefix space, so
    every string round-trips and segments encode independently.
    """
  from tokenizers import Tokenizer as HFTokenizerModel  # local: only this path needs it
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if vocab_size <= 0:
    raise ValueError(f"vocab_size must be positive, got {vocab_size}")
  sentences = read_sentences(inputs)
  special_tokens = [pad_token, bos_token, eos_token, *CHAT_SPECIAL_TOKENS]
  tok = HFTokenizerModel(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=special_tokens,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  # Keep the newlines that read_sentences split on: chat text is full of them.
  tok.train_from_iterator((s + "\n" for s in sentences), trainer=trainer)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_dir / "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": bos_token,
      "eos_token": eos_token,
      "pad_token": pad_token,
  }
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return out_dir
