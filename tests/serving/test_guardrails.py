"""Guardrails: keys, rate limits, request validation, output filters, audit log, config."""

import json
import re
import threading

import pytest

from wakea_jax import config_lib
from wakea_jax.serving import guardrails as g

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"


# -------------------------------------------------------------------------------- API keys


def write_keys(tmp_path, text):
  path = tmp_path / "keys.txt"
  path.write_text(text)
  return path


def test_keys_from_file_names_and_digests(tmp_path):
  path = write_keys(tmp_path, f"# team keys\n\nalice:{KEY_A}\n  {KEY_B}  \n")
  keys = g.APIKeys.from_file(path)
  assert keys.enabled and len(keys) == 2
  ok = keys.check(f"Bearer {KEY_A}")
  assert (ok.ok, ok.status, ok.key_id) == (True, 200, "alice")
  unnamed = keys.check(f"bearer {KEY_B}")   # the scheme is case-insensitive
  assert unnamed.ok and re.fullmatch(r"[0-9a-f]{8}", unnamed.key_id)
  assert KEY_B not in unnamed.key_id and KEY_A not in repr(keys) and KEY_B not in repr(keys)
  # Only digests are stored.
  assert all(KEY_A not in repr(v) and KEY_B not in repr(v) for v in vars(keys).values())


@pytest.mark.parametrize("header, status, words", [
    (None, 401, "missing API key"),
    ("", 401, "missing API key"),
    (KEY_A, 401, "malformed"),
    (f"Basic {KEY_A}", 401, "malformed"),
    (f"Bearer {KEY_A} extra", 401, "malformed"),
    ("Bearer sk-wrong", 403, "invalid API key"),
    (f"Bearer {KEY_A}x", 403, "invalid API key"),
])
def test_keys_refuse(header, status, words):
  keys = g.APIKeys([("alice", KEY_A)])
  result = keys.check(header)
  assert (result.ok, result.status, result.key_id) == (False, status, None)
  assert words in result.message and KEY_A not in result.message
  body = result.body()["error"]
  assert body["type"] == ("authentication_error" if status == 401 else "permission_error")


def test_keys_none_configured_disables_auth():
  keys = g.APIKeys.load(None, "WAKEA_TEST_KEYS", environ={})
  assert not keys.enabled
  result = keys.check(None)
  assert (result.ok, result.key_id) == (True, "anonymous")


def test_keys_from_env_and_file_together(tmp_path):
  path = write_keys(tmp_path, f"alice:{KEY_A}\n")
  keys = g.APIKeys.load(path, "K", environ={"K": f" bob:{KEY_B} , "})
  assert keys.check(f"Bearer {KEY_B}").key_id == "bob"
  assert keys.check(f"Bearer {KEY_A}").key_id == "alice"
  with pytest.raises(ValueError, match=r"\$K: key 'bob' is the same key as key 'alice'"):
    g.APIKeys.load(path, "K", environ={"K": f"bob:{KEY_A}"})
  limits = g.ServeLimits(api_keys_file=str(path), api_keys_env="K")
  assert g.APIKeys.from_limits(limits, environ={}).key_ids() == ["alice"]


@pytest.mark.parametrize("text, match", [
    ("# only comments\n\n", r"keys\.txt holds no keys"),
    ("", r"keys\.txt holds no keys"),
    (f"ok:{KEY_A}\n:{KEY_B}\n", r"keys\.txt:2: nothing before ':'"),
    (f"ok:{KEY_A}\nbad name:{KEY_B}\n", r"keys\.txt:2: a key name may only hold"),
    ("# c\nalice:\n", r"keys\.txt:2: no key after 'alice:'"),
    (f"{KEY_A}\n{KEY_A}\n", r"keys\.txt:2: the same key is already given at .*keys\.txt:1"),
    (f"a:{KEY_A}\na:{KEY_B}\n", r"keys\.txt:2: key id 'a' is already used"),
    (f"a:{KEY_A} {KEY_B}\n", r"keys\.txt:1: an API key may not contain whitespace"),
])
def test_key_file_errors_name_path_and_line(tmp_path, text, match):
  path = write_keys(tmp_path, text)
  with pytest.raises(ValueError, match=match) as info:
    g.APIKeys.from_file(path)
  assert KEY_A not in str(info.value) and KEY_B not in str(info.value)


