"""The "real model" fixtures of tests/real_models.py look like the real Qwen3, Qwen2.5 and
Llama 3.x tokenizers, chat templates and models (issue 12)."""

import hashlib
import json
import random
import shutil
import unicodedata

import pytest
import real_models
import transformers

from wakea_jax.checkpoints.hf import config_from_hf, read_hf_config

KINDS = real_models.KINDS
# (regular tokens, len(tokenizer), embedding rows, bos, eos, pad) of the real ones.
LAYOUT = {
    "qwen3": (151_643, 151_669, 151_936, None, "<|im_end|>", "<|endoftext|>"),
    "qwen2_5": (151_643, 151_665, 151_936, None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (128_000, 128_256, 128_256, "<|begin_of_text|>", "<|eot_id|>", None),
}
IDS = {
    "qwen3": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
              "<tool_call>": 151657, "</tool_call>": 151658, "<|file_sep|>": 151664,
              "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
              "</think>": 151668},
    "qwen2_5": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|video_pad|>": 151656, "<tool_call>": 151657, "<|file_sep|>": 151664},
    "llama3": {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
               "<|reserved_special_token_0|>": 128002, "<|finetune_right_pad_id|>": 128004,
               "<|reserved_special_token_2|>": 128005, "<|start_header_id|>": 128006,
               "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
               "<|python_tag|>": 128010, "<|reserved_special_token_3|>": 128011,
               "<|reserved_special_token_247|>": 128255},
}
# The templates are verbatim copies (see tests/real_models.py for their sources).
TEMPLATE_SHA256 = {
    "qwen3": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
    "qwen2_5": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "llama3_1": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "llama3_2": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"role": "assistant", "content": "",
        "reasoning_content": "The user wants the weather, so I call the tool.",
        "tool_calls": [{"type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "content": '{"temperature_c": 18}'}
CONVERSATION = [SYSTEM, USER, CALL, RESULT]

ENGLISH = ("The river begins as a thin thread of water high in the hills, where snow lingers "
           "into early summer. People who grew up beside it say they can tell the season.")


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
  return request.param


@pytest.fixture(scope="module")
def tok(kind):
  return transformers.AutoTokenizer.from_pretrained(real_models.cached_tokenizer_dir(kind))


def _render(tok, messages, **kwargs):
  return tok.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                 add_generation_prompt=True, **kwargs)


def test_templates_are_the_verbatim_copies():
  for name, digest in TEMPLATE_SHA256.items():
    text = real_models.chat_template(name)
    assert hashlib.sha256(text.encode()).hexdigest() == digest, name
  assert "ns.multi_step_tool" in real_models.chat_template("qwen3")
  assert "enable_thinking" in real_models.chat_template("qwen3")
  assert "You are Qwen, created by Alibaba Cloud" in real_models.chat_template("qwen2_5")
  assert "Cutting Knowledge Date" in real_models.chat_template("llama3_1")
  with pytest.raises(ValueError, match="no chat template"):
    real_models.chat_template("mistral")


def test_tokenizer_has_the_real_layout(kind, tok):
  regular, total, rows, bos, eos, pad = LAYOUT[kind]
  assert len(tok) == total and total <= rows == real_models.SPECS[kind]["config"]["vocab_size"]
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
  for token, token_id in IDS[kind].items():
    assert tok.convert_tokens_to_ids(token) == token_id, token
    assert tok.convert_ids_to_tokens(token_id) == token
  assert real_models.added_tokens(kind) == {i: tok.convert_ids_to_tokens(i)
                                            for i in range(regular, total)}
  spec = json.loads((real_models.cached_tokenizer_dir(kind) / "tokenizer.json").read_text())
  assert len(spec["model"]["vocab"]) == regular
  assert sorted(spec["model"]["vocab"].values()) == list(range(regular))
  assert [t["id"] for t in spec["added_tokens"]] == list(range(regular, total))
  split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
  assert split == (real_models.QWEN2_REGEX if kind != "llama3" else real_models.LLAMA3_REGEX)
  assert ("\\p{N}{1,3}" in split) == (kind == "llama3")   # Qwen splits digits one by one
  if kind == "llama3":
    assert tok("hi")["input_ids"][0] == 128000                # the post-processor adds bos
    assert spec["model"]["ignore_merges"] is True
  else:
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    assert spec["normalizer"] == {"type": "NFC"}
    # The chat tokens of Qwen past <|video_pad|> are added but not special (as in the real one).
    assert tok.decode([151644, 151657], skip_special_tokens=True) == "<tool_call>"


def test_text_round_trips_and_english_gets_long_tokens(kind, tok):
  rng = random.Random(0)
  alphabet = ("abcXYZ 019 .,;:!?'\"()[]{}<>|\\/\t\n\r\u00e9\u00fc\u00df\u0301\u4e2d\u6587"
              "\u3042\u0416\u05d0\u0627\U0001f600\U0001f44d\u200b\x00\x7f")
  texts = [ENGLISH, "  leading and trailing  ", "<|im_start|>user\nhi<|im_end|>",
           "x = [1, 22, 333, 4444] # code"]
  texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(200)]
  for text in texts:
    if kind != "llama3":
      text = unicodedata.normalize("NFC", text)   # Qwen's normalizer; Llama 3 has none
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
  ids = tok.encode(ENGLISH, add_special_tokens=False)
  assert len(ids) < len(ENGLISH) / 3
  assert all(i < LAYOUT[kind][0] for i in ids)


def test_qwen3_chat_template():
  tok = transformers.AutoTokenizer.from_pretrained(real_models.cached_tokenizer_dir("qwen3"))
  text = _render(tok, CONVERSATION)
  tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
  assert text == (
      "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more "
      "functions to assist with the user query.\n\nYou are provided with function signatures "
      f"within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, "
      "return a json object with function name and arguments within <tool_call></tool_call> "
      "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
      "</tool_call><|im_end|>\n"
      "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
      "<|im_start|>assistant\n<think>\nThe user wants the weather, so I call the tool.\n"
      "</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
      "\n</tool_call><|im_end|>\n"
      "<|im_start|>user\n<tool_response>\n{\"temperature_c\": 18}\n</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n")
  no_think = _render(tok, CONVERSATION, enable_thinking=False)
  assert no_think == text + "<think>\n\n</think>\n\n"
  # Reasoning before the last user query is dropped; <think> in content is split off.
  earlier = [USER, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nSunny."},
             {"role": "user", "content": "And tomorrow?"}]
  rendered = tok.apply_chat_template(earlier, tokenize=False, add_generation_prompt=True)
  assert "hmm" not in rendered and "<|im_start|>assistant\nSunny.<|im_end|>" in rendered
  ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True,
                                return_dict=False)
  assert ids[0] == 151644 and ids.count(151667) == 1
  assert ids.count(151657) == text.count("<tool_call>") == 3
  assert tok.decode(ids) == text


