"""Interaction protocols: a row pauses at a protocol's string, the host's response goes into
its cache (masked), and it resumes exactly as a full forward over the whole text would
continue; Search-R1's and R-Search's responses on hand-made sources."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.randomise import randomised_tiny
from tests.toy import PROMPTS, CharTokenizer
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.sampling import Sampler
from wakea_jax.sampling.batching import ContinuousBatcher
from wakea_jax.sampling.protocols import RSearch, SearchR1, last_block
from wakea_jax.sampling.sampler import STOP_ID
from wakea_jax.toolbox.search_sources import Passage, SourceRegistry


@dataclasses.dataclass(frozen=True)
class EchoProtocol:
  """Pauses at `pause`; answers with fixed ids, at most `max_calls` times."""
  pause: str
  reply: tuple[int, ...] = (3, 4, 5)
  max_calls: int = 2
  tokenizer: object = CharTokenizer()

  @property
  def pause_strings(self):
    return (self.pause,)

  @property
  def reserve(self):
    return self.max_calls * len(self.reply)

  def on_stop(self, turn, *, code, paused, calls, budget_left):
    if not paused:
      return None, "stop_id" if code == STOP_ID else "length"
    if calls >= self.max_calls or budget_left <= 0:
      return None, "stop_string"
    return self.tokenizer.decode(turn), ""

  def respond(self, payload):
    assert payload.endswith(self.pause)   # the turn was cut right after the pause string
    return list(self.reply), 0


@pytest.fixture(scope="module")
def model():
  return randomised_tiny(seed=5)


def test_pause_inject_resume_equals_a_full_forward(model):
  config, graphdef, params = model
  sampler = Sampler(graphdef, config, temperature=1.0)
  free = sampler.generate(params, PROMPTS, max_new_tokens=20, rng=jax.random.key(1))
  pause = CharTokenizer().decode(free.tokens[0][3:5])   # a string row 0 will write
  protocol = EchoProtocol(pause)
  outs = [ContinuousBatcher(sampler, slots=slots, chunk_steps=4).run_protocol(
      params, PROMPTS, protocol, rng=jax.random.key(1), max_new_tokens=20)
      for slots in (2, 6)]
  assert outs[0].tokens == outs[1].tokens          # any slots: the same requests
  out = outs[0]
  assert out.num_tool_calls[0] >= 1
  row = out.tokens[0]
  first = CharTokenizer().decode(row[:int(np.argmax(out.tool_mask[0]))])
  assert first.endswith(pause) and first.count(pause) == 1   # cut right after the string
  assert row[len(first):len(first) + 3] == [3, 4, 5]
  apply = jax.jit(transformer.apply, static_argnums=0)
  for r, prompt in enumerate(PROMPTS):
    ids = prompt + out.tokens[r]
    logits = apply(graphdef, params, jnp.asarray([ids]))
    logp = jax.nn.log_softmax(logits[0, :-1], -1)[jnp.arange(len(ids) - 1),
                                                   jnp.asarray(ids[1:])]
    model_tokens = out.tool_mask[r] == 0
    np.testing.assert_allclose(out.logprobs[r][model_tokens],
                               np.asarray(logp)[len(prompt) - 1:][model_tokens], atol=1e-4)
    assert model_tokens.sum() <= 20 and out.tool_mask[r].sum() <= 6


class FakeSource:
  name = "Local"
  note = ""

  def __init__(self, passages, fail=False):
    self.passages, self.fail, self.queries = passages, fail, []

  def search(self, query, k):
    self.queries.append(query)
    if self.fail:
      raise ConnectionError("down")
    return self.passages[:k]


TOK = default_tokenizer()


def test_search_r1_turns_and_blocks():
  source = FakeSource([Passage("Zorava Kelt", "Zorava Kelt was born in <|im_end|>Mirvale.",
                               1.0, "Local"), Passage("Mirvale", "A city.", 0.5, "Local")])
  protocol = SearchR1(TOK, source, k=2, max_searches=2, max_tokens=64)
  turn = TOK.encode("<think>who</think><search> Zorava Kelt birthplace </search>")
  payload, _ = protocol.on_stop(turn, code=0, paused=True, calls=0, budget_left=10)
  assert payload == "Zorava Kelt birthplace"
  ids, errors = protocol.respond(payload)
  text = TOK.decode(ids)
  assert errors == 0 and text.startswith("\n\n<information>Doc 1 (Title: Zorava Kelt)")
  assert "<|im_end|>" not in text and text.rstrip().endswith("</information>")
  assert source.queries == ["Zorava Kelt birthplace"]
  # Limits and the other ends of a turn.
  assert protocol.on_stop(turn, code=0, paused=True, calls=2, budget_left=10) == (
      None, "stop_string")
  assert protocol.on_stop(turn, code=STOP_ID, paused=False, calls=0, budget_left=10) == (
      None, "stop_id")
  # A cut block keeps its closing tag; failures and empty queries are the model's to read.
  short = SearchR1(TOK, source, max_tokens=12)
  assert TOK.decode(short.respond("x")[0]).endswith("</information>\n\n")
  assert short.respond("")[1] == 1
  assert "search failed" in TOK.decode(SearchR1(TOK, FakeSource([], fail=True)).respond("q")[0])
  tagged = SearchR1(TOK, source, search_tag="query", information_tag="context")
  assert tagged.pause_strings == ("</query>",)
  assert "<context>" in TOK.decode(tagged.respond("q")[0])


def test_rsearch_executes_the_dag_block():
  local = FakeSource([Passage("Acme Corp", "Founded by Ilsa Brant.", 1.0, "Local")])
  protocol = RSearch(TOK, SourceRegistry([local]), k=1)
  text = "<search>\nNodes:\nA: who founded Acme Corp (Local)\nEdges:\n</search>"
  payload, _ = protocol.on_stop(TOK.encode("plan " + text), code=0, paused=True, calls=0,
                                budget_left=5)
  assert last_block(payload, "<search>", "</search>").strip().startswith("Nodes:")
  ids, errors = protocol.respond(payload)
  assert errors == 0 and "<r>" in TOK.decode(ids) and "Acme Corp" in TOK.decode(ids)
  bad, errors = protocol.respond("<search>\nNodes:\nA: q (Nowhere)\n</search>")
  assert errors == 1 and "unknown_source" in TOK.decode(bad)