def test_key_file_unreadable(tmp_path):
  with pytest.raises(ValueError, match=r"cannot read API key file .*missing\.txt"):
    g.APIKeys.from_file(tmp_path / "missing.txt")
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe key")
  with pytest.raises(ValueError, match=r"bin\.txt: not UTF-8"):
    g.APIKeys.from_file(tmp_path / "bin.txt")


def test_keys_compare_in_constant_time(monkeypatch):
  calls = []
  real = g.hmac.compare_digest
  monkeypatch.setattr(g.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
  keys = g.APIKeys([("a", KEY_A), ("b", KEY_B), (None, "sk-third-key-000000")])
  assert keys.check(f"Bearer {KEY_A}").key_id == "a"
  assert len(calls) == 3   # every key is compared, also after the match


# -------------------------------------------------------------------------------- rate limits


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_rate_limiter_refills():
  clock = FakeClock()
  limiter = g.RateLimiter(60, clock=clock)   # one request per second, burst of 60
  assert all(limiter.acquire("a")[0] for _ in range(60))
  allowed, wait = limiter.acquire("a")
  assert not allowed and wait == pytest.approx(1.0)
  assert limiter.acquire("b") == (True, 0.0)   # buckets are per key
  clock.now += 0.5
  allowed, wait = limiter.acquire("a")
  assert not allowed and wait == pytest.approx(0.5)
  clock.now += 0.5
  assert limiter.acquire("a") == (True, 0.0)
  assert not limiter.acquire("a")[0]
  clock.now += 3600   # refills to the burst, no further
  assert sum(limiter.acquire("a")[0] for _ in range(100)) == 60
  assert g.retry_after_header(0.2) == "1" and g.retry_after_header(2.01) == "3"


def test_rate_limiter_generated_tokens():
  clock = FakeClock()
  limiter = g.RateLimiter(0, 600, clock=clock)   # requests unlimited; 10 tokens per second
  assert limiter.acquire("a") == (True, 0.0)
  limiter.charge_tokens("a", 1000)   # 400 over the minute's 600: refused until it has 1 again
  allowed, wait = limiter.acquire("a")
  assert not allowed and wait == pytest.approx(40.1)
  clock.now += wait   # waiting the time it says is enough
  assert limiter.acquire("a")[0]
  with pytest.raises(ValueError, match="tokens must be >= 0"):
    limiter.charge_tokens("a", -1)


def test_rate_limiter_unlimited_and_idle_keys_dropped():
  clock = FakeClock()
  assert all(g.RateLimiter(0, clock=clock).acquire("a")[0] for _ in range(10_000))
  limiter = g.RateLimiter(60, clock=clock, max_keys=10)
  for i in range(10):
    limiter.acquire(f"k{i}")
  clock.now += 60
  limiter.acquire("new")
  assert list(limiter._buckets) == ["new"]


def test_rate_limiter_threads():
  limiter = g.RateLimiter(500, clock=lambda: 0.0)   # the clock stands still: exactly 500 pass
  results = []
  lock = threading.Lock()

  def worker():
    mine = [limiter.acquire("shared")[0] for _ in range(100)]
    with lock:
      results.extend(mine)

  threads = [threading.Thread(target=worker) for _ in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 1600 and sum(results) == 500


# -------------------------------------------------------------------------------- requests

LIMITS = g.ServeLimits(max_tokens=100, default_max_tokens=50, max_messages=4,
                       max_total_chars=1000, max_body_bytes=5000, max_top_logprobs=2)
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def chat(**fields):
  body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
  body.update(fields)
  return {k: v for k, v in body.items() if v is not ...}


def test_chat_valid_request_normalised():
  body = chat(
      messages=[
          {"role": "developer", "content": "be brief"},
          {"role": "user", "content": [{"type": "text", "text": "a"},
                                       {"type": "text", "text": "b"}], "name": "ann"},
          {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
              {"id": "c1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
      max_completion_tokens=80, temperature=0, top_p=0.5, stop="END", seed=7, stream=True,
      stream_options={"include_usage": True}, logprobs=True, top_logprobs=2, tools=[TOOL],
      tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=1,
      presence_penalty=0, response_format={"type": "text"}, user="u-1", metadata={"x": 1},
      store=False)
  req = g.validate_chat_request(body, LIMITS, body_bytes=len(json.dumps(body)))
  assert req.messages == (
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": "a\nb", "name": "ann"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather",
                                            "arguments": '{"city": "Oslo"}'}, "id": "c1"}]},
      {"role": "tool", "content": "sunny", "tool_call_id": "c1"})
  assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (80, 0.0, 0.5,
                                                                              ("END",), 7)
  assert req.stream and req.include_usage and req.logprobs and req.top_logprobs == 2
  assert req.tools[0]["function"]["name"] == "get_weather"
  assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}


