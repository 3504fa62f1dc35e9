"""Adversarial inputs to the validators: model output with hostile tool calls, training files
with subtly broken records, and damaged HF checkpoints. Each must give a clear error naming
the file, line (or record) and field, or follow an explicit, counted policy."""

import json
import logging
import random
import re

import numpy as np
import pytest
import safetensors.numpy

from wakea_jax.checkpoints import hf
from wakea_jax.data import chat, sources
from wakea_jax.data.chat import MAX_JSON_DEPTH, MAX_RAW_CHARS, ToolCallParseError
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.transformer import create_model

# ---- 1. parse_tool_calls on hostile model output --------------------------------------------


def _block(body):
  return f"<tool_call>\n{body}\n</tool_call>"


GOOD = _block('{"name": "ok", "arguments": {}}')

HOSTILE_BODIES = [
    ("[" * 1000, "nested more than"),                                     # json recursion
    ("[" * 100_000, "nested more than"),
    ('{"name": "f", "arguments": {"x": ' + "[" * 150 + "]" * 150 + "}}", "nested more than"),
    ('{"name": "f", "arguments": {"x": ' + "9" * 5000 + "}}", "integer of 5000 digits"),
    ('{"name": "f", "arguments": {"x": -' + "9" * 5000 + "}}", "integer of 5000 digits"),
    ('{"name": "f", "arguments": {"x": NaN}}', "NaN is not valid JSON"),
    ('{"name": "f", "arguments": {"x": Infinity}}', "Infinity is not valid JSON"),
    ('{"name": "f", "arguments": {"x": -Infinity}}', "-Infinity is not valid JSON"),
    ('{"name": "f", "arguments": {"x": 1e999}}', "number 1e999 is out of range"),
    ('{"name": "f", "arguments": "{\\"x\\": NaN}"}', "NaN is not valid JSON"),
    ('{"name": "f", "arguments": "' + "[" * 1000 + '"}', "nested more than"),
    ('{"name": "f", "arguments": {"x": "\\ud800"}}', "lone surrogate U+D800"),
    ('{"name": "\\udfff", "arguments": {}}', "lone surrogate U+DFFF"),
]


@pytest.mark.parametrize(("body", "reason"), HOSTILE_BODIES)
def test_hostile_tool_calls_are_reported_not_raised(body, reason):
  text = f"{GOOD}\n{_block(body)}\n{GOOD}"
  calls = chat.parse_tool_calls(text, strict=False)
  assert [c.get("name") for c in calls] == ["ok", None, "ok"]
  assert reason in calls[1]["error"] and "invalid JSON" in calls[1]["error"]
  assert len(calls[1]["raw"]) <= MAX_RAW_CHARS + 40
  with pytest.raises(ToolCallParseError, match=f"tool call 1: .*{re.escape(reason)}") as info:
    chat.parse_tool_calls(text)
  assert isinstance(info.value, ValueError) and info.value.index == 1
  assert len(info.value.raw) <= MAX_RAW_CHARS + 40


def test_valid_json_neighbours_still_parse():
  deep = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)  # call + arguments + this
  text = "".join(_block(body) for body in [
      '{"name": "f", "arguments": {"x": ' + deep + "}}",
      '{"name": "f", "arguments": {"x": ' + "9" * 4000 + ", \"y\": 1e308, \"z\": -0.0}}",
      '{"name": "f", "arguments": {"s": "NaN Infinity \\ud83d\\ude00"}}',
      '{"name": "f", "arguments": "{\\"x\\": 1.5}"}',
  ])
  calls = chat.parse_tool_calls(text)
  assert [c["name"] for c in calls] == ["f"] * 4
  assert calls[1]["arguments"]["x"] == int("9" * 4000) and calls[1]["arguments"]["y"] == 1e308
  assert calls[2]["arguments"]["s"] == "NaN Infinity 😀"
  assert calls[3]["arguments"] == {"x": 1.5}