def test_qwen2_5_chat_template():
  tok = transformers.AutoTokenizer.from_pretrained(real_models.cached_tokenizer_dir("qwen2_5"))
  text = _render(tok, CONVERSATION[1:])                  # no system message: Qwen's default
  assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
                         "a helpful assistant.\n\n# Tools\n\n")
  assert text.endswith(
      "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
      "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
      "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temperature_c\": 18}\n"
      "</tool_response><|im_end|>\n<|im_start|>assistant\n")
  assert "<think>" not in text
  plain = tok.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
  assert plain == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user"
                   "\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_chat_template(tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(real_models.cached_tokenizer_dir("llama3"))
  text = _render(tok, CONVERSATION, date_string="01 Feb 2025")
  tools = "".join(json.dumps(t, indent=4) + "\n\n" for t in TOOLS)
  assert text == (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
      "Cutting Knowledge Date: December 2023\nToday Date: 01 Feb 2025\n\n"
      "You are a helpful assistant.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please "
      "respond with a JSON for a function call with its proper arguments that best answers the "
      "given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
      f"dictionary of argument name and its value}}.Do not use variables.\n\n{tools}"
      "What is the weather in Paris?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n"
      "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"
      # A string is `iterable` in Jinja, so the real template JSON-quotes string tool results.
      f"<|start_header_id|>ipython<|end_header_id|>\n\n{json.dumps(RESULT['content'])}<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  default_date = tok.apply_chat_template([USER], tokenize=False)
  assert "Today Date: 26 Jul 2024\n\n<|eot_id|>" in default_date
  ids = tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=True, return_dict=False)
  assert ids[:2] == [128000, 128006] and ids.count(128000) == 1 and ids[-2] == 128007
  assert tok.decode(ids[-1:]) == "\n\n"
  llama3_2 = real_models.build_tokenizer("llama3", tmp_path, chat_template_name="llama3_2")
  tok32 = transformers.AutoTokenizer.from_pretrained(llama3_2)
  assert "Today Date: 01 Feb 2025" in _render(tok32, CONVERSATION, date_string="01 Feb 2025")


# Llama-3.2-1B's width makes its 2-layer model 1.5 GB of float32 (about 10 s to build).
@pytest.mark.parametrize("kind", ["qwen3", "qwen2_5",
                                  pytest.param("llama3", marks=pytest.mark.slow)])
def test_model_directory_loads_like_a_downloaded_one(kind, tmp_path_factory):
  import torch

  directory = tmp_path_factory.mktemp(f"model-{kind}")
  try:
    real_models.build_model(kind, directory, num_layers=2, seed=3)
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    real = real_models.SPECS[kind]["config"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == real["architectures"][0] and model.dtype == torch.float32
    config = model.config
    assert config.num_hidden_layers == 2 and config.vocab_size == real["vocab_size"]
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (real["hidden_size"], real["intermediate_size"],
                                            real["num_attention_heads"],
                                            real["num_key_value_heads"])
    assert config.tie_word_embeddings and model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    assert model.get_input_embeddings().weight.shape[0] == real["vocab_size"]
    ours = config_from_hf(read_hf_config(directory))
    assert (ours.num_layers, ours.vocab_size, ours.tie_embeddings) == (2, real["vocab_size"], True)
    assert (ours.rope_scaling is not None) == (kind == "llama3")
    if kind == "llama3":
      assert ours.rope_scaling.factor == 32.0 and ours.rope_theta == 500_000.0
    norm = model.model.norm.weight
    assert not torch.all(norm == 1.0) and abs(float(norm.detach().mean()) - 1.0) < 0.01
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tok(["Hello world"], return_tensors="pt")
    with torch.no_grad():
      logits = model(**batch).logits
    assert logits.shape[-1] == real["vocab_size"] and torch.isfinite(logits).all()
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == real_models.SPECS[kind]["generation"]["eos_token_id"]
  finally:
    shutil.rmtree(directory, ignore_errors=True)