def test_chat_defaults():
  req = g.validate_chat_request(chat(stop=None, temperature=None), LIMITS)
  assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream) == (
      50, 1.0, 1.0, (), False)
  assert req.tool_choice == "none" and req.stream_options is None and not req.include_usage
  assert g.validate_chat_request(chat(tools=[TOOL]), LIMITS).tool_choice == "auto"
  assert g.validate_chat_request(chat(stop=["a", "b", "c", "d"]), LIMITS).stop == (
      "a", "b", "c", "d")


def many(n, text="x"):
  return [{"role": "user", "content": text}] * n


@pytest.mark.parametrize("body, status, param, code, words", [
    ([1], 400, None, "invalid_type", "the request body must be a JSON object, got array"),
    ({"messages": many(1)}, 400, "model", "missing_required_parameter", "model is required"),
    (chat(model=3), 400, "model", "invalid_type", "model must be a non-empty string, got integer"),
    (chat(messages=...), 400, "messages", "missing_required_parameter", "messages is required"),
    (chat(messages="hi"), 400, "messages", "invalid_type", "messages must be a list"),
    (chat(messages=[]), 400, "messages", "empty_array", "at least one message"),
    (chat(messages=many(5)), 400, "messages", "array_above_max_length",
     "5 messages; this server accepts at most 4 (serve.max_messages)"),
    (chat(messages=many(2, "x" * 501)), 400, "messages", "string_above_max_length",
     "1002 characters of text (messages and tools); this server accepts at most 1000"),
    (chat(messages=[{"role": "user", "content": "a"}, 5]), 400, "messages[1]", "invalid_type",
     "messages[1] must be an object, got integer 5"),
    (chat(messages=[{"content": "a"}]), 400, "messages[0].role", "missing_required_parameter",
     "messages[0].role is required"),
    (chat(messages=[{"role": "robot", "content": "a"}]), 400, "messages[0].role", "invalid_value",
     "messages[0].role must be one of 'system', 'user', 'assistant', 'tool', got \"robot\""),
    (chat(messages=[{"role": "user"}]), 400, "messages[0].content",
     "missing_required_parameter", "messages[0].content is required for a user message"),
    (chat(messages=many(2) + [{"role": "user", "content": 5}]), 400, "messages[2].content",
     "invalid_type", "messages[2].content must be a string or a list of content parts"),
    (chat(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]),
     400, "messages[0].content[0].type", "unsupported_value", "'file' is not supported"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0].image_url.url", "invalid_type", "must be a string"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}]),
     400, "messages[0].content[0].input_audio.data", "invalid_value", "not valid base64"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]), 400,
     "messages[0].content[0].text", "invalid_type", "must be a string, got integer 1"),
    (chat(messages=[{"role": "user", "content": "\ud800"}]), 400, "messages[0].content",
     "invalid_value", "unpaired UTF-16 surrogate"),
    (chat(messages=[{"role": "user", "content": "a", "name": 3}]), 400, "messages[0].name",
     "invalid_type", "must be a string"),
    (chat(messages=[{"role": "tool", "content": "r"}]), 400, "messages[0].tool_call_id",
     "missing_required_parameter", "tool_call_id is required for a tool message"),
    (chat(messages=[{"role": "user", "content": "a", "tool_calls": []}]), 400,
     "messages[0].tool_calls", "invalid_value", "only allowed on assistant messages"),
    (chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), 400,
     "messages[0].tool_calls[0].function.arguments", "invalid_value", "is not valid JSON"),
    (chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]), 400,
     "messages[0].tool_calls[0].function.arguments", "invalid_type", "must be a JSON object"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"type": "function"}]}]), 400,
     "messages[0].tool_calls[0].function", "invalid_type", "must be an object, got null"),
    (chat(max_tokens=101), 400, "max_tokens", "invalid_value",
     "max_tokens=101 is above this server's cap of 100 tokens per request (serve.max_tokens)"),
    (chat(max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value",
     "max_completion_tokens must be >= 1, got 0"),
    (chat(max_tokens=2.5), 400, "max_tokens", "invalid_type", "max_tokens must be an integer"),
    (chat(max_tokens=True), 400, "max_tokens", "invalid_type", "got boolean true"),
    (chat(max_tokens=10, max_completion_tokens=20), 400, "max_tokens", "invalid_value",
     "disagree"),
    (chat(temperature=2.5), 400, "temperature", "invalid_value",
     "temperature must be between 0 and 2, got 2.5"),
    (chat(temperature="hot"), 400, "temperature", "invalid_type", "must be a number"),
    (chat(temperature=float("nan")), 400, "temperature", "invalid_type", "must be a number"),
    (chat(top_p=0), 400, "top_p", "invalid_value", "top_p must be in (0, 1], got 0"),
    (chat(top_p=1.5), 400, "top_p", "invalid_value", "top_p must be in (0, 1]"),
    (chat(n=3), 400, "n", "unsupported_parameter", "n=3 is not supported: this server returns "
     "one choice per request"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "array_above_max_length",
     "at most 4"),
    (chat(stop=["a", 1]), 400, "stop[1]", "invalid_type", "stop[1] must be a string"),
    (chat(stop=""), 400, "stop", "invalid_value", "stop is empty"),
    (chat(stop=5), 400, "stop", "invalid_type", "a string or a list of strings"),
    (chat(seed="7"), 400, "seed", "invalid_type", "seed must be an integer"),
    (chat(seed=2 ** 64), 400, "seed", "invalid_value", "64 bits"),
    (chat(stream="yes"), 400, "stream", "invalid_type", "stream must be a boolean"),
    (chat(stream_options={"include_usage": True}), 400, "stream_options", "invalid_value",
     "only allowed with stream: true"),
    (chat(stream=True, stream_options={"include_usage": 1}), 400,
     "stream_options.include_usage", "invalid_type", "must be a boolean"),
    (chat(logprobs=1), 400, "logprobs", "invalid_type", "logprobs must be a boolean"),
    (chat(top_logprobs=2), 400, "top_logprobs", "invalid_value", "needs logprobs: true"),
    (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value", "0 and 20"),
    (chat(logprobs=True, top_logprobs=3), 400, "top_logprobs", "unsupported_value",
     "returns at most 2 alternatives per token (serve.max_top_logprobs=2)"),
    (chat(tools={}), 400, "tools", "invalid_type", "tools must be a list"),
    (chat(tools=[{"type": "retrieval"}]), 400, "tools[0].type", "invalid_value",
     "must be 'function'"),
    (chat(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "tools[0].function.name", "invalid_value", "1 to 64 letters"),
    (chat(tools=[TOOL, TOOL]), 400, "tools[1].function.name", "invalid_value", "given twice"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]), 400, "tools[0].function.parameters", "invalid_value",
     "must be a schema of type 'object'"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "str"}}}}}]), 400,
     "tools[0].function.parameters.properties.x.type", "invalid_value",
     "\"str\" is not a JSON schema type"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "description": 1}}]), 400,
     "tools[0].function.description", "invalid_type", "must be a string"),
    (chat(tool_choice="required"), 400, "tool_choice", "invalid_value", "needs tools"),
    (chat(tool_choice="sometimes", tools=[TOOL]), 400, "tool_choice", "invalid_value",
     "'auto', 'none', 'required' or a function"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "tool_choice.function.name", "invalid_value", "not in tools (get_weather)"),
    (chat(parallel_tool_calls="no"), 400, "parallel_tool_calls", "invalid_type",
     "must be a boolean"),
    (chat(response_format={"type": "json_object"}), 400, "response_format",
     "unsupported_parameter", "no JSON mode"),
    (chat(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter",
     "send 'tools'"),
    (chat(frequency_penalty=0.5), 400, "frequency_penalty", "unsupported_parameter",
     "penalties are not supported"),
    (chat(logit_bias={"1": 5}), 400, "logit_bias", "unsupported_parameter", "not supported"),
])
def test_chat_bad_requests(body, status, param, code, words):
  with pytest.raises(g.RequestError) as info:
    g.validate_chat_request(body, LIMITS)
  e = info.value
  assert (e.status, e.param, e.code) == (status, param, code), e.message
  assert words in e.message
  assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error",
                                "param": param, "code": code}}


