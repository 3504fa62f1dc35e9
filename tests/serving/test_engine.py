"""The serving engine: requests arriving from many threads get what one static batch gives
each of them (per-request keys and settings), stream their text, stop on stop strings, and
free their slots when cancelled."""

import queue
import threading

import jax
import numpy as np
import pytest

from tests.randomise import randomised_tiny
from tests.toy import PROMPTS, CharTokenizer
from wakea_jax.sampling import Sampler
from wakea_jax.serving.engine import Delta, Done, Engine, GenerationRequest, generate_text


@pytest.fixture(scope="module")
def model():
  return randomised_tiny(seed=5)


@pytest.fixture(scope="module")
def engine(model):
  config, graphdef, params = model
  e = Engine(Sampler(graphdef, config, per_row=True), params, CharTokenizer(), slots=3,
             chunk_steps=4, capacity=128)
  yield e
  e.close()


def _alone(model, prompt, max_tokens, seed, **settings):
  """The same request as row 0 of a static batch of one."""
  config, graphdef, params = model
  out = Sampler(graphdef, config, **settings).generate(
      params, [prompt], max_new_tokens=max_tokens, rng=jax.random.key(seed))
  return out.tokens[0], out.logprobs[0]


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.8),
                                      dict(temperature=1.0, top_p=0.7)])
def test_concurrent_requests_equal_each_alone(model, engine, settings):
  results: dict[int, list] = {}

  def ask(i):
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(GenerationRequest(PROMPTS[i], max_tokens=5 + 3 * i, seed=100 + i,
                                    **settings), events.put)
    tokens, logprobs = [], []
    while True:
      event = events.get(timeout=120)
      if isinstance(event, Delta):
        tokens += event.token_ids
        logprobs += event.logprobs
      else:
        results[i] = (tokens, logprobs, event)
        return

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for i in range(len(PROMPTS)):
    tokens, logprobs, done = results[i]
    expected, expected_lp = _alone(model, PROMPTS[i], 5 + 3 * i, 100 + i, **settings)
    assert tokens == expected, i
    np.testing.assert_allclose(logprobs, expected_lp, atol=1e-5)
    assert done.finish_reason == "length" and done.completion_tokens == len(expected)


def test_text_streams_and_stop_strings_cut_before_the_string(model, engine):
  text, done = generate_text(engine, GenerationRequest(PROMPTS[0], max_tokens=24,
                                                       temperature=0.0), timeout=120)
  expected, _ = _alone(model, PROMPTS[0], 24, 0, temperature=0.0)
  assert text == CharTokenizer().decode(expected) and done.finish_reason == "length"
  stop = text[9:11]
  cut, done = generate_text(engine, GenerationRequest(PROMPTS[0], max_tokens=24,
                                                      temperature=0.0, stop=(stop,)),
                            timeout=120)
  assert cut == text[:text.index(stop)] and done.finish_reason == "stop"
  assert engine.in_flight == 0


def test_cancel_frees_the_slot(engine):
  events: queue.SimpleQueue = queue.SimpleQueue()
  before = engine.snapshot()["cancelled"]
  handle = engine.submit(GenerationRequest(PROMPTS[1], max_tokens=100, temperature=1.0),
                         events.put)
  first = events.get(timeout=120)
  assert isinstance(first, Delta)
  handle.cancel()
  while not isinstance(event := events.get(timeout=120), Done):
    pass
  assert event.finish_reason == "cancelled" and event.completion_tokens < 100
  assert engine.snapshot()["cancelled"] == before + 1 and engine.in_flight == 0


def test_bad_requests_and_closing(model):
  config, graphdef, params = model
  with pytest.raises(ValueError, match="per_row"):
    Engine(Sampler(graphdef, config), params, CharTokenizer())
  e = Engine(Sampler(graphdef, config, per_row=True), params, CharTokenizer(), slots=2,
             capacity=128)
  with pytest.raises(ValueError, match="exceeds the context"):
    e.submit(GenerationRequest([1] * 100, max_tokens=100), print)
  with pytest.raises(ValueError, match="no tokens"):
    e.submit(GenerationRequest([], max_tokens=1), print)
  e.close()
  from wakea_jax.serving.engine import EngineClosed
  with pytest.raises(EngineClosed):
    e.submit(GenerationRequest([1], max_tokens=1), print)
