from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from tests.rl import fake_openai
from wakea_jax.rl import judge as judge_lib
from wakea_jax.rl import rewards
from wakea_jax.rl.samples import Sample

_KEY = "sk-test-secret-123"


class _Handler:
  """Fake OpenAI-compatible endpoint; the canned reply depends on the graded response."""
  seen: list[dict] = []
  flaky_calls = 0

  @classmethod
  def respond(cls, path: str, body: dict, headers) -> fake_openai.Reply:
    # The request must have the chat-completions shape.
    assert path == "/v1/chat/completions", path
    assert body["model"] == "judge-m" and isinstance(body["max_tokens"], int)
    assert [m["role"] for m in body["messages"]] == ["user"]
    prompt = body["messages"][0]["content"]
    assert "<question>\nWhat is 2+2?\n</question>" in prompt
    auth = headers.get("Authorization")
    cls.seen.append({"prompt": prompt, "auth": auth})
    if auth != f"Bearer {_KEY}":
      return 401, b'{"error": "bad key"}'
    response = prompt.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    if response == "FAIL500":
      return 500, b'{"error": "boom"}'
    if response == "FLAKY":
      cls.flaky_calls += 1
      if cls.flaky_calls == 1:
        return 503, b"{}"
    if response == "NOTJSON":
      return 200, b"<html>oops</html>"
    if response == "NOCHOICES":
      return 200, b'{"choices": []}'
    return {"The answer is 4.": "Correct and complete.\nScore: 10",
            "FLAKY": "**Score**: 7",
            "It is 5.": "Wrong. 2/10",
            "MALFORMED": "I cannot decide.",
            "HIGH": "Score: 42"}.get(response, "Score: 0")


@pytest.fixture()
def server() -> Iterator[str]:
  _Handler.seen = []
  _Handler.flaky_calls = 0
  with fake_openai.serving(_Handler.respond) as url:
    yield url


def _sample(response: str) -> Sample:
  return Sample(prompt="What is 2+2?", completion=f"{response}<|im_end|>", answer="4")


@pytest.mark.parametrize("reply, expected", [
    ("Score: 8", 8.0), ("blah\n**Score:** 7.5", 7.5), ("score = 3", 3.0), ("I give it 6/10", 6.0),
    ("9", 9.0), ("Score: 11", None), ("no idea", None), ("Score: 2 ... final Score: 5", 5.0),
])
def test_parse_score(reply, expected):
  assert judge_lib.parse_score(reply) == expected


def test_judge_scores_and_failures(server, monkeypatch, caplog):
  monkeypatch.setenv("JUDGE_KEY", _KEY)
  reward = rewards.build_reward({"judge": {"weight": 1.0, "url": server, "model": "judge-m",
                                           "api_key_env": "JUDGE_KEY", "retries": 1,
                                           "backoff_s": 0.01, "timeout_s": 5.0, "workers": 4}})
  judge = reward.components["judge"][0]
  responses = ["The answer is 4.", "It is 5.", "MALFORMED", "MALFORMED", "FAIL500", "FLAKY",
               "NOTJSON", "NOCHOICES", "HIGH"]
  with caplog.at_level(logging.WARNING, logger="wakea_jax.rl.judge"):
    total, parts = reward([_sample(r) for r in responses])
  np.testing.assert_allclose(parts["judge"], [1.0, 0.2, 0, 0, 0, 0.7, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(total, parts["judge"])
  assert judge.counters["requests"] == 9
  assert judge.counters["ok"] == 3
  assert judge.counters["unparsable"] == 3       # two malformed replies and a score of 42
  assert judge.counters["http_error"] == 1       # the 500, after its retry
  assert judge.counters["bad_response"] == 2
  assert judge.counters["retries"] == 2          # one for FAIL500, one for FLAKY
  assert len(_Handler.seen) == 11
  assert all(s["auth"] == f"Bearer {_KEY}" for s in _Handler.seen)
  # The reference answer travels in the rubric; the key never reaches the logs.
  assert "<reference>\n4\n</reference>" in _Handler.seen[0]["prompt"]
  warnings = [r.getMessage() for r in caplog.records]
  assert sum("unparsable" in w for w in warnings) == 1  # logged once per kind
  assert sum("http_error" in w for w in warnings) == 1
  assert not any(_KEY in w for w in warnings)


def test_judge_missing_key_and_unreachable(server, monkeypatch):
  monkeypatch.delenv("JUDGE_KEY_UNSET", raising=False)
  judge = judge_lib.judge_reward(url=server, model="judge-m", api_key_env="JUDGE_KEY_UNSET")
  np.testing.assert_array_equal(judge([_sample("The answer is 4.")]), [0.0])
  assert judge.counters["missing_api_key"] == 1
  # A 401 is not retried.
  monkeypatch.setenv("WRONG_KEY", "nope")
  judge = judge_lib.judge_reward(url=server, model="judge-m", api_key_env="WRONG_KEY",
                                 backoff_s=0.01)
  np.testing.assert_array_equal(judge([_sample("The answer is 4.")]), [0.0])
  assert judge.counters["http_error"] == 1 and judge.counters["retries"] == 0
  # Nothing listens on port 9 of 127.0.0.1 in the test machine: connection refused.
  judge = judge_lib.judge_reward(url="http://127.0.0.1:9/v1", model="m", retries=1,
                                 backoff_s=0.01, timeout_s=2.0)
  np.testing.assert_array_equal(judge([_sample("x")]), [0.0])
  assert judge.counters["network_error"] == 1 and judge.counters["retries"] == 1


def test_judge_config_errors():
  with pytest.raises(ValueError, match="url"):
    judge_lib.judge_reward(url="localhost:8000", model="m")
  with pytest.raises(ValueError, match="rubric lacks the {response} field"):
    judge_lib.judge_reward(url="http://x", model="m", rubric="{question} {reference}")
  with pytest.raises(ValueError, match=r"reward 'judge'.*model"):
    rewards.build_reward({"judge": {"url": "http://x"}})