def test_body_size_and_model():
  with pytest.raises(g.RequestError) as info:
    g.validate_chat_request(chat(), LIMITS, body_bytes=5001)
  assert info.value.status == 413 and "5001 bytes" in info.value.message
  assert "serve.max_body_bytes" in info.value.message
  g.check_body_size(5000, LIMITS)
  with pytest.raises(g.RequestError) as info:
    g.check_model("gpt-4", ["tiny"])
  assert (info.value.status, info.value.code) == (404, "model_not_found")
  assert "available: tiny" in info.value.message


def test_completion_request():
  req = g.validate_completion_request(
      {"model": "m", "prompt": ["Once"], "max_tokens": 5, "logprobs": 2, "echo": False,
       "best_of": 1, "suffix": None, "stream": True}, LIMITS)
  assert (req.prompt, req.max_tokens, req.logprobs, req.stream) == ("Once", 5, 2, True)
  req = g.validate_completion_request({"model": "m", "prompt": ""}, LIMITS)
  assert (req.prompt, req.max_tokens, req.logprobs) == ("", 50, None)


@pytest.mark.parametrize("body, param, code, words", [
    ({"model": "m"}, "prompt", "missing_required_parameter", "prompt is required"),
    ({"model": "m", "prompt": 5}, "prompt", "invalid_type", "a string or a list of one string"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "unsupported_value", "list of 2 prompts"),
    ({"model": "m", "prompt": [1, 2, 3]}, "prompt", "unsupported_value", "token-id prompts"),
    ({"model": "m", "prompt": [[1, 2]]}, "prompt", "unsupported_value", "token-id prompts"),
    ({"model": "m", "prompt": [None]}, "prompt[0]", "invalid_type", "must be a string"),
    ({"model": "m", "prompt": "x" * 1001}, "prompt", "string_above_max_length",
     "1001 characters"),
    ({"model": "m", "prompt": "a", "max_tokens": 1000}, "max_tokens", "invalid_value",
     "cap of 100"),
    ({"model": "m", "prompt": "a", "logprobs": True}, "logprobs", "invalid_type",
     "an integer (0 to 5) on /v1/completions"),
    ({"model": "m", "prompt": "a", "logprobs": 3}, "logprobs", "unsupported_value",
     "at most 2 alternatives"),
    ({"model": "m", "prompt": "a", "logprobs": 9}, "logprobs", "invalid_value", "0 and 5"),
    ({"model": "m", "prompt": "a", "echo": True}, "echo", "unsupported_parameter",
     "echo is not supported"),
    ({"model": "m", "prompt": "a", "best_of": 2}, "best_of", "unsupported_parameter",
     "best_of > 1"),
    ({"model": "m", "prompt": "a", "n": 2}, "n", "unsupported_parameter", "one choice"),
    ({"model": "m", "prompt": "a", "suffix": "end"}, "suffix", "unsupported_parameter",
     "suffix"),
])
def test_completion_bad_requests(body, param, code, words):
  with pytest.raises(g.RequestError) as info:
    g.validate_completion_request(body, LIMITS)
  assert (info.value.status, info.value.param, info.value.code) == (400, param, code)
  assert words in info.value.message


