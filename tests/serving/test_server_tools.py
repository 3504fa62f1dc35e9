"""Tool calls through the server, with the real `openai` client: the client's tools come back
as `tool_calls` (plain and streamed), calls that break the tool's schema do not, and a server
started with its own router runs the calls and answers with the model's next turn.

A scripted engine stands in for the model (a random model does not write valid calls); the
real engine under the same server is tested in test_server.py.
"""

import json
import threading

import pytest

from tests.serving.live import serving
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.serving.engine import Delta, Done
from wakea_jax.serving.server import ModelHost, ServedModel, ServerOptions, create_app
from wakea_jax.toolbox.registry import default_router

openai = pytest.importorskip("openai")
TOK = default_tokenizer()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


class ScriptedEngine:
  """Answers request n with the n-th reply (cycling), recording the prompts it saw."""

  capacity = 4096
  in_flight = 0

  def __init__(self, replies):
    self.replies, self.prompts, self.lock = replies, [], threading.Lock()

  def submit(self, request, on_event):
    with self.lock:
      self.prompts.append(TOK.decode(list(request.prompt)))
      text = self.replies[(len(self.prompts) - 1) % len(self.replies)]
    ids = TOK.encode(text) + [TOK.token_to_id("<|im_end|>")]
    on_event(Delta(text, ids, [-0.5] * len(ids)))
    on_event(Done("stop", "", len(request.prompt), len(ids)))

  def snapshot(self):
    return {}

  def close(self, timeout=None):
    pass


def _app(engine, **options):
  return create_app(ModelHost(ServedModel("scripted", "1", engine, TOK)),
                    ServerOptions(**options))


def test_client_tools_come_back_as_tool_calls():
  call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
  engine = ScriptedEngine([call])
  with serving(_app(engine)) as url:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="scripted", messages=messages,
                                           tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [tool_call] = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert "get_weather" in engine.prompts[0]     # the tools were rendered into the prompt
    # The conversation goes on with the call and its result, as OpenAI clients send it.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": "Sunny, 21 C"}]
    client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert "Sunny, 21 C" in engine.prompts[1]
    chunks = list(client.chat.completions.create(model="scripted", messages=messages[:1],
                                                 tools=[WEATHER], stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any("<tool_call>" in (c.choices[0].delta.content or "") for c in chunks)


def test_calls_that_break_the_schema_are_content():
  bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": 7}}\n</tool_call>'
  with serving(_app(ScriptedEngine([bad]))) as url:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "?"}], tools=[WEATHER])
    assert reply.choices[0].finish_reason == "stop"
    assert not reply.choices[0].message.tool_calls
    assert "get_weather" in reply.choices[0].message.content


def test_server_side_tools_run_and_the_model_continues():
  call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "23*19"}}\n</tool_call>'
  engine = ScriptedEngine([call, "It is 437."])
  app = _app(engine, router=default_router(enabled=("calculator",)))
  with serving(app) as url:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "What is 23*19?"}])
    assert reply.choices[0].message.content == "It is 437."
    assert reply.choices[0].finish_reason == "stop"
    assert "<tool_response>\n437" in engine.prompts[1]   # the result went into the context
    assert reply.usage.completion_tokens > len(TOK.encode("It is 437."))   # both turns
