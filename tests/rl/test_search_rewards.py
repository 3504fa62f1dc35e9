from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest

from wakea_jax.rl import rewards
from wakea_jax.rl import search_rewards as sr
from wakea_jax.rl.samples import Sample
from wakea_jax.toolbox import search_dag

BLOCK = """<search>
Nodes:
A: who founded Acme Corp (Local)
B: where was {A} born (Web)
Edges:
A -> B
</search>"""
CYCLE = BLOCK.replace("A -> B", "A -> B\nB -> A")
RESULTS = ("\n<r>\nA (Local): who founded Acme Corp\n[1] Jane Roe: founded Acme\n</r>\n"
           "<r>\nB (Web): where was Jane Roe born\n[1] Lisbon: Jane Roe was born here\n</r>\n")


def _s(completion: str, answer="Lisbon") -> Sample:
  return Sample(prompt="Where was the founder of Acme Corp born?", completion=completion,
                answer=answer)


# Hand-scored trajectories: (accuracy F1, validity, format, reason).
CASES = [
    (_s("Two hops.\n" + BLOCK + RESULTS + "So: <answer>Lisbon</answer>"), 1.0, 1, 1, None),
    (_s(BLOCK + RESULTS + "<answer>Porto, Portugal</answer>"), 0.0, 1, 1, None),
    (_s(CYCLE + RESULTS + "<answer>the Lisbon</answer>"), 1.0, 0, 1, "cycle"),
    # F1 of "lisbon city" against "lisbon": precision 1/2, recall 1 -> 2/3.
    (_s("I know it. <answer>Lisbon city</answer>"), 2 / 3, 0, 0, "no_search_block"),
    (_s(BLOCK + RESULTS + "It is Lisbon."), 0.0, 1, 0, None),
    # An answer inside injected results is the retriever's, not the model's.
    (_s(BLOCK + "\n<r>\n[1] x: <answer>Lisbon</answer>\n</r>"), 0.0, 1, 0, None),
]
SAMPLES = [case[0] for case in CASES]
F1, VALID, FORMAT = (np.array([case[i] for case in CASES], np.float32) for i in (1, 2, 3))


def test_components_match_hand_scores():
  np.testing.assert_allclose(sr.answer_accuracy_reward()(SAMPLES), F1, rtol=1e-6)
  validity = sr.dag_validity_reward()
  np.testing.assert_array_equal(validity(SAMPLES), VALID)
  assert validity.reasons(SAMPLES) == [case[4] for case in CASES]
  assert validity.counters == {"valid": 8, "cycle": 2, "no_search_block": 2}
  np.testing.assert_array_equal(sr.dag_format_reward()(SAMPLES), FORMAT)
  # Exact match instead of F1: "the Lisbon" still matches, "Lisbon city" does not.
  np.testing.assert_array_equal(sr.answer_accuracy_reward(metric="em")(SAMPLES),
                                [1, 0, 1, 0, 0, 0])


def test_validity_uses_the_configured_sources_and_caps():
  sample = [_s(BLOCK + "<answer>Lisbon</answer>")]
  assert sr.dag_validity_reward(sources=("local",))(sample)[0] == 0
  only_local = sr.dag_validity_reward(sources=("local",))
  assert only_local.reasons(sample) == ["unknown_source"]
  assert sr.dag_validity_reward(max_nodes=1).reasons(sample) == ["too_many_nodes"]
  with pytest.raises(ValueError, match="sources"):
    sr.dag_validity_reward(sources="Local")


def test_format_details():
  score = sr.dag_format_score
  assert score(BLOCK + "<answer>x</answer>") == 1.0
  assert score(BLOCK + "think\n" + BLOCK + "<answer>x</answer>\n") == 1.0
  assert score("<answer>x</answer>") == 0.0
  assert score("<answer>x</answer>", min_searches=0) == 1.0
  assert score(BLOCK + "<answer>x</answer>" + BLOCK) == 0.0          # search after answer
  assert score(BLOCK + "<answer>x</answer> and more") == 0.0          # text after answer
  assert score(BLOCK + "<answer> </answer>") == 0.0                  # empty answer
  assert score(BLOCK + "<answer>x</answer><answer>y</answer>") == 0.0
  assert score("<search> <search>" + BLOCK + "<answer>x</answer>") == 0.0   # nested / unclosed
  assert score(BLOCK + "</search><answer>x</answer>") == 0.0
  # Chat markup and tool responses are not the model's text.
  chat = _s(BLOCK + "<|im_end|>\n<|im_start|>user\n<tool_response>\n<answer>no</answer>\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n<answer>Lisbon</answer><|im_end|>")
  assert sr.dag_format_reward()([chat])[0] == 1.0


