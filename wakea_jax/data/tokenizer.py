"""One `Tokenizer` protocol with two backends: SentencePiece `.model` files and HF `tokenizer.json`.

Both backends read local files only; nothing here ever talks to the Hugging Face hub.

Policies shared by every implementation:

* `encode(text)` returns plain ids. BOS/EOS are added only when asked (`add_bos`/`add_eos`);
  an HF post-processor template is never applied, so a tokenizer.json that would add `<s>`
  by itself does not add it twice.
* `bos_id`, `eos_id`, `pad_id` are `int | None`: `None` means the tokenizer has no such token
  (SentencePiece reports -1, HF configs say `null`; both become `None`). Callers choose their
  own fallback, e.g. `tok.pad_id if tok.pad_id is not None else tok.eos_id`, because padding
  positions are masked anyway and the choice belongs to the pipeline, not the tokenizer.
* `special_ids` maps the text of every control token to its id: BOS/EOS/PAD/UNK, the backend's
  own special tokens (SentencePiece control symbols, HF added tokens marked `special`), and
  every chat token in `CHAT_SPECIAL_TOKENS` that encodes to a single id. `decode(...,
  skip_special=True)` drops exactly these ids; otherwise every id is rendered as its text, so
  generated `<tool_call>...</tool_call>` blocks survive decoding and can be parsed.
* Special-token strings that appear *in text* are encoded as their single ids by `encode`
  (SentencePiece user_defined_symbols and HF added tokens are matched before the model runs,
  and there is no per-call switch in either library). That is what trusted text such as chat
  markup and assistant output needs. Untrusted text (system/user/tool message content) must
  not smuggle control tokens into a sequence, so `wakea_jax.data.chat` neutralises them
  before calling `encode`; see `chat.py` for how. Loss masks never depend on this, because
  the chat renderer computes masks per segment rather than by searching for control ids.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm
import tokenizers

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
THINK_START = "<think>"
THINK_END = "</think>"

# The chat control tokens used by `wakea_jax.data.chat` (Qwen-style ChatML plus tool and
# reasoning tags). A tokenizer should have each as a single id; the renderer still works
# (as plain text) for the tag tokens when it does not, but needs IM_START and IM_END.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    IM_START,
    IM_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
    TOOL_RESPONSE_START,
    TOOL_RESPONSE_END,
    THINK_START,
    THINK_END,
)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_TOKENIZER_PATH = ASSETS_DIR / "tokenizer.model"
DEFAULT_CORPUS_PATH = ASSETS_DIR / "corpus.txt"

# SentencePiece maps " " to U+2581 before segmentation and maps U+2581 back to " " when
# decoding, so a literal U+2581 in the input would come back as a space.
_SP_SPACE = "\u2581"


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, chat renderer and sampler need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of ids, i.e. one more than the largest id `encode` can return."""
    ...

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None if the tokenizer has none."""
    ...

  @property
  def eos_id(self) -> int | None:
    """End-of-sequence id, or None if the tokenizer has none."""
    ...

  @property
  def pad_id(self) -> int | None:
    """Padding id, or None if the tokenizer has none (callers choose their own fallback)."""
    ...

  @property
  def special_ids(self) -> Mapping[str, int]:
    """Control-token text -> id (see the module docstring for what is included)."""
    ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text`, BOS/EOS only when asked; special-token text becomes its single id."""
    ...

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of `ids`; `skip_special` drops the ids of `special_ids`, else every id is rendered."""
    ...

  def token_to_id(self, piece: str) -> int | None:
    """Id of a vocabulary entry (exact piece/token text), or None if there is none."""
    ...

  @property
  def chat_templates(self) -> Mapping[str, str]:
    """The tokenizer's own jinja chat templates by name ("default", "tool_use"); empty when
    it has none, and chats are then rendered as ChatML (see `wakea_jax.data.chat`)."""
    ...

  @property
  def token_strings(self) -> Mapping[str, str]:
    """"bos_token"/"eos_token"/"pad_token"/"unk_token" -> text, as chat templates read them."""
    ...


def _read_bytes(path: Path, what: str) -> bytes:
  if not path.exists():
    raise FileNotFoundError(f"{path}: {what} not found")
  if path.is_dir():
    raise IsADirectoryError(f"{path}: expected a {what} file, found a directory")
  return path.read_bytes()  # an OSError here (e.g. permissions) already names the path


def _with_bos_eos(ids: list[int], tokenizer: Tokenizer, add_bos: bool, add_eos: bool,
                  where: object) -> list[int]:
  if add_bos:
    if tokenizer.bos_id is None:
      raise ValueError(f"{where}: add_bos=True but the tokenizer has no BOS token")
    ids.insert(0, tokenizer.bos_id)
  if add_eos:
    if tokenizer.eos_id is None:
      raise ValueError(f"{where}: add_eos=True but the tokenizer has no EOS token")
    ids.append(tokenizer.eos_id)
  return ids


def _checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  # Accepts numpy arrays too; out-of-range ids are a bug upstream (e.g. sampling from padded
  # logits), and both backends would otherwise fail with an opaque error or silently skip.
  out = [int(i) for i in ids]
  for i in out:
    if not 0 <= i < vocab_size:
      raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
  return out


def _chat_special_ids(tokenizer: Tokenizer) -> dict[str, int]:
  # A chat token counts only if plain `encode` produces it as one id: a piece that merely
  # exists in the vocabulary may never be emitted whole, so it is not a usable control id.
  found = {}
  for token in CHAT_SPECIAL_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None and tokenizer.encode(token) == [token_id]:
      found[token] = token_id
  return found


class _TokenizerIds:
  """The id properties both implementations share; subclasses set the private fields."""

  _vocab_size: int
  _bos_id: int | None
  _eos_id: int | None
  _pad_id: int | None
  _special_ids: dict[str, int]

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    return self._pad_id

  @property
  def special_ids(self) -> Mapping[str, int]:
    return dict(self._special_ids)


class SentencePieceTokenizer(_TokenizerIds):
  """A SentencePiece `.model` file.

    Chat tokens are single ids when the model was trained with them as user_defined_symbols
    (see `wakea_jax.data.train_tokenizer`). A model trained there (byte_fallback, identity
    normalisation, no dummy prefix) round-trips every string exactly through encode/decode,
    including a literal U+2581, which is encoded as its UTF-8 byte pieces because
    SentencePiece would otherwise decode it as a space. Other models are used as they are:
    one that normalises text or adds a dummy prefix decodes to its normalised form.
    """

  def __init__(self, path: str | os.PathLike[str]) -> None:
    self.path = Path(path)
    self._load(_read_bytes(self.path, "SentencePiece model"))

  def _load(self, model_proto: bytes) -> None:
    self._model_proto = model_proto
    sp = spm.SentencePieceProcessor()
    try:
      # Loading from bytes (not a path) keeps non-ASCII paths working on every platform.
      sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, TypeError) as err:
      raise ValueError(f"{self.path}: not a valid SentencePiece model: {err}") from err
    if sp.get_piece_size() == 0:
      raise ValueError(f"{self.path}: not a valid SentencePiece model: empty vocabulary")
    self._sp = sp
    n = sp.get_piece_size()
    self._vocab_size = n

    def optional(token_id: int) -> int | None:
      return token_id if token_id >= 0 else None

    self._bos_id = optional(sp.bos_id())
    self._eos_id = optional(sp.eos_id())
    self._pad_id = optional(sp.pad_id())
    # Control symbols and UNK have no surface text in SentencePiece's decoder; decode()
    # renders them as their piece text so both backends decode alike.
    self._surface_less = {
        i: sp.id_to_piece(i)
        for i in range(n) if sp.is_control(i) or sp.is_unknown(i)
    }
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    has_bytes = all(sp.is_byte(i) for i in byte_ids)
    verbatim = sp.decode(sp.encode("x") + sp.encode("y")) == "xy" and (sp.decode(
        sp.encode(" x  y ")) == " x  y ")
    self._sp_space_ids = ([byte_ids[b]
                           for b in _SP_SPACE.encode("utf-8")] if has_bytes and verbatim else [])
    special = {piece: i for i, piece in self._surface_less.items()}
    special.update(_chat_special_ids(self))  # needs encode(), hence last
    self._special_ids = special
    self._special_id_set = frozenset(special.values())

  @property
  def chat_templates(self) -> Mapping[str, str]:
    """Empty: a `.model` file carries no chat template (chats render as ChatML, see chat.py)."""
    return {}

  @property
  def token_strings(self) -> Mapping[str, str]:
    """bos_token/eos_token/pad_token/unk_token -> their piece text, for the ones it has."""
    ids = {"bos_token": self._bos_id, "eos_token": self._eos_id, "pad_token": self._pad_id,
           "unk_token": self._sp.unk_id()}
    return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i is not None and i >= 0}

  def token_to_id(self, piece: str) -> int | None:
    """Id of the piece with exactly this text, or None (SentencePiece alone would answer UNK)."""
    token_id = self._sp.piece_to_id(piece)
    # piece_to_id answers UNK for anything unknown; only an exact match is a real entry.
    return token_id if self._sp.id_to_piece(token_id) == piece else None

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text`, BOS/EOS only when asked; a literal U+2581 is kept (as byte pieces)."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    if _SP_SPACE in text and self._sp_space_ids:
      ids = self._encode_keeping_sp_space(text)
    else:
      ids = self._sp.encode(text)
    return _with_bos_eos(ids, self, add_bos, add_eos, self.path)

  def _encode_keeping_sp_space(self, text: str) -> list[int]:
    # Rare path: spell each literal U+2581 as its UTF-8 byte pieces, which decode to
    # U+2581 rather than " ". Encoding the parts between separately is exact only for a
    # verbatim model (no dummy prefix, whitespace kept), which __init__ checked.
    ids: list[int] = []
    for k, part in enumerate(text.split(_SP_SPACE)):
      if k:
        ids.extend(self._sp_space_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of `ids`; control and UNK ids render as their piece text unless `skip_special`."""
    ids = _checked_ids(ids, self._vocab_size)
    if skip_special:
      ids = [i for i in ids if i not in self._special_id_set]
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
      piece = self._surface_less.get(i)
      if piece is None:
        run.append(i)
        continue
      if run:
        parts.append(self._sp.decode(run))
        run = []
      parts.append(piece)
    if run:
      parts.append(self._sp.decode(run))
    return "".join(parts)

  # SentencePieceProcessor is not reliably picklable; grain worker processes need the
  # tokenizer, so pickle the model bytes (not the path, which may not exist over there).
  def __getstate__(self) -> dict[str, Any]:
    return {"path": str(self.path), "model_proto": self._model_proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.path = Path(state["path"])
    self._load(state["model_proto"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self._vocab_size})"


def _token_content(value: Any, where: str) -> str | None:
  # HF configs write special tokens either as a string or as a serialised AddedToken dict.
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def _read_json_object(path: Path) -> dict[str, Any]:
  try:
    data = json.loads(_read_bytes(path, "JSON file").decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: not valid JSON: {err}") from err
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


class HFTokenizer(_TokenizerIds):
  """A Hugging Face fast tokenizer read from a local `tokenizer.json`.

    `path` is a directory holding `tokenizer.json` or the `tokenizer.json` file itself.
    BOS/EOS/PAD/UNK come from `tokenizer_config.json`, then `special_tokens_map.json`, next to
    it (the config wins, as in transformers); a token named by neither is `None`.
    """

  _SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

  def __init__(self, path: str | os.PathLike[str]) -> None:
    self.path = Path(path)
    json_path = self.path / "tokenizer.json" if self.path.is_dir() else self.path
    text = _read_bytes(json_path, "tokenizer.json").decode("utf-8", errors="replace")
    try:
      tok = tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception on malformed input
      raise ValueError(f"{json_path}: not a valid tokenizer.json: {err}") from err
    # A tokenizer.json may enable padding/truncation; silent truncation would corrupt data.
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    self._json_path = json_path

    added = tok.get_added_tokens_decoder()
    self._vocab_size = max([tok.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])
    named = self._named_special_tokens(json_path.parent)
    ids: dict[str, int | None] = {}
    for key in self._SPECIAL_KEYS:
      content, source = named.get(key, (None, None))
      token_id = None if content is None else tok.token_to_id(content)
      if content is not None and token_id is None:
        raise ValueError(f"{source}: {key} {content!r} is not in the vocabulary of {json_path}")
      ids[key] = token_id
    self._bos_id, self._eos_id = ids["bos_token"], ids["eos_token"]
    self._pad_id = ids["pad_token"]

    self._token_strings = {k: named[k][0] for k, i in ids.items() if i is not None}
    self._chat_templates = self._read_chat_templates(json_path.parent)

    special = {t.content: i for i, t in added.items() if t.special}
    special.update({named[k][0]: i for k, i in ids.items() if i is not None})
    special.update(_chat_special_ids(self))
    self._special_ids = special
    self._special_id_set = frozenset(special.values())

  @staticmethod
  def _named_special_tokens(directory: Path) -> dict[str, tuple[str | None, Path]]:
    named: dict[str, tuple[str | None, Path]] = {}
    # Later files only fill keys the earlier ones left unset.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      config_path = directory / name
      if not config_path.is_file():
        continue
      config = _read_json_object(config_path)
      for key in HFTokenizer._SPECIAL_KEYS:
        if key in config and named.get(key, (None, ))[0] is None:
          named[key] = (
              _token_content(config[key], f"{config_path}: {key}"),
              config_path,
          )
    return named

  @staticmethod
  def _read_chat_templates(directory: Path) -> dict[str, str]:
    # As transformers saves them: chat_template.jinja (and chat_templates/NAME.jinja) beside
    # tokenizer.json win over the "chat_template" field of tokenizer_config.json, which is a
    # string or a list of {"name", "template"}.
    templates: dict[str, str] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
      value = _read_json_object(config_path).get("chat_template")
      where = f"{config_path}: chat_template"
      if isinstance(value, str):
        templates["default"] = value
      elif isinstance(value, list):
        for k, entry in enumerate(value):
          if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                  and isinstance(entry.get("template"), str)):
            raise ValueError(f"{where}[{k}]: expected {{'name': str, 'template': str}}")
          templates[entry["name"]] = entry["template"]
      elif value is not None:
        raise ValueError(f"{where}: expected a string or a list of named templates, got "
                         f"{type(value).__name__}")
    for path in sorted((directory / "chat_templates").glob("*.jinja")):
      templates[path.stem] = _read_bytes(path, "chat template").decode("utf-8")
    if (directory / "chat_template.jinja").is_file():
      templates["default"] = _read_bytes(directory / "chat_template.jinja",
                                         "chat template").decode("utf-8")
    return templates

  @property
  def chat_templates(self) -> Mapping[str, str]:
    """The tokenizer's own chat templates by name ("default", "tool_use", ...); may be empty."""
    return dict(self._chat_templates)

  @property
  def token_strings(self) -> Mapping[str, str]:
    """bos_token/eos_token/pad_token/unk_token -> their text, for the ones the tokenizer has."""
    return dict(self._token_strings)

  def token_to_id(self, piece: str) -> int | None:
    """Id of the vocabulary entry or added token with exactly this text, or None."""
    return self._tok.token_to_id(piece)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text` without the post-processor template; BOS/EOS only when asked."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return _with_bos_eos(ids, self, add_bos, add_eos, self._json_path)

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of `ids`; `skip_special` drops the ids of `special_ids`, else every id is rendered."""
    ids = _checked_ids(ids, self._vocab_size)
    if skip_special:
      ids = [i for i in ids if i not in self._special_id_set]
    return self._tok.decode(ids, skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self._vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> SentencePieceTokenizer | HFTokenizer:
  """Opens a local tokenizer, choosing the backend from what `path` is.

    A `.model` file -> SentencePiece; a `.json` file -> HF; a directory -> HF if it holds
    `tokenizer.json`, else SentencePiece if it holds `tokenizer.model`.
    """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
      return SentencePieceTokenizer(path / "tokenizer.model")
    raise FileNotFoundError(f"{path}: directory holds neither tokenizer.json nor tokenizer.model")
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.suffix == ".json":
    return HFTokenizer(path)
  raise ValueError(
      f"{path}: unrecognised tokenizer file; expected a SentencePiece '.model' file, a "
      "'tokenizer.json' file, or a directory holding one of them")


@functools.cache
def default_tokenizer() -> SentencePieceTokenizer:
  """The bundled SentencePiece tokenizer (BPE, 1024 ids, byte fallback, chat tokens).

    Cached: tokenizers are immutable after construction, so one instance can be shared.
    """
  return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)


def tokenizer_from(path: str | os.PathLike[str] | None) -> SentencePieceTokenizer | HFTokenizer:
  """`load_tokenizer(path)`, or the bundled tokenizer when `path` is empty (config.tokenizer)."""
  return load_tokenizer(path) if path else default_tokenizer()


def chat_pad_id(tokenizer: Tokenizer) -> int:
  """The tokenizer's pad id, or 0 when it has none (padding is masked either way)."""
  pad = tokenizer.pad_id
  return pad if pad is not None and pad >= 0 else 0