def test_raw_text_of_a_bad_block_is_bounded():
  huge = "x" * 1_000_000
  [call] = chat.parse_tool_calls(f"<tool_call>{huge}", strict=False)  # unterminated
  assert call["error"] == "missing </tool_call>"
  assert call["raw"].startswith("x" * MAX_RAW_CHARS)
  assert call["raw"].endswith(f"...[{len(huge) - MAX_RAW_CHARS} more characters]")
  [call] = chat.parse_tool_calls(_block(huge), strict=False)
  assert call["error"].startswith("invalid JSON") and len(call["raw"]) < MAX_RAW_CHARS + 40
  with pytest.raises(ToolCallParseError) as info:
    chat.parse_tool_calls(_block(huge))
  assert len(info.value.raw) < MAX_RAW_CHARS + 40 and len(str(info.value)) < 400
  short = '{"name": "f"'  # short blocks are kept whole
  assert chat.parse_tool_calls(_block(short), strict=False)[0]["raw"] == f"\n{short}\n"


def test_non_strict_parsing_never_raises_on_random_output():
  values = ["1", "-2.5e3", '"ok"', "[1, {}]", "null", "NaN", "-Infinity", "1e999", "9" * 5000,
            "[" * 1000, "[" * 150 + "]" * 150, '"\\ud800"', '"\ud800"', '"\\ud83d\\ude00"']
  noise = ["<tool_call>", "</tool_call>", "{", "}", "[", "]", '"', "\\", ":", ",", " ", "é"]
  rng = random.Random(0)
  for _ in range(1000):
    parts = []
    for _ in range(rng.randint(0, 4)):
      value = rng.choice(values)
      arguments = f'{{"x": {value}}}' if rng.random() < 0.8 else json.dumps(f'{{"x": {value}}}')
      body = f'{{"name": "f", "arguments": {arguments}}}'
      if rng.random() < 0.3:  # damage it
        cut = rng.randrange(len(body) + 1)
        body = body[:cut] + "".join(rng.choice(noise) for _ in range(3)) + body[cut:]
      parts.append(_block(body) if rng.random() < 0.9 else f"<tool_call>{body}")
    for call in chat.parse_tool_calls("\n".join(parts), strict=False):
      assert set(call) in ({"name", "arguments"}, {"error", "raw"})
      if "name" in call:  # a returned call is always standard, encodable JSON
        json.dumps(call, allow_nan=False).encode("utf-8")


# ---- 2. training data ------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
CHAT = {"messages": [USER, {"role": "assistant", "content": "hello"}]}
CALL = {"name": "f", "arguments": {"x": 1}}


def _jsonl(path, lines):
  path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
  return path


def _chat(*messages):
  return {"messages": [USER, *messages]}


def _assistant(content="", **fields):
  return {"role": "assistant", "content": content, **fields}


def _tool(content="42"):
  return {"role": "tool", "content": content}


