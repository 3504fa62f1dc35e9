"""The server's guardrails over HTTP: each bad request is a clear 4xx in OpenAI's error shape,
the server keeps serving, and the audit log holds no key. The checks themselves are unit
tested in test_guardrails.py; here they are wired (status, headers, body, logging)."""

import json

import pytest

from tests.serving.live import request, serving
from wakea_jax import serve
from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset

openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("guard")
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512), seed=3)
  export.save_model_dir(model, root / "model")
  keys = root / "keys.txt"
  keys.write_text(f"# test keys\nalice:{KEY}\n")
  audit = root / "audit.jsonl"
  app, host = serve.build_app(str(root / "model"), model_name="tiny", slots=2, context=256,
                              api_keys_file=str(keys), rpm=40, audit_log=str(audit),
                              redact_pii=True, blocked_patterns=["NEVER_SAY_THIS"],
                              max_tokens_cap=64)
  with serving(app) as url:
    yield url, audit
  host.model.engine.close()


def _chat(url, body, key=KEY):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return request(f"{url}/v1/chat/completions", body, headers=headers)


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize("key,status,kind", [
    (None, 401, "authentication_error"), ("sk-wrong", 403, "permission_error")])
def test_keys(server, key, status, kind):
  url, _ = server
  code, body = _chat(url, GOOD, key=key)
  assert code == status and body["error"]["type"] == kind
  if key:   # the openai client refuses to send no key at all
    with pytest.raises(openai.PermissionDeniedError):
      openai.OpenAI(base_url=f"{url}/v1", api_key=key,
                    max_retries=0).chat.completions.create(**GOOD)


@pytest.mark.parametrize("change,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"n": 2}, "n"),
    ({"model": "gpt-9"}, "model"),
])
def test_bad_requests_are_clear_4xx(server, change, param):
  url, _ = server
  code, body = _chat(url, {**GOOD, **change})
  assert 400 <= code < 500, body
  assert body["error"]["param"] == param and body["error"]["message"]


def test_body_size_and_json(server):
  import urllib.request
  url, _ = server
  big = {**GOOD, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
  code, body = _chat(url, big)
  assert code == 413 and "max_body_bytes" in body["error"]["message"]
  req = urllib.request.Request(f"{url}/v1/chat/completions", data=b"{nope", method="POST",
                               headers={"Authorization": f"Bearer {KEY}"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req, timeout=60)
  assert e.value.code == 400 and "valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_rate_limit_then_still_serving(server):
  url, _ = server
  codes = [_chat(url, {**GOOD, "max_tokens": 1})[0] for _ in range(45)]
  assert 429 in codes and codes[0] == 200
  assert request(f"{url}/health")[0] == 200


def test_audit_log_has_no_key(server):
  url, audit = server
  text = audit.read_text()
  assert KEY not in text and "Bearer" not in text
  records = [json.loads(line) for line in text.splitlines()]
  assert {r["key_id"] for r in records} >= {"alice"}
  assert {r["status"] for r in records} >= {200, 400}
