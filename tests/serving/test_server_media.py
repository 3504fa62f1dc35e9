"""The server with a vision- and an audio-language model (tiny random LLaVA and Qwen2-Audio
directories): `image_url` and `input_audio` content parts sent by the real `openai` client
over loopback get the greedy reply the sample binary gives with --image / --audio (the
reference outside the server), alone or beside other requests; bad parts are 400s naming
the field."""

import base64
import threading

import numpy as np
import pytest

from tests.serving.live import request, serving
from tests.test_sample_media import audio_dir, llava_dir  # noqa: F401  (module fixtures)
from wakea_jax import sample, serve
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.serving.engine import stack_media

openai = pytest.importorskip("openai")

NEW = 8


def _b64(path) -> str:
  return base64.b64encode(path.read_bytes()).decode()


def _image(path) -> dict:
  return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(path)}}


def _reference(checkpoint, prompt, **media) -> str:
  """The sample binary's greedy reply, without the end-of-turn token."""
  _, out = sample.run(str(checkpoint), [prompt], tools=(), max_new_tokens=NEW,
                      max_tool_calls=0, **media)
  tokens = out.tokens[0]
  return default_tokenizer().decode(tokens[:-1] if out.stop_reason[0] == "stop_id" else tokens)


def _chat(client, model, content, **kwargs):
  return client.chat.completions.create(
      model=model, messages=[{"role": "user", "content": content}], max_tokens=NEW,
      temperature=0, **kwargs)


def test_image_parts_answer_like_the_sample_binary(llava_dir):  # noqa: F811
  a, b = llava_dir.parent / "a.png", llava_dir.parent / "b.png"
  expected = {name: _reference(llava_dir, "What is this?", image_paths=[str(path)])
              for name, path in (("a", a), ("b", b))}
  expected["text"] = _reference(llava_dir, "What is this?")
  assert expected["a"] != expected["b"] or expected["a"] != expected["text"]
  app, host = serve.build_app(str(llava_dir), model_name="llava", slots=2, context=128,
                              chunk_steps=2)
  try:
    with serving(app) as url:
      client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
      contents = {"a": [_image(a), {"type": "text", "text": "What is this?"}],
                  "b": [_image(b), {"type": "text", "text": "What is this?"}],
                  "text": "What is this?"}
      reply = _chat(client, "llava", contents["a"])
      assert reply.choices[0].message.content == expected["a"]
      chunks = list(_chat(client, "llava", contents["a"], stream=True))
      assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
          expected["a"])
      # Side by side (2 slots, requests with and without images in one engine): each reply
      # is its own prompt's.
      got = {}

      def ask(name):
        got[name] = _chat(client, "llava", contents[name]).choices[0].message.content

      threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "text", "b") * 2]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      assert got == expected

      def status(content, role="user"):
        code, body = request(f"{url}/v1/chat/completions", {
            "model": "llava", "max_tokens": 2, "messages": [{"role": role, "content": content}]})
        return code, body["error"]["param"], body["error"]["message"]

      code, param, message = status([{"type": "image_url",
                                      "image_url": {"url": "https://example.com/a.png"}}])
      assert (code, param) == (400, "messages[0].content[0].image_url.url")
      assert "does not fetch URLs" in message
      code, param, message = status([{"type": "text", "text": "hi"},
                                     {"type": "image_url",
                                      "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])
      assert (code, param) == (400, "messages[0].content[1]") and "not a readable image" in message
      code, param, _ = status([{"type": "image_url", "image_url": {"url": "data:;base64,@@"}}])
      assert (code, param) == (400, "messages[0].content[0].image_url.url")
      code, param, message = status([{"type": "input_audio",
                                      "input_audio": {"data": "aGVsbG8=", "format": "wav"}}])
      assert (code, param) == (400, "messages[0].content[0]")
      assert "takes image inputs only, not audio" in message
      code, param, message = status([_image(a)], role="system")
      assert code == 400 and "only allowed in user messages" in message
      code, _, message = status([{"type": "text", "text": "<image> and"}, _image(a)])
      assert code == 400 and "placeholder" in message
  finally:
    host.model.engine.close()


def test_audio_parts_answer_like_the_sample_binary(audio_dir):  # noqa: F811
  clip = audio_dir.parent / "a.wav"
  expected = _reference(audio_dir, "Describe\n<audio>\nplease.", audio_paths=[str(clip)])
  app, host = serve.build_app(str(audio_dir), model_name="qwen2-audio", slots=2, context=128,
                              chunk_steps=4)
  try:
    with serving(app) as url:
      client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
      content = [{"type": "text", "text": "Describe"},
                 {"type": "input_audio", "input_audio": {"data": _b64(clip), "format": "wav"}},
                 {"type": "text", "text": "please."}]
      assert _chat(client, "qwen2-audio", content).choices[0].message.content == expected
      code, body = request(f"{url}/v1/chat/completions", {
          "model": "qwen2-audio", "max_tokens": 2, "messages": [{"role": "user", "content": [
              {"type": "input_audio", "input_audio": {"data": _b64(clip), "format": "mp3"}}]}]})
      assert code == 400 and body["error"]["param"] == "messages[0].content[0].input_audio.format"
  finally:
    host.model.engine.close()


def test_requests_media_stack_into_rows():
  """The engine's refill batches: one row per request, items padded to a power of two with
  masked-out zeros, a request without media an empty row."""
  a = {"pixel_values": np.ones((1, 3, 2, 2), np.float32), "image_mask": np.ones(1, np.int32)}
  b = {"pixel_values": np.full((3, 3, 2, 2), 2.0, np.float32),
       "image_mask": np.ones(3, np.int32)}
  out = stack_media([a, None, b])
  assert out["pixel_values"].shape == (3, 4, 3, 2, 2)
  assert out["image_mask"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
  np.testing.assert_array_equal(out["pixel_values"][2, :3], b["pixel_values"])
  np.testing.assert_array_equal(out["pixel_values"][0, 0], a["pixel_values"][0])
  assert not out["pixel_values"][1].any() and not out["pixel_values"][2, 3].any()
  assert stack_media([None, None]) is None