# (JSONL line, field, error after the field) -- each a record that must not be trained on.
BAD_RECORDS = [
    # empty assistant turns
    (_chat(_assistant("")), "messages[1].content", "is empty in an assistant turn"),
    (_chat(_assistant(" \n\t")), "messages[1].content", "is empty in an assistant turn"),
    (_chat(_assistant(None, reasoning="")), "messages[1].content", "is empty"),
    (_chat(_assistant("", reasoning="  ")), "messages[1].content", "is empty"),
    (_chat(_assistant("x"), USER, _assistant("")), "messages[3].content", "is empty"),
    ({"prompt": "p", "response": ""}, "response", "is empty"),
    ({"prompt": "p", "response": "  ", "system": "s"}, "response", "is empty"),
    # broken <tool_call> blocks written in the assistant's content
    (_chat(_assistant('<tool_call>\n{"name": "f", "arguments": {\n</tool_call>')),
     "messages[1].content", r"has a malformed <tool_call> block \(tool call 0: invalid JSON"),
    (_chat(_assistant('ok <tool_call>\n{"name": "f", "arguments": {}}')),
     "messages[1].content", r"malformed <tool_call> block \(tool call 0: missing </tool_call>"),
    (_chat(_assistant('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>')),
     "messages[1].content", r"tool call 0: invalid JSON \(NaN is not valid JSON\)"),
    (_chat(_assistant('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
                      '<tool_call>{"arguments": {}}</tool_call>')),
     "messages[1].content", r"tool call 1: 'name' must be a non-empty string"),
    ({"prompt": "p", "response": "<tool_call>[1, 2]</tool_call>"}, "response",
     "tool call 0: expected a JSON object"),
    # NaN / Infinity in tool-call arguments and tool schemas (Python's json reads them)
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     ' "tool_calls": [{"name": "f", "arguments": {"x": NaN}}]}]}',
     "messages[1].tool_calls[0].arguments", "contains NaN or Infinity"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     ' "tool_calls": [{"name": "f", "arguments": {"x": [1, -Infinity]}}]}]}',
     "messages[1].tool_calls[0].arguments", "contains NaN or Infinity"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     ' "tool_calls": [{"name": "f", "arguments": {"x": 1e999}}]}]}',
     "messages[1].tool_calls[0].arguments", "contains NaN or Infinity"),
    (_chat(_assistant(None, tool_calls=[{"type": "function", "function": {
        "name": "f", "arguments": '{"x": Infinity}'}}])),
     "messages[1].tool_calls[0].function.arguments",
     r"is a string but not valid JSON \(Infinity is not valid JSON\)"),
    (_chat(_assistant("", tool_calls=[{"name": "f", "arguments": "{\"x\": " + "[" * 1000 + "}"}])),
     "messages[1].tool_calls[0].arguments", "is a string but not valid JSON"),
    # misspelt message keys
    (_chat({"role": "assistant", "contnet": "hello"}), "messages[1].contnet",
     r"is not a message field \(did you mean 'content'\?\)"),
    (_chat(_assistant("", tool_call=[CALL])), "messages[1].tool_call",
     r"is not a message field \(did you mean 'tool_calls'\?\)"),
    (_chat(_assistant("x", reasonning="because")), "messages[1].reasonning",
     r"did you mean 'reasoning'"),
    ({"messages": [{"role": "user", "content": "x", "rol": "system"}, _assistant("y")]},
     "messages[0].rol", r"is not a message field \(did you mean 'role'\?\)"),
    # tool results that answer no call
    (_chat(_tool(), _assistant("x")), "messages[1]",
     r": a 'tool' message must follow an assistant message's tool call, but the message "
     r"before it is a 'user' message"),
    ({"messages": [_tool(), _assistant("x")]}, "messages[0]", "but it is the first message"),
    (_chat(_assistant("let me see"), _tool(), _assistant("x")), "messages[2]",
     r"tool result 1 answers no call: the assistant message before it made 0 tool call\(s\)"),
    (_chat(_assistant("", tool_calls=[CALL]), _tool(), _tool(), _assistant("x")), "messages[3]",
     r"tool result 2 answers no call: .* made 1 tool call\(s\)"),
    (_chat(_assistant("", tool_calls=[CALL]), _tool(), USER, _tool(), _assistant("x")),
     "messages[4]", "but the message before it is a 'user' message"),
    # lone surrogates (json.loads accepts them; the tokenizer crashes on them much later)
    (r'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content":'
     r' "a\ud800b"}]}', "messages[1].content",
     r"contains a lone surrogate \(U\+D800 at character 1\)"),
    (r'{"messages": [{"role": "user", "content": "\udc00"}, {"role": "assistant", "content":'
     r' "y"}]}', "messages[0].content", r"lone surrogate \(U\+DC00"),
    (r'{"prompt": "p\ud83d", "response": "r"}', "prompt", "lone surrogate"),
    (r'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",'
     r' "reasoning": "\ud800"}]}', "messages[1].reasoning", "lone surrogate"),
    (r'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     r' "tool_calls": [{"name": "f", "arguments": {"q": "\udbff"}}]}]}',
     "messages[1].tool_calls[0].arguments", "lone surrogate"),
    (r'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
     r' "tool_calls": [{"name": "f\ud800", "arguments": {}}]}]}',
     "messages[1].tool_calls[0].name", "lone surrogate"),
]