def test_no_top_logprobs_says_so():
  with pytest.raises(g.RequestError, match=r"does not return alternative tokens .*"
                                           r"serve\.max_top_logprobs=0"):
    g.validate_chat_request(chat(logprobs=True, top_logprobs=1), g.ServeLimits())


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (404, "invalid_request_error"),
    (413, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (429, "rate_limit_error"), (500, "server_error"), (503, "server_error")])
def test_error_body(status, kind):
  assert g.error_body(status, "m", "p", "c") == {
      "error": {"message": "m", "type": kind, "param": "p", "code": "c"}}


# -------------------------------------------------------------------------------- tool args

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 2, "maxLength": 5},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["c", "f"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    "opts": {"type": "object", "properties": {"x": {"type": "boolean"}},
             "additionalProperties": False}},
    "required": ["city"], "additionalProperties": False}


def test_tool_arguments_valid():
  assert g.validate_tool_arguments('{"city": "Oslo", "days": 3.0, "unit": "c", "tags": ["a"], '
                                   '"opts": {"x": true}}', SCHEMA) == []
  assert g.validate_tool_arguments({"anything": 1}, {"type": "object"}) == []   # extras allowed
  assert g.validate_tool_arguments("{}", None) == []


def test_tool_arguments_problems_all_listed():
  problems = g.validate_tool_arguments(
      '{"days": 9, "unit": "k", "tags": ["a", 2, "c"], "opts": {"x": 1, "y": 2}, "z": 0}',
      SCHEMA)
  assert problems == [
      "arguments: missing required field 'city'",
      "arguments.days: 9 breaks maximum 7",
      "arguments.unit: \"k\" is not one of [\"c\", \"f\"]",
      "arguments.tags: 3 items, more than maxItems 2",
      "arguments.tags[1]: expected string, got integer",
      "arguments.opts.x: expected boolean, got integer",
      "arguments.opts: unknown field 'y' (allowed: x)",
      "arguments: unknown field 'z' (allowed: city, days, opts, tags, unit)"]
  assert g.validate_tool_arguments('{"city": "A", "days": true}', SCHEMA) == [
      "arguments.city: 1 characters, fewer than minLength 2",
      "arguments.days: expected integer, got boolean"]
  assert g.validate_tool_arguments('{"unit": 1}', {"properties": {"unit": {"enum": [True]}}}) \
      == ["arguments.unit: 1 is not one of [true]"]


