"""The tokenizer files of a Hugging Face export, so `AutoTokenizer.from_pretrained(export_dir)`
gives the run's tokenizer and chat template, and `generate` stops at the end of a turn.

`tokenizer_files(source, ...)` -> {file name: bytes} for the export directory:

* an HF tokenizer (a directory with tokenizer.json, or the tokenizer.json file): its files are
  copied as they are (`HF_TOKENIZER_FILES`, whichever exist), chat template included; only
  when it has no chat template at all is `chat_template` (the ChatML one our renderer uses
  for template-less tokenizers) added to its tokenizer_config.json.
* a SentencePiece `.model` (the bundled tokenizer of every from-scratch run): converted to a
  fast tokenizer.json that encodes and decodes like it (`sentencepiece_tokenizer_json`),
  with a tokenizer_config.json naming its special tokens and holding `chat_template`, and a
  special_tokens_map.json.

plus a generation_config.json (`generation_config`) whose eos_token_id lists the ids that
end a chat turn, and whose `suppress_tokens` lists the embedding rows past the tokenizer's
ids, which our sampler never produces either.

The SentencePiece conversion. SentencePiece BPE encodes by repeatedly merging the adjacent
pair whose concatenation is the highest-scoring piece (leftmost on ties), with no
pre-tokenisation; user-defined symbols are matched first and never merged. The equivalent
`tokenizers` pipeline: normalizer " " -> U+2581 (the model must have identity normalisation,
no dummy prefix, no whitespace removal; a dummy prefix becomes a Prepend), a BPE model over
the same vocabulary whose merges are every split (left, right) of a normal piece into two
normal pieces, ranked by the piece's score, with byte fallback, and user-defined symbols as
added tokens (`<|im_start|>`/`<|im_end|>` special, as Qwen marks them). Control pieces and
UNK are special added tokens. The decoder maps U+2581 back to " ", joins byte pieces and
fuses. `sentencepiece_tokenizer_json` checks the result against SentencePiece on a probe set
and raises on any difference. Two documented differences remain: transformers matches the
control tokens' text (`<s>`, `</s>`, `<pad>`, `<unk>`) in input text, which SentencePiece
spells out character by character, and a literal U+2581 in text is a space to the fast
tokenizer (wakea_jax's SentencePiece wrapper spells it as its UTF-8 bytes).

This module works on paths and bytes only (checkpoints/ sits below data/ in the layers).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers

PathLike = str | os.PathLike[str]

# Files of an HF tokenizer directory that belong in an export beside the weights.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                      "added_tokens.json")
# Chat tokens marked special in the exported tokenizer (skipped by decode(skip_special_tokens));
# the tool and reasoning tags stay plain added tokens, as in Qwen's tokenizers.
_SPECIAL_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
_SP_SPACE = "\u2581"
# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Texts the conversion is checked on: markup, whitespace runs, digits, non-ASCII, bytes.
PROBE_TEXTS = (
    "Hello world", "  leading,   inner  and trailing spaces  ", "tabs\tand\nnew\n\nlines\n",
    "<|im_start|>user\nWhat is 23*19?<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+2\"}}\n"
    "</tool_call>", "<think>\nstep 1\n</think>\n\nThe answer is 437.",
    "12345678901234567890 3.14159 -42", "naïve café, Ünïcödé — “quotes” 日本語 한국어 🤖🚀",
    "x = y + z; print(x)  # comment", "a", " ", "\n", "",
)


def _probe_texts(extra: Iterable[str]) -> list[str]:
  return [*PROBE_TEXTS, *extra]


def _sp_model(model_proto: bytes, source: str) -> sentencepiece_model_pb2.ModelProto:
  model = sentencepiece_model_pb2.ModelProto()
  try:
    model.ParseFromString(model_proto)
  except Exception as e:  # protobuf's DecodeError
    raise ValueError(f"{source}: not a SentencePiece model: {e}") from e
  if not model.pieces:
    raise ValueError(f"{source}: not a SentencePiece model (no pieces)")
  return model


def sentencepiece_tokenizer_json(model_proto: bytes, *, source: str = "SentencePiece model",
                                 check_texts: Iterable[str] = ()) -> str:
  """tokenizer.json text of a fast tokenizer equal to the SentencePiece BPE model.

  Raises NotImplementedError for what has no exact fast equivalent (unigram models, text
  normalisation, whitespace removal) and ValueError if the result encodes or decodes any of
  `PROBE_TEXTS` + `check_texts` differently from SentencePiece.
  """
  model = _sp_model(model_proto, source)
  trainer, norm = model.trainer_spec, model.normalizer_spec
  if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise NotImplementedError(f"{source}: only BPE SentencePiece models convert, not "
                              f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}")
  if norm.precompiled_charsmap or norm.name not in ("identity", ""):
    raise NotImplementedError(f"{source}: normalizer {norm.name!r} has no exact fast-tokenizer "
                              "equivalent here (only 'identity')")
  if norm.remove_extra_whitespaces:
    raise NotImplementedError(f"{source}: remove_extra_whitespaces is not supported")
  if trainer.treat_whitespace_as_suffix:
    raise NotImplementedError(f"{source}: treat_whitespace_as_suffix is not supported")
  pieces = list(model.pieces)
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  normal = {p.piece: (i, p.score) for i, p in enumerate(pieces) if p.type == _NORMAL}
  merges = []
  for piece, (i, score) in normal.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        merges.append((-score, i, normal[left][0], normal[right][0], left, right))
  merges.sort(key=lambda m: m[:4])
  unk = pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(pieces) else None
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(left, right) for *_, left, right in merges], unk_token=unk,
      fuse_unk=True, byte_fallback=trainer.byte_fallback))
  steps = [normalizers.Replace(" ", _SP_SPACE)]
  if norm.add_dummy_prefix:
    steps.insert(0, normalizers.Prepend(" "))
  tok.normalizer = normalizers.Sequence(steps) if len(steps) > 1 else steps[0]
  tok.decoder = decoders.Sequence([decoders.Replace(_SP_SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  added = [AddedToken(p.piece, special=True, normalized=False)
           for p in pieces if p.type in (_UNKNOWN, _CONTROL)]
  added += [AddedToken(p.piece, special=p.piece in _SPECIAL_CHAT_TOKENS, normalized=False)
            for p in pieces if p.type == _USER_DEFINED]
  tok.add_tokens(added)
  text = tok.to_str(pretty=True)
  _check_same(model_proto, tokenizers.Tokenizer.from_str(text), _probe_texts(check_texts),
              source)
  return text


def _check_same(model_proto: bytes, fast: tokenizers.Tokenizer, texts: Sequence[str],
                source: str) -> None:
  """Raises ValueError naming the first text that encodes or decodes differently."""
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(model_proto)
  controls = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if sp.is_control(i) or sp.is_unknown(i)}
  for text in texts:
    if _SP_SPACE in text or any(c in text for c in controls):
      continue  # the documented differences (module docstring)
    want = sp.encode(text)
    got = fast.encode(text, add_special_tokens=False).ids
    if got != want:
      raise ValueError(f"{source}: the converted tokenizer encodes {text!r} as {got[:16]}, "
                       f"SentencePiece as {want[:16]}")
    if fast.decode(got, skip_special_tokens=False) != sp.decode(want):
      raise ValueError(f"{source}: the converted tokenizer decodes {want[:16]} differently")


def _piece(model: sentencepiece_model_pb2.ModelProto, index: int) -> str | None:
  return model.pieces[index].piece if 0 <= index < len(model.pieces) else None


def sentencepiece_files(model_file: PathLike, *, chat_template: str | None = None,
                        model_max_length: int | None = None,
                        check_texts: Iterable[str] = ()) -> dict[str, bytes]:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a `.model` file."""
  path = pathlib.Path(model_file)
  proto = path.read_bytes()
  model = _sp_model(proto, str(path))
  trainer = model.trainer_spec
  special = {"bos_token": _piece(model, trainer.bos_id), "eos_token": _piece(model, trainer.eos_id),
             "pad_token": _piece(model, trainer.pad_id), "unk_token": _piece(model, trainer.unk_id)}
  special = {k: v for k, v in special.items() if v is not None}
  config: dict[str, Any] = {
      # Loads tokenizer.json as it is (a model-specific class could rebuild the pipeline).
      "tokenizer_class": "PreTrainedTokenizerFast",
      **special,
      "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "model_input_names": ["input_ids", "attention_mask"],
  }
  if model_max_length:
    config["model_max_length"] = model_max_length
  if chat_template is not None:
    config["chat_template"] = chat_template
  return {
      "tokenizer.json": sentencepiece_tokenizer_json(proto, source=str(path),
                                                     check_texts=check_texts).encode(),
      "tokenizer_config.json": _json_bytes(config),
      "special_tokens_map.json": _json_bytes(special),
  }


