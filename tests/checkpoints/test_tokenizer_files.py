"""Tokenizer files of an HF export: the bundled SentencePiece model as a fast tokenizer.json
that encodes and decodes identically (wakea_jax's wrapper, `tokenizers`, and transformers'
AutoTokenizer), its ChatML template (apply_chat_template == chat.render), an HF tokenizer's
files copied, and generation_config.json."""

import json
import random

import pytest

from wakea_jax import convert
from wakea_jax.checkpoints import tokenizer_files
from wakea_jax.data import chat
from wakea_jax.data.tokenizer import (
    DEFAULT_CORPUS_PATH,
    DEFAULT_TOKENIZER_PATH,
    HFTokenizer,
    default_tokenizer,
)
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.train import hf_export

transformers = pytest.importorskip("transformers")

MESSAGES = [
    [{"role": "user", "content": "What is 23*19?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Ünïcödé   spaces\tand\ttabs 日本語 🤖"},
     {"role": "assistant", "content": "Sure.", "reasoning": "think\n  twice"},
     {"role": "user", "content": "Again, with 12345678 digits\n\nand blank lines"}],
    [{"role": "user", "content": "Use the calculator for 2+2."},
     {"role": "assistant", "content": "",
      "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]},
     {"role": "tool", "content": "4"},
     {"role": "assistant", "content": "It is 4."},
     {"role": "user", "content": "Thanks!"}],
]


def _hf_message(message: dict) -> dict:
  """A message as a transformers user writes it (OpenAI shape, reasoning_content)."""
  out = {"role": message["role"], "content": message["content"]}
  if "reasoning" in message:
    out["reasoning_content"] = message["reasoning"]
  if message.get("tool_calls"):
    out["tool_calls"] = [{"type": "function", "function": call}
                         for call in message["tool_calls"]]
  return out


def _texts() -> list[str]:
  """Chat markup, whitespace runs, digits, non-ASCII, byte-fallback characters, corpus lines
  and random strings over an alphabet heavy in spaces and rare characters."""
  texts = list(tokenizer_files.PROBE_TEXTS)
  texts += [chat.render_text(m) for m in MESSAGES]
  texts += ["\t\t  \n \n\n   x", "emoji 🤖🤖🚀 and ZWJ 👩‍💻", "Ω≈ç√∫ µ≤≥÷ ﷽", "\x00\x01\x7f",
            "a" * 300, " " * 17, "<tool_response>\n4\n</tool_response>", "<|im_end|><|im_end|>"]
  lines = DEFAULT_CORPUS_PATH.read_text(encoding="utf-8").splitlines()
  texts += lines[:400] + ["\n".join(lines[400:420])]
  rng = random.Random(0)
  alphabet = " \t\nabcxyzABC0189.,:;<>|_-éüß日本🤖\u00a0\u3000"
  texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
  return texts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The bundled tokenizer's export files, written to a directory."""
  directory = tmp_path_factory.mktemp("tok")
  config = get_preset("tiny", vocab_size=1024 + 64, max_seq_len=512)
  for name, data in hf_export.side_files(default_tokenizer(), config).items():
    (directory / name).write_bytes(data)
  return directory


def test_export_holds_tokenizer_template_and_generation_config(exported):
  names = sorted(p.name for p in exported.iterdir())
  assert names == ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json"]
  config = json.loads((exported / "tokenizer_config.json").read_text())
  assert config["chat_template"] == hf_export.CHATML_TEMPLATE.read_text()
  assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>",
                                                                             "<pad>")
  generation = json.loads((exported / "generation_config.json").read_text())
  tok = default_tokenizer()
  assert generation["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.eos_id]
  assert generation["suppress_tokens"] == list(range(1024, 1024 + 64))


def test_converted_tokenizer_encodes_and_decodes_like_sentencepiece(exported):
  sp = default_tokenizer()
  ours = HFTokenizer(exported)          # wakea_jax's reader of the exported files
  auto = transformers.AutoTokenizer.from_pretrained(exported)
  assert ours.vocab_size == sp.vocab_size == len(auto)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (sp.bos_id, sp.eos_id, sp.pad_id)
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (sp.bos_id, sp.eos_id,
                                                                        sp.pad_id)
  assert ours.special_ids == sp.special_ids
  for text in _texts():
    ids = sp.encode(text)
    assert ours.encode(text) == ids, text
    assert auto.encode(text, add_special_tokens=False) == ids, text
    assert ours.decode(ids) == sp.decode(ids) == text
    assert auto.decode(ids) == text
    assert ours.decode(ids, skip_special=True) == sp.decode(ids, skip_special=True)


def test_apply_chat_template_equals_chat_render(exported):
  auto = transformers.AutoTokenizer.from_pretrained(exported)
  tok = default_tokenizer()
  for messages in MESSAGES:
    for generation_prompt in (True, False):
      if generation_prompt and messages[-1]["role"] == "assistant":
        continue
      ours = chat.render(messages, tok, add_generation_prompt=generation_prompt)
      hf_messages = [_hf_message(m) for m in messages]
      text = auto.apply_chat_template(hf_messages, add_generation_prompt=generation_prompt,
                                      tokenize=False)
      assert text == chat.render_text(messages, add_generation_prompt=generation_prompt)
      ids = auto.apply_chat_template(hf_messages, add_generation_prompt=generation_prompt,
                                     tokenize=True, return_dict=False)
      assert list(ids) == ours.input_ids.tolist()


def test_the_export_renders_chats_like_the_bundled_tokenizer(exported):
  """A later run that takes its tokenizer from this export (init_from a run's workdir) reads
  it through the chat template and must see the same ids and loss masks as the original."""
  sp, ours = default_tokenizer(), HFTokenizer(exported)
  tools = [{"type": "function", "function": {
      "name": "calculator", "description": "Evaluates arithmetic, e.g. 2+2 → 4",
      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
  injected = [{"role": "user", "content": "smuggled <|im_end|> and </s> here"},
              {"role": "assistant", "content": "<think>\nx\n</think>\n\nok"}]
  for messages in [*MESSAGES, injected]:
    for schemas in (None, tools):
      a = chat.render(messages, sp, tools=schemas)
      b = chat.render(messages, ours, tools=schemas)
      assert a.input_ids.tolist() == b.input_ids.tolist()
      assert a.loss_mask.tolist() == b.loss_mask.tolist()
  assert chat.chat_stop_ids(ours) == chat.chat_stop_ids(sp)


def test_conversion_is_checked_against_sentencepiece(monkeypatch):
  proto = DEFAULT_TOKENIZER_PATH.read_bytes()
  tokenizer_files.sentencepiece_tokenizer_json(proto, check_texts=["extra text"])
  # A broken conversion (no merges) is caught by the probe texts.
  real = tokenizer_files.models.BPE
  monkeypatch.setattr(tokenizer_files.models, "BPE",
                      lambda vocab, merges, **kw: real(vocab=vocab, merges=[], **kw))
  with pytest.raises(ValueError, match="encodes 'Hello world'"):
    tokenizer_files.sentencepiece_tokenizer_json(proto)


def test_hf_tokenizer_files_are_copied_and_template_added_only_when_missing(tmp_path, exported):
  source = tmp_path / "hf_tok"
  source.mkdir()
  (source / "tokenizer.json").write_bytes((exported / "tokenizer.json").read_bytes())
  (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  (source / "generation_config.json").write_text(json.dumps({"eos_token_id": 3,
                                                             "temperature": 0.6}))
  tok = HFTokenizer(source)
  config = get_preset("tiny", vocab_size=1024, max_seq_len=512)
  files = hf_export.side_files(tok, config)
  assert files["tokenizer.json"] == (source / "tokenizer.json").read_bytes()
  assert json.loads(files["tokenizer_config.json"]) == {
      "eos_token": "</s>", "chat_template": hf_export.CHATML_TEMPLATE.read_text()}
  # The source's generation config is kept, its eos extended by the end-of-turn id.
  generation = json.loads(files["generation_config.json"])
  assert generation["eos_token_id"] == [tok.token_to_id("<|im_end|>"), 3]
  assert generation["temperature"] == 0.6 and "suppress_tokens" not in generation
  # A tokenizer with its own template keeps it.
  (source / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  files = tokenizer_files.tokenizer_files(source, chat_template="IGNORED")
  assert "chat_template" not in json.loads(files["tokenizer_config.json"])
  assert files["chat_template.jinja"] == b"{{ messages[0]['content'] }}"


def test_convert_writes_the_tokenizer_with_to_hf(tmp_path):
  from wakea_jax.checkpoints import export

  config = get_preset("tiny", vocab_size=1024, max_seq_len=512)
  export.save_model_dir(transformer.create_model(config, seed=0), tmp_path / "native")
  convert.run(checkpoint=str(tmp_path / "native"), to_hf=str(tmp_path / "hf"),
              tokenizer="bundled")
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert auto.encode("<|im_start|>user\nhi", add_special_tokens=False) == (
      default_tokenizer().encode("<|im_start|>user\nhi"))
  assert (tmp_path / "hf" / "generation_config.json").is_file()
  with pytest.raises(convert.ConvertUsageError, match="--tokenizer"):
    convert.run(from_hf=str(tmp_path / "hf"), out=str(tmp_path / "x"), tokenizer="bundled")
  small = get_preset("tiny", vocab_size=512, max_seq_len=512)
  export.save_model_dir(transformer.create_model(small, seed=0), tmp_path / "small")
  with pytest.raises(ValueError, match="1024 ids.*512 embedding rows"):
    convert.run(checkpoint=str(tmp_path / "small"), to_hf=str(tmp_path / "hf2"),
                tokenizer="bundled")
