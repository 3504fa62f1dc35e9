"""Tokenizer protocol: both backends, the bundled model, loading errors and the training tool."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wakea_jax.data import train_tokenizer
from wakea_jax.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_CORPUS_PATH,
    DEFAULT_TOKENIZER_PATH,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    default_tokenizer,
    load_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Strings that trip up tokenizers: whitespace at the edges, runs of spaces, tabs, newlines,
# CRLF, accents (precomposed and combining), CJK, emoji with ZWJ and skin tones, RTL text,
# SentencePiece's own space marker, and control-token look-alikes.
TRICKY_TEXTS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing spaces   ",
    "  two  spaces  between  ",
    "tabs\tand\nnewlines\n\n\tindented",
    "windows\r\nline end",
    "café naïve Zoë Müller",
    "cafe\u0301 n\u0303 a\u0308\u0304",  # combining marks
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "שלום مرحبا",
    "\u2581 literal sentencepiece space \u2581\u2581",
    "\u00a0no-break\u3000ideographic space",
    "x = 3.14 * (2 ** 10) // 7 # 1234567890",
    "def f(x):\n    return {'a': [1, 2]}\n",
    "<s> and </s> and <unk> as plain text",
    "\x00\x01\x7f control bytes",
]


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
  return default_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return train_tokenizer.train_bytelevel_bpe([DEFAULT_CORPUS_PATH],
                                             tmp_path_factory.mktemp("hf_tok"),
                                             vocab_size=700)


@pytest.fixture(scope="module")
def hf_tok(hf_dir: Path) -> HFTokenizer:
  return HFTokenizer(hf_dir)


@pytest.fixture(params=["sentencepiece", "hf"])
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
  return request.getfixturevalue("sp_tok" if request.param == "sentencepiece" else "hf_tok")


# --- behaviour shared by both backends -------------------------------------------------------


def test_implements_protocol(any_tok: Tokenizer) -> None:
  assert isinstance(any_tok, Tokenizer)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip(any_tok: Tokenizer, text: str) -> None:
  ids = any_tok.encode(text)
  assert all(0 <= i < any_tok.vocab_size for i in ids)
  assert any_tok.decode(ids) == text


@pytest.mark.parametrize("token", CHAT_SPECIAL_TOKENS)
def test_chat_tokens_are_single_ids(any_tok: Tokenizer, token: str) -> None:
  token_id = any_tok.token_to_id(token)
  assert token_id is not None
  assert any_tok.special_ids[token] == token_id
  assert any_tok.encode(token) == [token_id]
  # Also inside text, with no spaces around it: matched before the model segments.
  ids = any_tok.encode(f"ab{token}cd")
  assert ids.count(token_id) == 1
  assert any_tok.decode(ids) == f"ab{token}cd"


def test_special_ids_are_distinct(any_tok: Tokenizer) -> None:
  ids = list(any_tok.special_ids.values())
  assert len(set(ids)) == len(ids)


def test_bos_eos(any_tok: Tokenizer) -> None:
  plain = any_tok.encode("hi there")
  assert any_tok.encode("hi there", add_bos=True) == [any_tok.bos_id, *plain]
  assert any_tok.encode("hi there", add_eos=True) == [*plain, any_tok.eos_id]
  assert any_tok.encode("", add_bos=True, add_eos=True) == [any_tok.bos_id, any_tok.eos_id]


def test_decode_skip_special(any_tok: Tokenizer) -> None:
  ids = any_tok.encode("<|im_start|>user\nhi<|im_end|>", add_bos=True, add_eos=True)
  assert any_tok.decode(ids, skip_special=True) == "user\nhi"
  rendered = any_tok.decode(ids)
  assert "<|im_start|>user\nhi<|im_end|>" in rendered
  assert rendered.startswith(any_tok.decode([any_tok.bos_id]))
  assert any_tok.decode([any_tok.bos_id]) != ""  # control tokens render as their text


def test_decode_accepts_numpy_and_rejects_out_of_range(any_tok: Tokenizer) -> None:
  np = pytest.importorskip("numpy")
  ids = any_tok.encode("numpy ids")
  assert any_tok.decode(np.asarray(ids, dtype=np.int32)) == "numpy ids"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    any_tok.decode([any_tok.vocab_size])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    any_tok.decode([-1])


def test_token_to_id_unknown_is_none(any_tok: Tokenizer) -> None:
  assert any_tok.token_to_id("definitely-not-a-token-\u2603\u2603") is None


def test_encode_rejects_bytes(any_tok: Tokenizer) -> None:
  with pytest.raises(TypeError, match="expects str"):
    any_tok.encode(b"bytes")  # type: ignore[arg-type]


def test_pickle_round_trip(any_tok: Tokenizer) -> None:
  clone = pickle.loads(pickle.dumps(any_tok))
  text = "pickled café 😀 <think>"
  assert clone.encode(text) == any_tok.encode(text)
  assert clone.special_ids == any_tok.special_ids


# --- SentencePiece specifics ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=64))
def test_sentencepiece_round_trips_any_unicode(text: str) -> None:
  tok = default_tokenizer()
  assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.lists(st.text(max_size=16), max_size=5))
def test_sentencepiece_segments_concatenate(parts: list[str]) -> None:
  # The chat renderer encodes spans separately; no dummy prefix means no spurious spaces.
  tok = default_tokenizer()
  ids = [i for part in parts for i in tok.encode(part)]
  assert tok.decode(ids) == "".join(parts)


def test_bundled_tokenizer(sp_tok: SentencePieceTokenizer) -> None:
  assert DEFAULT_TOKENIZER_PATH.stat().st_size < 300_000
  assert sp_tok.vocab_size == 1024
  assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
  assert sp_tok.special_ids == {
      "<pad>": 0,
      "<unk>": 1,
      "<s>": 2,
      "</s>": 3,
      **{
          token: 4 + k
          for k, token in enumerate(CHAT_SPECIAL_TOKENS)
      },
  }
  assert sp_tok.encode("\n") == [sp_tok.token_to_id("\n")]
  assert default_tokenizer() is sp_tok  # cached


def test_sentencepiece_plain_text_never_yields_bos_eos(sp_tok: SentencePieceTokenizer) -> None:
  # <s>/</s> are SentencePiece control symbols: text that spells them stays text.
  ids = sp_tok.encode("<s>hello</s><pad><unk>")
  assert not {sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id, 1} & set(ids)


def test_sentencepiece_literal_space_marker_is_not_a_space(sp_tok: SentencePieceTokenizer) -> None:
  assert sp_tok.encode("a b") != sp_tok.encode("a\u2581b")
  assert sp_tok.decode(sp_tok.encode("a\u2581b")) == "a\u2581b"


# --- HF specifics ---------------------------------------------------------------------------

CHAT_TEXT = "<|im_start|>user\nhi<|im_end|>\n<think>x</think>"


@pytest.mark.parametrize("text", [*TRICKY_TEXTS, CHAT_TEXT])
def test_hf_matches_transformers(hf_dir: Path, hf_tok: HFTokenizer, text: str) -> None:
  from transformers import PreTrainedTokenizerFast

  reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  ids = hf_tok.encode(text)
  assert ids == reference.encode(text, add_special_tokens=False)
  assert hf_tok.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=48))
def test_hf_bytelevel_round_trips_any_unicode(hf_tok: HFTokenizer, text: str) -> None:
  assert hf_tok.decode(hf_tok.encode(text)) == text


def test_hf_special_ids_from_tokenizer_config(hf_tok: HFTokenizer) -> None:
  assert (hf_tok.pad_id, hf_tok.bos_id, hf_tok.eos_id) == (0, 1, 2)
  assert hf_tok.special_ids["<s>"] == 1
  assert hf_tok.vocab_size == 700


def test_hf_special_tokens_map_and_missing_tokens(hf_dir: Path, tmp_path: Path) -> None:
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  bare = HFTokenizer(tmp_path / "tokenizer.json")  # no config files: nothing is guessed
  assert (bare.bos_id, bare.eos_id, bare.pad_id) == (None, None, None)
  with pytest.raises(ValueError, match="no BOS token"):
    bare.encode("x", add_bos=True)

  # special_tokens_map.json fills what tokenizer_config.json leaves out; AddedToken dicts too.
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "pad_token": null}')
  (tmp_path / "special_tokens_map.json").write_text(
      '{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "<pad>",'
      ' "pad_token": "<pad>"}')
  tok = HFTokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_hf_config_naming_unknown_token(hf_dir: Path, tmp_path: Path) -> None:
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|nope|>"}')
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token '<\|nope\|>'"):
    HFTokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
    HFTokenizer(tmp_path)


# --- loading --------------------------------------------------------------------------------


def test_load_tokenizer_dispatch(hf_dir: Path, tmp_path: Path) -> None:
  assert isinstance(load_tokenizer(DEFAULT_TOKENIZER_PATH), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
  assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
  sp_dir = tmp_path / "sp"
  sp_dir.mkdir()
  shutil.copy(DEFAULT_TOKENIZER_PATH, sp_dir / "tokenizer.model")
  assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    load_tokenizer(tmp_path)
  corrupt = tmp_path / "corrupt.model"
  corrupt.write_bytes(b"this is not a protobuf")
  with pytest.raises(ValueError, match=f"{corrupt}: not a valid SentencePiece model"):
    load_tokenizer(corrupt)
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text('{"model": 3}')
  with pytest.raises(ValueError, match=f"{bad_json}: not a valid tokenizer.json"):
    load_tokenizer(bad_json)
  other = tmp_path / "vocab.txt"
  other.write_text("a\nb\n")
  with pytest.raises(ValueError, match="unrecognised tokenizer file"):
    load_tokenizer(other)
  with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
    SentencePieceTokenizer(tmp_path / "missing.model")


# --- training -------------------------------------------------------------------------------


def test_train_sentencepiece_is_deterministic_and_reproduces_bundled_model(tmp_path: Path) -> None:
  first = train_tokenizer.train_sentencepiece([DEFAULT_CORPUS_PATH], tmp_path / "a" / "tok")
  second = train_tokenizer.train_sentencepiece([DEFAULT_CORPUS_PATH], tmp_path / "b" / "tok")
  assert first == tmp_path / "a" / "tok.model"
  assert (tmp_path / "a" / "tok.vocab").is_file()
  assert first.read_bytes() == second.read_bytes()
  # The shipped asset is exactly what the tool produces from the shipped corpus.
  assert first.read_bytes() == DEFAULT_TOKENIZER_PATH.read_bytes()


def test_train_sentencepiece_small_unigram(tmp_path: Path) -> None:
  path = train_tokenizer.train_sentencepiece([DEFAULT_CORPUS_PATH],
                                             tmp_path / "uni",
                                             800,
                                             model_type="unigram")
  tok = load_tokenizer(path)
  assert tok.vocab_size == 800
  for text in TRICKY_TEXTS:
    assert tok.decode(tok.encode(text)) == text
  for token in CHAT_SPECIAL_TOKENS:
    assert tok.encode(token) == [tok.special_ids[token]]


def test_train_task_tokenizer_trains_once_on_the_bundled_corpus_plus_lines(tmp_path: Path
                                                                          ) -> None:
  lines = ["Zorava Kelt works for Dolvex Institute.", "   ", "Step 1: 3x = 9"]
  model = train_tokenizer.train_task_tokenizer(iter(lines), tmp_path / "tokenizer.model", 1024,
                                               corpus_path=tmp_path / "data" / "corpus.txt")
  assert model == tmp_path / "tokenizer.model" and not (tmp_path / "tokenizer_tmp.model").exists()
  assert (tmp_path / "data" / "corpus.txt").read_text() == (
      "Zorava Kelt works for Dolvex Institute.\nStep 1: 3x = 9\n")
  same = train_tokenizer.train_sentencepiece(
      [DEFAULT_CORPUS_PATH, tmp_path / "data" / "corpus.txt"], tmp_path / "direct", 1024)
  assert model.read_bytes() == same.read_bytes()

  def never_read():
    raise AssertionError("the lines of an existing tokenizer must not be read")
    yield ""

  before = model.read_bytes()
  assert train_tokenizer.train_task_tokenizer(
      never_read(), model, 1024, corpus_path=tmp_path / "data" / "corpus.txt") == model
  assert model.read_bytes() == before


def test_train_sentencepiece_errors(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    train_tokenizer.train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "x")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="no non-empty lines"):
    train_tokenizer.train_sentencepiece([empty], tmp_path / "x")
  with pytest.raises(ValueError, match="model_type"):
    train_tokenizer.train_sentencepiece([empty], tmp_path / "x", model_type="word")
  with pytest.raises(ValueError, match="training .* failed"):
    train_tokenizer.train_sentencepiece([DEFAULT_CORPUS_PATH], tmp_path / "x", 100)


def test_train_tokenizer_tool(tmp_path: Path) -> None:
  extra = tmp_path / "extra.txt"
  extra.write_text("Extra training line. Ещё одна строка.\n", encoding="utf-8")
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  result = subprocess.run(
      [
          sys.executable,
          str(REPO_ROOT / "tools" / "train_tokenizer.py"),
          f"--input={DEFAULT_CORPUS_PATH},{extra}",
          f"--out={tmp_path / 'tool'}",
          "--vocab_size=900",
          "--model_type=bpe",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
      check=False,
  )
  assert result.returncode == 0, result.stderr
  tok = load_tokenizer(tmp_path / "tool.model")
  assert tok.vocab_size == 900
  assert tok.decode(tok.encode("Ещё одна строка 😀")) == "Ещё одна строка 😀"