def _has_chat_template(directory: pathlib.Path, config: Mapping[str, Any]) -> bool:
  return bool(config.get("chat_template") or (directory / "chat_template.jinja").is_file()
              or any((directory / "chat_templates").glob("*.jinja")))


def hf_files(source: PathLike, *, chat_template: str | None = None) -> dict[str, bytes]:
  """The files of an HF tokenizer (directory or tokenizer.json), `chat_template` added to its
  tokenizer_config.json only when it has no template of its own."""
  path = pathlib.Path(source)
  directory = path if path.is_dir() else path.parent
  if not (directory / "tokenizer.json").is_file() and path.is_dir():
    raise FileNotFoundError(f"{directory}: no tokenizer.json")
  files = {name: (directory / name).read_bytes() for name in HF_TOKENIZER_FILES
           if (directory / name).is_file()}
  if not path.is_dir():
    files["tokenizer.json"] = path.read_bytes()
  for template in sorted((directory / "chat_templates").glob("*.jinja")):
    files[f"chat_templates/{template.name}"] = template.read_bytes()
  if "tokenizer_config.json" in files:
    try:
      config = json.loads(files["tokenizer_config.json"])
    except json.JSONDecodeError as e:
      raise ValueError(f"{directory / 'tokenizer_config.json'}: invalid JSON: {e}") from e
  else:
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
  if chat_template is not None and not _has_chat_template(directory, config):
    config["chat_template"] = chat_template
    files["tokenizer_config.json"] = _json_bytes(config)
  elif "tokenizer_config.json" not in files:
    files["tokenizer_config.json"] = _json_bytes(config)
  return files


