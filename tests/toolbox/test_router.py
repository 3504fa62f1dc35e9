import time

import pytest

from wakea_jax.data import chat
from wakea_jax.toolbox import Router, Tool
from wakea_jax.toolbox.registry import default_router
from wakea_jax.toolbox.router import ArgumentError, validate_arguments

ECHO = Tool(
    name="echo", description="Repeat text.",
    parameters={"type": "object", "required": ["text"],
                "properties": {"text": {"type": "string"}, "times": {"type": "integer"},
                               "loud": {"type": "boolean"}, "tags": {"type": "array",
                                                                     "items": {"type": "string"}}}},
    run=lambda a: a["text"] * int(a.get("times", 1)))


def _boom(arguments):
  raise RuntimeError("disk on fire")


def test_call_ok_and_schema_format():
  router = Router([ECHO])
  result = router.call("echo", {"text": "ab", "times": 2})
  assert result.ok and result.text == "abab" and result.error is None
  assert router.tool_schemas() == [{"type": "function", "function": {
      "name": "echo", "description": "Repeat text.", "parameters": dict(ECHO.parameters)}}]
  assert "- echo(text: string, times: integer?, loud: boolean?, tags: array?)" in (
      router.system_prompt_block())
  # The schemas are accepted by the chat template.
  text = chat.render_text([{"role": "user", "content": "hi"}], tools=router.tool_schemas())
  assert '"name": "echo"' in text


@pytest.mark.parametrize("name, arguments, message", [
    ("nope", {}, "unknown tool 'nope' (available: echo)"),
    (None, {}, "unknown tool None"),
    ("echo", {}, "missing required field 'text'"),
    ("echo", {"text": 3}, "arguments.text: expected string, got integer 3"),
    ("echo", {"text": "a", "times": "2"}, "arguments.times: expected integer, got string"),
    ("echo", {"text": "a", "times": True}, "expected integer, got boolean"),
    ("echo", {"text": "a", "loud": 1}, "expected boolean, got integer"),
    ("echo", {"text": "a", "tags": ["x", 1]}, "arguments.tags[1]: expected string"),
    ("echo", {"text": "a", "colour": "red"},
     "unknown field 'colour' (allowed: loud, tags, text, times)"),
    ("echo", [1, 2], "arguments: expected object, got array"),
    ("echo", "{not json", "arguments are not valid JSON"),
])
def test_bad_calls_become_error_results(name, arguments, message):
  result = Router([ECHO]).call(name, arguments)
  assert not result.ok
  assert result.text.startswith("Error: ")
  assert message in result.error


def test_json_string_arguments_accepted():
  assert Router([ECHO]).call("echo", '{"text": "x"}').text == "x"


def test_failing_tool_and_malformed_parsed_call():
  router = Router([ECHO, Tool("boom", "fails", {"type": "object"}, _boom)])
  result = router.call("boom", {})
  assert not result.ok and result.text == "Error: boom: RuntimeError: disk on fire"
  assert not router.call_parsed("garbage").ok
  assert router.call_parsed({"name": "echo", "arguments": {"text": "y"}}).text == "y"


def test_timeout_is_an_error_result():
  slow = Tool("slow", "sleeps", {"type": "object"}, lambda a: time.sleep(0.5) or "done",
              timeout_s=0.05)
  result = Router([slow]).call("slow", {})
  assert not result.ok and "timed out after 0.05 s" in result.error


def test_additional_properties_and_number():
  schema = {"type": "object", "properties": {"x": {"type": "number"}},
            "additionalProperties": {"type": "string"}}
  validate_arguments(schema, {"x": 1.5, "y": "ok"})
  validate_arguments(schema, {"x": 2})
  with pytest.raises(ArgumentError, match="arguments.y: expected string"):
    validate_arguments(schema, {"y": 3})
  with pytest.raises(ArgumentError, match="expected number, got boolean"):
    validate_arguments(schema, {"x": False})


def test_registry_errors():
  with pytest.raises(ValueError, match="duplicate tool name 'echo'"):
    Router([ECHO, ECHO])
  with pytest.raises(ValueError, match="differs from tool name"):
    Router({"other": ECHO})


def test_default_router():
  router = default_router(enabled=("calculator", "retrieve", "web_search"),
                          retrieval_corpus=["the cat sat", "dogs bark loudly"],
                          web_corpus=["jax is a numerical library"])
  assert list(router.tools) == ["calculator", "retrieve", "web_search"]
  assert router.call("calculator", {"expression": "2**10"}).text == "1024"
  assert "dogs bark" in router.call("retrieve", {"query": "bark"}).text
  assert "offline" in router.call("web_search", {"query": "jax"}).text
  with pytest.raises(ValueError, match="unknown tool 'shell'"):
    default_router(enabled=("shell",))
  with pytest.raises(ValueError, match="needs retrieval_corpus"):
    default_router(enabled=("retrieve",))