def test_tool_arguments_not_json_or_not_object():
  assert g.validate_tool_arguments("{oops", SCHEMA)[0].startswith("arguments are not valid JSON")
  assert g.validate_tool_arguments("[1]", SCHEMA) == [
      "arguments must be a JSON object, got array"]


# -------------------------------------------------------------------------------- output filter

PII_CASES = [
    ("write to jane.doe+x@mail.example.org today", "write to [REDACTED:EMAIL] today", "EMAIL"),
    ("call (555) 123-4567 now", "call [REDACTED:PHONE] now", "PHONE"),
    ("call 555-123-4567.", "call [REDACTED:PHONE].", "PHONE"),
    ("call +44 20 7946 0958", "call [REDACTED:PHONE]", "PHONE"),
    ("card 4111 1111 1111 1111 ok", "card [REDACTED:CREDIT_CARD] ok", "CREDIT_CARD"),
    ("card 4111-1111-1111-1111", "card [REDACTED:CREDIT_CARD]", "CREDIT_CARD"),
    ("card 4111111111111111", "card [REDACTED:CREDIT_CARD]", "CREDIT_CARD"),
    ("amex 3782 822463 10005", "amex [REDACTED:CREDIT_CARD]", "CREDIT_CARD"),
    ("host 192.168.1.20 up", "host [REDACTED:IPV4] up", "IPV4"),
    ("ssn 123-45-6789", "ssn [REDACTED:SSN]", "SSN"),
]
NOT_PII = [
    "number 4111111111111112 fails Luhn",   # 16 digits, not a valid card number
    "4111 1111 1111 1112",
    "the answer is 5551234567",             # a bare 10-digit number
    "version 1.2.3.4.5 and 256.1.1.1",
    "ssn-like 000-12-3456 or 123-00-4567",
    "on 2024-01-15 at 12:30",
    "x = 123456789012",
    "email me at jane@ or @home",
]


