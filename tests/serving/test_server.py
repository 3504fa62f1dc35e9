"""The OpenAI-compatible server, exercised by the real `openai` client and curl over loopback.

References outside the server: the `sample` binary's greedy completion of the same prompt
(the same model through the static tool loop), and the openai client's own parsing of our
responses and SSE streams.
"""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.serving.live import request, serving
from wakea_jax import sample, serve
from wakea_jax.checkpoints import export
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset

openai = pytest.importorskip("openai")

PROMPT = "What is 2+2?"


def _save(path, seed):
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512),
                                   seed=seed)
  export.save_model_dir(model, path)
  return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  return _save(root / "v1", 1), _save(root / "v2", 2)


@pytest.fixture(scope="module")
def server(checkpoints):
  app, host = serve.build_app(checkpoints[0], model_name="tiny", slots=4, context=256,
                              chunk_steps=4)
  with serving(app) as url:
    yield url, host
  host.model.engine.close()


def _client(url, key="none"):
  return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _reference(checkpoint, max_new_tokens):
  """The sample binary's greedy reply (no tools), as text without the end-of-turn token."""
  _, out = sample.run(checkpoint, [PROMPT], tools=(), max_new_tokens=max_new_tokens)
  tok = default_tokenizer()
  tokens = out.tokens[0]
  stopped = out.stop_reason[0] == "stop_id"
  return tok.decode(tokens[:-1] if stopped else tokens), "stop" if stopped else "length"


def test_chat_matches_the_sample_binary_plain_and_streamed(server, checkpoints):
  url, _ = server
  client = _client(url)
  expected, reason = _reference(checkpoints[0], 12)
  reply = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
      temperature=0)
  assert reply.choices[0].message.content == expected
  assert reply.choices[0].finish_reason == reason
  assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
  chunks = list(client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
      temperature=0, stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == expected
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
  assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_sampling_parameters_seed_and_logprobs(server):
  url, _ = server
  client = _client(url)
  kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
  a = client.chat.completions.create(**kwargs)
  b = client.chat.completions.create(**kwargs)
  assert a.choices[0].message.content == b.choices[0].message.content   # same seed
  c = client.chat.completions.create(**dict(kwargs, seed=8, logprobs=True))
  lps = [t.logprob for t in c.choices[0].logprobs.content]
  assert len(lps) == c.usage.completion_tokens and all(lp <= 0 for lp in lps)
  done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                   temperature=0)
  assert done.object == "text_completion" and done.usage.completion_tokens >= 1
  stopped = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                      temperature=0, stop=[done.choices[0].text[2:4]])
  if done.choices[0].text[2:4]:
    assert stopped.choices[0].text == done.choices[0].text[:2]
    assert stopped.choices[0].finish_reason == "stop"
  assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_clients_share_the_engine(server):
  url, host = server
  client = _client(url)
  results, errors = [], []

  def ask(i):
    try:
      r = client.chat.completions.create(
          model="tiny", messages=[{"role": "user", "content": f"Question {i}"}],
          max_tokens=4 + i % 7, temperature=0)
      results.append((i, r.choices[0].message.content))
    except Exception as e:   # noqa: BLE001 - counted below
      errors.append(repr(e))

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 24
  # Each answer equals the same request run alone.
  for i, text in results[:3]:
    alone = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"Question {i}"}],
        max_tokens=4 + i % 7, temperature=0)
    assert alone.choices[0].message.content == text


def test_metrics_and_health(server):
  import urllib.request
  url, _ = server
  text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
  assert 'wakea_requests_total{endpoint="chat",status="200"}' in text
  assert "wakea_request_seconds_bucket" in text and "wakea_queue_depth" in text
  health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
  assert health["status"] == "ok" and health["model"] == "tiny"