def tokenizer_files(source: PathLike, *, chat_template: str | None = None,
                    model_max_length: int | None = None) -> dict[str, bytes]:
  """{file name: bytes} of the tokenizer at `source` (a SentencePiece .model, an HF
  directory or a tokenizer.json) for an HF export; see the module docstring."""
  path = pathlib.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such tokenizer")
  if path.is_dir() and not (path / "tokenizer.json").is_file() and (
      path / "tokenizer.model").is_file():
    path = path / "tokenizer.model"
  if path.is_file() and path.suffix == ".model":
    return sentencepiece_files(path, chat_template=chat_template,
                               model_max_length=model_max_length)
  return hf_files(path, chat_template=chat_template)


def generation_config(*, eos_token_ids: Sequence[int], bos_token_id: int | None = None,
                      pad_token_id: int | None = None, suppress_tokens: Sequence[int] = (),
                      base: Mapping[str, Any] | None = None) -> bytes:
  """generation_config.json: `base` (a source checkpoint's, if any) with eos_token_id
  extended by `eos_token_ids` (end of turn first, so generate stops at turn ends) and
  `suppress_tokens` (ids the tokenizer cannot decode) added."""
  config = dict(base or {})
  eos = config.get("eos_token_id")
  eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  config["eos_token_id"] = list(dict.fromkeys([*eos_token_ids, *eos]))
  if bos_token_id is not None and config.get("bos_token_id") is None:
    config["bos_token_id"] = bos_token_id
  if pad_token_id is not None and config.get("pad_token_id") is None:
    config["pad_token_id"] = pad_token_id
  if suppress_tokens:
    config["suppress_tokens"] = sorted(set(config.get("suppress_tokens") or ())
                                       | set(suppress_tokens))
  return _json_bytes(config)


def _json_bytes(value: Any) -> bytes:
  return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