@pytest.mark.parametrize("text, expected, kind", PII_CASES)
def test_pii_redacted(text, expected, kind):
  result = g.OutputFilter(redact_pii=True).apply(text)
  assert result.text == expected and result.findings == [g.Finding(kind)]
  assert not result.blocked and result.finish_reason is None


@pytest.mark.parametrize("text", NOT_PII)
def test_not_pii_kept(text):
  assert g.OutputFilter(redact_pii=True).apply(text) == (text, [])


def test_pii_off_and_blocked_pattern():
  assert g.OutputFilter().apply("jane@example.com") == ("jane@example.com", [])
  f = g.OutputFilter([r"(?i)project\s+x", "launch code"], redact_pii=True)
  result = f.apply("Mail bob@example.com about Project  X tomorrow")
  assert result.text == "Mail [REDACTED:EMAIL] about "
  assert result.findings == [g.Finding("EMAIL"), g.Finding("BLOCKED", r"(?i)project\s+x")]
  assert result.blocked and result.finish_reason == "content_filter"
  text, findings = f.apply("nothing here")
  assert (text, findings) == ("nothing here", [])


@pytest.mark.parametrize("patterns, match", [
    (["(unclosed"], r"blocked_patterns\[0\] '\(unclosed' is not a valid regex"),
    (["ok", "a*"], r"blocked_patterns\[1\] 'a\*' matches the empty string"),
])
def test_bad_patterns(patterns, match):
  with pytest.raises(ValueError, match=match):
    g.OutputFilter(patterns)
  with pytest.raises(ValueError, match="config.serve: serve." + match):
    config_lib.typed(g.ServeLimits, {"blocked_patterns": patterns}, "serve")


def stream_all(filter_, chunks):
  stream = filter_.stream()
  out, blocked = [], False
  for chunk in chunks:
    text, blocked = stream.feed(chunk)
    out.append(text)
    if blocked:
      break
  if not blocked:
    out.append(stream.finish())
  return "".join(out), stream


def pieces(text, size):
  return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_stream_filter_catches_split_matches(size):
  f = g.OutputFilter(["forbidden word"], redact_pii=True)
  text = ("Reach me at jane.doe@example.com or 555-123-4567; card 4111 1111 1111 1111. " * 3
          + "Now the forbidden word appears and more text follows.")
  out, stream = stream_all(f, pieces(text, size))
  assert out == f.apply(text).text
  assert "forbidden" not in out and "jane" not in out and "4111" not in out
  assert out.endswith("Now the ") and stream.blocked and stream.finish_reason == "content_filter"
  assert stream.feed("more") == ("", True)   # nothing after the block


def test_stream_filter_holds_back_only_the_tail():
  f = g.OutputFilter(["zzz"])
  stream = f.stream(hold_back=5)
  assert stream.feed("abcdefgh") == ("abc", False)
  assert stream.feed("ij") == ("de", False)
  assert stream.feed("zz") == ("fg", False)    # "hijzz" is held: it could start a match
  assert stream.feed("z!") == ("hij", True)     # the match is never sent
  # Without PII or patterns, chunks pass straight through.
  plain = g.OutputFilter().stream()
  assert plain.feed("hello") == ("hello", False) and plain.finish() == ""
  with pytest.raises(RuntimeError, match="after the final chunk"):
    plain.feed("x")


def test_stream_filter_pii_without_block():
  f = g.OutputFilter(redact_pii=True)
  text = "IPs 10.0.0.1 and 10.0.0.2, mail a.b@c.io. " * 5
  for size in (1, 4, 9):
    out, stream = stream_all(f, pieces(text, size))
    assert out == f.apply(text).text and not stream.blocked
    assert [x.kind for x in stream.findings] == ["IPV4", "IPV4", "EMAIL"] * 5