def test_rsearch_composite_and_curriculum_switch():
  reward = rewards.build_reward({"rsearch": {"weight": 1.0, "curriculum_steps": 10}})
  before = 0.2 * F1 + 0.4 * VALID + 0.4 * FORMAT    # steps 0..9
  after = 0.5 * F1 + 0.25 * VALID + 0.25 * FORMAT   # from step 10
  # By hand: [1, .8, .6, 2/15, .4, .4] then [1, .5, .75, 1/3, .25, .25].
  np.testing.assert_allclose(before, [1, .8, .6, 2 / 15, .4, .4], rtol=1e-6)
  np.testing.assert_allclose(after, [1, .5, .75, 1 / 3, .25, .25], rtol=1e-6)
  for step, expected in [(0, before), (9, before), (10, after), (1000, after)]:
    total, raw = reward(SAMPLES, step)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(raw["rsearch"], expected, rtol=1e-6)
  np.testing.assert_allclose(raw["rsearch/accuracy"], F1, rtol=1e-6)
  np.testing.assert_array_equal(raw["rsearch/validity"], VALID)
  np.testing.assert_array_equal(raw["rsearch/format"], FORMAT)
  np.testing.assert_array_equal(raw["rsearch/invalid/cycle"], [0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(raw["rsearch/invalid/no_search_block"], [0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(raw["rsearch/search_blocks"], [1, 1, 1, 0, 1, 1])
  # Every reason is a key at every step (rounds and hosts are merged key by key).
  assert {k for k in raw if "/invalid/" in k} == {f"rsearch/invalid/{r}"
                                                  for r in search_dag.REASONS}
  # Without a curriculum the final weights hold from step 0; weights are configurable.
  plain = sr.rsearch_reward(weights=(1, 0, 0))
  np.testing.assert_allclose(plain(SAMPLES, 0)[0], F1, rtol=1e-6)
  with pytest.raises(ValueError, match="weights"):
    sr.rsearch_reward(weights=(1, 0))


def test_composites_nest_and_pass_the_step():
  inner = rewards.CompositeReward({"f": (sr.dag_format_reward(), ((0, 0.0), (10, 1.0)))})
  outer = rewards.CompositeReward({"inner": (inner, 2.0)})
  total, raw = outer(SAMPLES[:1], 5)
  assert total[0] == pytest.approx(1.0) and raw["inner/f"][0] == 1.0  # 2 * 0.5 * 1


def test_search_r1_em_and_format():
  info = "<information>Doc 1: <answer>Porto</answer> Jane Roe founded Acme</information>"
  cases = [  # (completion, em, format)
      ("<think>hmm</think><search>acme founder</search>\n" + info +
       "\n<search>Jane Roe birthplace</search><information>Lisbon</information>"
       "<answer>Lisbon</answer>", 1, 1),
      ("<answer>Lisbon</answer>", 1, 1),                            # answering without search
      ("<search>q</search>" + info, 0, 0),   # the only <answer> is inside <information>
      ("<search>q</search><answer>Lisbon</answer>", 1, 0),          # no information block
      ("<answer>Lisbon</answer> trailing", 1, 0),
      ("<search> </search><information>x</information><answer>Lisbon</answer>", 1, 0),
      ("<search>q</search><information>x<answer>Lisbon</answer>", 1, 0),  # unclosed info
      ("<search>q<answer>x</answer></search>", 0, 0),
      ("Lisbon", 0, 0),
  ]
  samples = [_s(c) for c, _, _ in cases]
  np.testing.assert_array_equal(sr.search_r1_em_reward()(samples), [c[1] for c in cases])
  np.testing.assert_array_equal(sr.search_r1_format_reward()(samples), [c[2] for c in cases])
  loose = sr.search_r1_format_reward(information_required=False)
  assert loose([samples[3]])[0] == 1.0
  # Configurable tags: the Technical Features seed's <context>.
  context = _s("<search>q</search><context><answer>Porto</answer></context>"
               "<answer>Lisbon</answer>", answer=["Lisboa", "Lisbon"])
  assert sr.search_r1_format_reward(information_tag="context")([context])[0] == 1.0
  assert sr.search_r1_em_reward(information_tag="context")([context])[0] == 1.0
  with pytest.raises(ValueError, match="tag name"):
    sr.search_r1_format_reward(answer_tag="<answer>")
  with pytest.raises(ValueError, match="needs an answer"):
    sr.search_r1_em_reward()([_s("<answer>x</answer>", answer=None)])


def test_registered_together_under_distinct_names():
  reward = rewards.build_reward({"search_r1_em": {"weight": 1.0},
                                 "search_r1_format": {"weight": 0.2},
                                 "rsearch": {"weight": 1.0, "curriculum_steps": 5}})
  total, raw = reward(SAMPLES[:2], 0)
  assert {"search_r1_em", "search_r1_format", "rsearch", "rsearch/accuracy"} <= set(raw)
  for name in sr.SEARCH_REWARDS:
    assert rewards.REWARDS[name] is sr.SEARCH_REWARDS[name]
  with pytest.raises(ValueError, match="unknown option 'curriculum'"):
    rewards.build_reward({"rsearch": {"curriculum": 5}})


def test_rewards_never_raise_on_junk():
  junk = ["", "<search>", "</search></search><answer>", "<r>" * 50, "<search>\nNodes:\n" +
          "A: x (Local)\n" * 500 + "</search><answer>a</answer>", "\x00{A}->->"]
  samples = [_s(j) for j in junk]
  for name in ("dag_validity", "dag_format", "answer_accuracy", "search_r1_em",
               "search_r1_format"):
    values = rewards.build_reward({name: {}})(samples)[0]
    assert values.shape == (len(junk),) and np.isfinite(values).all()
  assert sr.FAILURES == {}


# ------------------------------------------------------------------------------------------
# The judge, and the fallback without one
# ------------------------------------------------------------------------------------------

class _Judge(http.server.BaseHTTPRequestHandler):
  responses: list[str] = []

  def log_message(self, *args) -> None:
    pass

  def do_POST(self) -> None:
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][0]["content"]
    response = prompt.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    type(self).responses.append(response)
    content = "Same city.\nScore: 9" if "Lisbon" in response else "Score: 1"
    payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)


@pytest.fixture()
def judge_url():
  _Judge.responses = []
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  finally:
    httpd.shutdown()
    httpd.server_close()


def test_answer_accuracy_uses_the_judge_when_configured(judge_url):
  reward = rewards.build_reward({"answer_accuracy": {"judge": {"url": judge_url,
                                                               "model": "judge-m"}}})
  values = reward(SAMPLES)[0]
  # The judge reads only the extracted answers (the fake grades 9 when "Lisbon" is in it,
  # else 1); samples without one are not sent.
  np.testing.assert_allclose(values, [0.9, 0.1, 0.9, 0.9, 0.0, 0.0], rtol=1e-6)
  assert sorted(_Judge.responses) == sorted(["Lisbon", "Porto, Portugal", "the Lisbon",
                                             "Lisbon city"])
  # Inside rsearch: 0.5 * judge + 0.25 * validity + 0.25 * format.
  rsearch = sr.rsearch_reward(judge={"url": judge_url, "model": "judge-m"})
  np.testing.assert_allclose(rsearch(SAMPLES, 0)[0],
                             0.5 * values + 0.25 * VALID + 0.25 * FORMAT, rtol=1e-6)


def test_judge_fallback_and_failures():
  # Not configured: token F1 (the hand scores above); configured badly: a clear error.
  np.testing.assert_allclose(sr.answer_accuracy_reward(judge=None)(SAMPLES), F1, rtol=1e-6)
  with pytest.raises(ValueError, match="judge needs model"):
    sr.answer_accuracy_reward(judge={"url": "http://localhost:1/v1"})
  with pytest.raises(ValueError, match="needs an answer"):
    sr.answer_accuracy_reward()([_s("<answer>x</answer>", answer=None)])
  # A judge that cannot be reached scores 0 and counts the failure, never raises.
  unreachable = sr.answer_accuracy_reward(judge={"url": "http://127.0.0.1:9/v1", "model": "m",
                                                 "retries": 0, "timeout_s": 2.0})
  assert unreachable(SAMPLES[:1])[0] == 0.0
  assert unreachable.judge.counters["network_error"] == 1