@pytest.mark.parametrize(("line", "field", "match"), BAD_RECORDS)
def test_bad_training_records_name_file_line_and_field(tmp_path, line, field, match):
  path = _jsonl(tmp_path / "bad.jsonl", [CHAT, CHAT, line])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: field "
                     rf"'{re.escape(field)}'.*{match}"):
    sources.read_file(path)


@pytest.mark.parametrize(("line", "match"), [
    ('{"messages": ' + "[" * 100_000, r"invalid JSON \(nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, r"invalid JSON \(nested too deeply"),
    ('{"prompt": "p", "response": "r", "n": ' + "7" * 5000 + "}",
     r"invalid JSON \(Exceeds the limit \(4300 digits\)"),
    (r'{"messages": [{"role": "user", "content": "x"}], "tools": [{"default": NaN}]}',
     r"tools\[0\] contains NaN or Infinity"),
    (r'{"messages": [{"role": "user", "content": "x"}], "tools": [{"d": "\ud800"}]}',
     r"tools\[0\] contains a lone surrogate"),
])
def test_unparseable_lines_name_file_and_line(tmp_path, line, match):
  path = _jsonl(tmp_path / "deep.jsonl", [CHAT, CHAT, line])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: {match}"):
    sources.read_file(path)


def test_deep_or_huge_json_file_names_the_file(tmp_path):
  for name, text in [("deep.json", "[" * 100_000), ("long.json", "[" + "1" * 5000 + "]")]:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: invalid JSON"):
      sources.read_file(tmp_path / name)


def test_skip_and_count_counts_every_bad_record(tmp_path, caplog):
  lines = [CHAT]
  for line, _, _ in BAD_RECORDS:
    lines += [line, CHAT]
  lines.append('{"messages": ' + "[" * 100_000)
  path = _jsonl(tmp_path / "mixed.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    source = sources.read_file(path, on_error="skip_and_count")
  bad = len(BAD_RECORDS) + 1
  assert len(source) == len(BAD_RECORDS) + 1 and len(source.skipped) == bad
  for k, (_, field, _) in enumerate(BAD_RECORDS):
    assert source.skipped[k].startswith(f"{path}:{2 * k + 2}: field '{field}'")
  assert source.skipped[-1].startswith(f"{path}:{len(lines)}: invalid JSON (nested too deeply")
  assert f"skipped {bad} malformed record(s), kept {len(source)}" in caplog.text


# Close neighbours of the bad records that are valid and must keep loading.
GOOD_RECORDS = [
    _chat(_assistant("", tool_calls=[CALL]), _tool(), _assistant("done")),
    _chat(_assistant(None, tool_calls=[CALL, CALL]), _tool(), _tool(), _assistant("done")),
    _chat(_assistant("", tool_calls=[CALL]), _tool()),  # ends with a tool result
    _chat(_assistant("", tool_calls=[CALL, CALL]), _tool(), _assistant("one was enough")),
    _chat(_assistant(None, reasoning="just thinking")),  # an assistant turn that only thinks
    _chat(_assistant("x", refusal=None, audio=None)),  # null-valued extra keys carry nothing
    _chat(_assistant("x", name="bot"), {"role": "user", "content": "y", "name": "ann"},
          _assistant("", tool_calls=[CALL]), {**_tool(), "tool_call_id": "c1", "name": "f"},
          _assistant("z")),
    # a valid inline <tool_call> counts as a call for the tool result that follows
    _chat(_assistant('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'), _tool(),
          _assistant("z")),
    _chat(_assistant("I would write <tool_response> or <think> here: fine.")),
    _chat(_assistant("é 😀 中"), {"role": "user", "content": "😀"}, _assistant("ok")),
    _chat(_assistant("", tool_calls=[{"name": "f", "arguments": {"big": 10**300, "f": 1e308,
                                                                   "s": "NaN"}}])),
    {"prompt": "p", "response": "r", "system": "s"},
]


def test_valid_neighbours_still_load_and_tokenize(tmp_path):
  path = _jsonl(tmp_path / "good.jsonl", [*GOOD_RECORDS,
                                         r'{"prompt": "\ud83d\ude00", "response": "ok"}'])
  source = sources.read_file(path)
  assert len(source) == len(GOOD_RECORDS) + 1 and not source.skipped
  assert source.records[-1]["messages"][0]["content"] == "😀"
  tok = default_tokenizer()
  for i in range(len(source)):
    rendered = chat.render(source[i]["messages"], tok, tools=source[i]["tools"])
    assert rendered.loss_mask.any()


def test_lone_surrogate_fails_at_load_not_in_the_tokenizer():
  # Before: validation passed and the pybind11 tokenizer raised a RuntimeError without location.
  messages = [{"role": "user", "content": "a\ud800"}, _assistant("b")]
  with pytest.raises(ValueError, match=r"message 0: field 'content' contains a lone surrogate"):
    chat.render(messages, default_tokenizer())
  with pytest.raises(ValueError, match=r"x\[7\]: field 'messages\[0\]\.content' .*surrogate"):
    sources.to_record({"messages": messages}, "x[7]")


def test_in_memory_tool_calls_with_nan_or_deep_arguments_are_errors():
  for arguments, match in [({"x": float("nan")}, "contains NaN or Infinity"),
                           ({"x": float("inf")}, "contains NaN or Infinity"),
                           ({"x": [[[[]]]] * 2, "y": json.loads("[" * 200 + "]" * 200)},
                            f"is nested more than {MAX_JSON_DEPTH} levels deep")]:
    messages = [USER, _assistant("", tool_calls=[{"name": "f", "arguments": arguments}])]
    with pytest.raises(ValueError, match=rf"message 1: field 'tool_calls\[0\]\.arguments' {match}"):
      chat.render_text(messages)


# ---- 3. HF checkpoints -----------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48, max_seq_len=128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return hf.save_model(create_model(CONFIG), tmp_path_factory.mktemp("hf") / "ckpt")


@pytest.fixture
def checkpoint(saved, tmp_path):
  out = tmp_path / "ckpt"
  out.mkdir()
  for file in saved.iterdir():
    (out / file.name).write_bytes(file.read_bytes())
  return out


def _edit_config(directory, **changes):
  values = json.loads((directory / "config.json").read_text())
  values.pop("rope_parameters", None)  # so that a top-level rope_theta is the one read
  values.update(changes)
  (directory / "config.json").write_text(json.dumps(values))


def _edit_tensors(directory, edit):
  file = str(directory / "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_valid_checkpoint_loads(checkpoint):
  model = hf.load_model(checkpoint)
  assert model.config.num_layers == 2 and model.config.rope_theta == CONFIG.rope_theta


@pytest.mark.parametrize("keep", [0, 4, 7, 50, 1000, -100, -1])
def test_truncated_safetensors_names_the_file(checkpoint, keep):
  file = checkpoint / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
  with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: not a readable safetensors "
                     r"file"):
    hf.load_model(checkpoint)


def test_truncated_shard_names_the_shard(tmp_path):
  out = hf.save_model(create_model(CONFIG), tmp_path / "hf", max_shard_size="10KB")
  shard = sorted(out.glob("model-*.safetensors"))[1]
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}: not a readable"):
    hf.load_model(out)


@pytest.mark.parametrize(("dtype", "code"), [(np.int64, "I64"), (np.bool_, "BOOL"),
                                             (np.int32, "I32"), (np.uint8, "U8")])
def test_non_float_weights_are_errors(checkpoint, dtype, code):
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(checkpoint, lambda t: t.update({name: np.ones(t[name].shape, dtype)}))
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{re.escape(name)}' has "
                     rf"dtype {code}; weights must be one of"):
    hf.load_model(checkpoint)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float_weights_still_load(checkpoint, dtype):
  name = "model.norm.weight"
  _edit_tensors(checkpoint, lambda t: t.update({name: t[name].astype(dtype)}))
  assert hf.load_model(checkpoint).config.num_layers == 2
  assert hf.load_model(checkpoint, dtype="bfloat16").config.param_dtype == "bfloat16"


def test_bfloat16_checkpoint_still_loads(tmp_path):
  out = hf.save_model(create_model(CONFIG), tmp_path / "bf16", dtype="bfloat16")
  assert hf.load_model(out).config.num_layers == 2


@pytest.mark.parametrize(("changes", "field", "problem"), [
    ({"num_hidden_layers": 2.5}, "num_hidden_layers", "must be an integer, got 2.5"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers", "must be an integer, got 2.0"),
    ({"num_hidden_layers": True}, "num_hidden_layers", "must be an integer, got True"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers", "must be an integer, got '2'"),
    ({"vocab_size": 64.5}, "vocab_size", "must be an integer"),
    ({"num_key_value_heads": False}, "num_key_value_heads", "must be an integer"),
    ({"head_dim": 8.0}, "head_dim", "must be an integer"),
    ({"max_position_embeddings": "128"}, "max_position_embeddings", "must be an integer"),
    ({"rope_theta": "abc"}, "rope_theta", "must be a finite number, got 'abc'"),
    ({"rope_theta": "10000"}, "rope_theta", "must be a finite number"),
    ({"rope_theta": float("nan")}, "rope_theta", "must be a finite number"),
    ({"rope_theta": True}, "rope_theta", "must be a finite number"),
    ({"rope_theta": 0}, "rope_theta", "must be > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}},
     "rope_parameters.rope_theta", "must be a finite number"),
    ({"rope_parameters": "default"}, "rope_parameters", "must be an object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0}}, "rope_scaling.factor", "must be a finite number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64.5}},
     "rope_scaling.original_max_position_embeddings", "must be an integer"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps", "must be a finite number"),
    ({"partial_rotary_factor": "1"}, "partial_rotary_factor", "must be a finite number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "must be true or false"),
    ({"attention_bias": "false"}, "attention_bias", "must be true or false"),
])
def test_config_field_types_name_file_and_field(checkpoint, changes, field, problem):
  _edit_config(checkpoint, **changes)
  source = checkpoint / "config.json"
  with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}: field '{re.escape(field)}' "
                     rf"{re.escape(problem)}"):
    hf.load_model(checkpoint)


def test_config_valid_neighbours_still_load(checkpoint):
  _edit_config(checkpoint, rope_theta=500000, rms_norm_eps=1e-5, head_dim=None,
               tie_word_embeddings=False, rope_scaling=None, partial_rotary_factor=1,
               attention_bias=None)
  config = hf.load_model(checkpoint).config
  assert config.rope_theta == 500000.0 and isinstance(config.rope_theta, float)
  assert config.head_dim == 8 and config.norm_eps == 1e-5  # head_dim: hidden // heads


@pytest.mark.parametrize("response, message", [
    ("   ", "must be a non-empty string"),
    ({"role": "assistant", "content": "<tool_call>{broken</tool_call>"}, "malformed <tool_call>"),
    ({"role": "assistant", "content": "ok", "contnet": "x"}, "contnet"),
])
def test_preference_responses_meet_the_training_rules(response, message):
  from wakea_jax.data import preferences
  with pytest.raises(ValueError, match=message):
    preferences.to_pair({"prompt": "q", "chosen": response, "rejected": "no"}, "pairs.jsonl:3")