# -------------------------------------------------------------------------------- audit log


def test_audit_log_has_no_key_or_content(tmp_path):
  keys = g.APIKeys([(None, KEY_A)])
  auth = keys.check(f"Bearer {KEY_A}")
  path = tmp_path / "audit.jsonl"
  content = {"messages": [{"role": "user", "content": "my secret question"}]}
  with g.AuditLog(path) as log:
    log.write(request_id="r1", key_id=auth.key_id, endpoint="chat", model="m", status=200,
              prompt_tokens=5, completion_tokens=7, latency_s=0.123456, finish_reason="stop",
              client="10.1.2.3", content=content)
  with g.AuditLog(path, content_hash=True, clock=lambda: 0.0) as log:
    record = log.write(request_id="r2", key_id=None, endpoint="completions", status=401,
                       error_code="missing_api_key", content=content)
  raw = path.read_text()
  assert KEY_A not in raw and "Bearer" not in raw and "secret question" not in raw
  first, second = (json.loads(line) for line in raw.splitlines())
  assert first["key_id"] == auth.key_id and first["latency_s"] == 0.1235
  assert first["time"].endswith("Z") and "content_sha256" not in first
  assert second == record and second["time"] == "1970-01-01T00:00:00.000Z"
  assert len(second["content_sha256"]) == 64
  assert (path.stat().st_mode & 0o777) == 0o600
  with pytest.raises(ValueError, match="is closed"):
    log.write(request_id="r3", key_id="x", endpoint="chat", status=200)
  with pytest.raises(TypeError):
    g.AuditLog(path).write(request_id="r", key_id="k", endpoint="e", status=200,
                           authorization=f"Bearer {KEY_A}")


def test_audit_log_threads(tmp_path):
  path = tmp_path / "audit.jsonl"
  log = g.AuditLog(path)

  def worker(i):
    for j in range(50):
      log.write(request_id=f"{i}-{j}", key_id="k", endpoint="chat", status=200,
                client="x" * 500)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  log.close()
  ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
  assert sorted(ids) == sorted(f"{i}-{j}" for i in range(8) for j in range(50))


def test_audit_log_unopenable(tmp_path):
  with pytest.raises(ValueError, match=r"cannot open the audit log .*nodir/a\.jsonl"):
    g.AuditLog(tmp_path / "nodir" / "a.jsonl")


# -------------------------------------------------------------------------------- config


def test_serve_limits_defaults_and_config():
  limits = g.ServeLimits()
  assert (limits.max_tokens, limits.max_messages, limits.max_body_bytes, limits.max_total_chars,
          limits.request_timeout_s, limits.requests_per_minute) == (
              1024, 64, 1 << 20, 200_000, 120.0, 600.0)
  import ml_collections
  config = ml_collections.ConfigDict({"max_tokens": 256, "default_max_tokens": 128,
                                      "blocked_patterns": ["a+"], "redact_pii": True})
  limits = config_lib.typed(g.ServeLimits, config, "serve")
  assert limits.blocked_patterns == ("a+",) and limits.max_tokens == 256
  assert g.OutputFilter.from_limits(limits).active
  assert g.RateLimiter.from_limits(limits).requests_per_minute == 600
  assert g.AuditLog.from_limits(limits) is None


@pytest.mark.parametrize("fields, match", [
    ({"max_tokens": 0}, r"serve.max_tokens must be an integer >= 1, got 0"),
    ({"default_max_tokens": 2000}, r"serve.default_max_tokens \(2000\) is above"),
    ({"requests_per_minute": -1}, r"serve.requests_per_minute must be >= 0"),
    ({"request_timeout_s": 0}, r"serve.request_timeout_s must be > 0"),
    ({"max_top_logprobs": 21}, r"serve.max_top_logprobs must be in 0..20"),
    ({"blocked_patterns": "abc"}, r"a list of regexes, got one string"),
    ({"max_tokenz": 5}, r"config.serve: unknown field 'max_tokenz'"),
])
def test_serve_limits_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    config_lib.typed(g.ServeLimits, fields, "serve")