def test_a_dropped_stream_frees_its_slot(server, monkeypatch):
  """A client that leaves mid-stream cancels its request. The tiny model would finish 200
  tokens before the disconnect is noticed, so each event is delayed (a slow model)."""
  import http.client
  url, host = server
  engine = host.model.engine
  submit = engine.submit

  def slow_submit(request, on_event):
    def delayed(event):
      time.sleep(0.2)
      on_event(event)
    return submit(request, delayed)

  # A seed whose completion runs to max_tokens: an unseeded one may sample the end-of-turn
  # token within a few tokens and finish before the disconnect (no cancellation to see).
  client = _client(url)
  seed = next(seed for seed in range(20) if client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "Go on forever"}], max_tokens=200,
      temperature=1.0, seed=seed).choices[0].finish_reason == "length")
  monkeypatch.setattr(engine, "submit", slow_submit)
  before = host.model.engine.snapshot()["cancelled"]
  body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever"}],
          "max_tokens": 200, "temperature": 1.0, "stream": True, "seed": seed}
  connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
  connection.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
  response = connection.getresponse()
  assert response.status == 200
  while True:   # the role chunk carries "content": "" and comes before any generation
    line = response.readline()
    if b'"content": "' in line and b'"content": ""' not in line:
      break
  connection.close()     # leave after the first generated text
  deadline = time.monotonic() + 60
  while host.model.engine.in_flight and time.monotonic() < deadline:
    time.sleep(0.05)
  assert host.model.engine.in_flight == 0
  assert host.model.engine.snapshot()["cancelled"] == before + 1


def test_curl_against_the_serve_binary(checkpoints, tmp_path):
  """The binary as users start it, on a free loopback port, and curl as users call it."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "wakea_jax.serve", f"--checkpoint={checkpoints[0]}", "--port=0",
       "--slots=2", "--context=256", "--model_name=tiny"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("serving tiny on http://"), (line, proc.stderr.read())
    url = line.split()[-1]
    body = json.dumps({"model": "tiny", "max_tokens": 6, "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT}]})
    out = subprocess.run(["curl", "-s", "-S", "--max-time", "120", f"{url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, check=True)
    reply = json.loads(out.stdout)
    expected, _ = _reference(checkpoints[0], 6)
    assert reply["choices"][0]["message"]["content"] == expected
    bad = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"{url}/v1/chat/completions", "-d", "{not json"],
                         capture_output=True, text=True, check=True)
    assert bad.stdout == "400"
  finally:
    proc.terminate()
    proc.wait(30)


def test_hot_swap_under_load_and_rollback(server, checkpoints, tmp_path):
  """Requests keep running while the model is replaced: none fails; the new version answers
  afterwards; a swap to a broken checkpoint rolls back and the old model keeps serving."""
  url, host = server
  client = _client(url)
  failures, done = [], []
  stop = threading.Event()

  def load():
    while not stop.is_set():
      try:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
            temperature=0)
        done.append(r.choices[0].message.content)
      except Exception as e:   # noqa: BLE001 - counted below
        failures.append(repr(e))

  threads = [threading.Thread(target=load) for _ in range(4)]
  for t in threads:
    t.start()
  time.sleep(1.0)
  status, swapped = request(f"{url}/admin/swap", {"checkpoint": checkpoints[1], "version": "2"})
  time.sleep(1.0)
  stop.set()
  for t in threads:
    t.join()
  assert status == 200 and swapped["ok"], swapped
  assert not failures, failures[:3]
  assert len(done) >= 4
  assert request(f"{url}/health")[1]["version"] == "2"
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "model_config.json").write_text("{not json")
  status, rolled = request(f"{url}/admin/swap", {"checkpoint": str(broken), "version": "3"})
  assert status == 500 and not rolled["ok"]
  assert request(f"{url}/health")[1]["version"] == "2"
  status, bad = request(f"{url}/admin/swap", {"version": "4"})   # no checkpoint: a 400
  assert status == 400 and bad["error"]["param"] == "checkpoint"
  reply = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                  "content": PROMPT}],
                                         max_tokens=6, temperature=0)
  expected, _ = _reference(checkpoints[1], 6)
  assert reply.choices[0].message.content == expected
  np.testing.assert_equal(host.model.version, "2")


def test_image_parts_to_a_text_model_are_refused(server):
  url, _ = server
  code, body = request(f"{url}/v1/chat/completions", {
      "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]})
  assert code == 400 and body["error"]["param"] == "messages[0].content[0]"
  assert "'tiny' takes text only, not image inputs" in body["error"]["message"]
