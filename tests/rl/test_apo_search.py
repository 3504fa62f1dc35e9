"""APO's beam search (rl/apo.py) with a fake scorer, the rule proposer, the reply parser,
and the LLM proposer's two calls against a real loopback OpenAI-compatible server."""

import random

import pytest

from tests.rl.fake_openai import serving
from wakea_jax.rl import apo, apo_proposers
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl.apo_proposers import RULES

TAGS = RULES["missing_answer_tags"][0]
WORK = RULES["wrong_answer"][0]


def fake_scorer(calls=None, n=8):
  """A prompt's score: 0 without the tag sentence, 4/8 with it, 7/8 with the work sentence
  too. Failures lack tags when the prompt does, and are wrong answers otherwise."""
  def score(prompts):
    if calls is not None:
      calls.append(list(prompts))
    out = []
    for p in prompts:
      passed = (7 if WORK in p else 4) if TAGS in p else 0
      examples = tuple(apo.ScoredExample(
          question=f"What is {i}+1?", answer=str(i + 1), reward=float(i < passed),
          completion=(f"<answer>{i + 1 if i < passed else 0}</answer>" if TAGS in p
                      else f"The answer is {i}."))
          for i in range(n))
      out.append(apo.PromptScore(mean=passed / n, examples=examples))
    return out
  return score


def test_beam_search_finds_and_keeps_the_best():
  config = apo.APOConfig(start_prompt="Be nice.", beam_width=2, branching=3, rounds=3)
  calls = []
  result = apo.search(fake_scorer(calls), apo_proposers.RuleProposer(), config, log=lambda _: None)
  assert result.start.prompt == "Be nice." and result.start.score == 0
  assert result.best.score == 7 / 8
  assert TAGS in result.best.prompt and WORK in result.best.prompt
  # The beam never gets worse, and its head is the best candidate seen so far.
  heads = [result.candidates[b[0]].score for b in result.beams]
  assert heads == sorted(heads) and heads[0] == 0
  for c in result.candidates[1:]:
    assert c.parent is not None and result.candidates[c.parent].round < c.round
  # Dedupe: no prompt is scored twice, and the search saw duplicates it skipped.
  scored = [p for call in calls for p in call]
  assert len(scored) == len({apo.prompt_key(p) for p in scored}) == len(result.candidates)
  assert result.counts["duplicates"] > 0
  # Deterministic in the seed.
  again = apo.search(fake_scorer(), apo_proposers.RuleProposer(), config, log=lambda _: None)
  assert again.candidates == result.candidates and again.beams == result.beams


def test_a_tie_keeps_the_older_prompt_and_nothing_to_fix_stops():
  def flat(prompts):
    return [apo.PromptScore(0.5, (apo.ScoredExample("q", "no", "1", 0.0),
                                  apo.ScoredExample("q", "1", "1", 1.0))) for _ in prompts]
  result = apo.search(flat, apo_proposers.RuleProposer(), apo.APOConfig(rounds=2),
                      log=lambda _: None)
  assert result.best.id == 0 and len(result.candidates) > 1

  def perfect(prompts):
    return [apo.PromptScore(1.0, (apo.ScoredExample("q", "1", "1", 1.0),)) for _ in prompts]
  result = apo.search(perfect, apo_proposers.RuleProposer(), apo.APOConfig(rounds=5),
                      log=lambda _: None)
  assert len(result.candidates) == 1 and len(result.beams) == 2


def test_config_errors():
  with pytest.raises(ValueError, match="apo.beam_width must be >= 1, got 0"):
    apo.APOConfig(beam_width=0)
  with pytest.raises(ValueError, match="apo.start_prompt has 20 characters"):
    apo.APOConfig(start_prompt="x" * 20, max_prompt_chars=10)
  with pytest.raises(ValueError, match="the dev set is empty"):
    apo.search(lambda ps: [apo.PromptScore(0.0, ()) for _ in ps],
               apo_proposers.RuleProposer(), apo.APOConfig(), log=lambda _: None)
  with pytest.raises(ValueError, match=r"config.proposer.kind: 'gpt' is not a proposer"):
    apo_proposers.build_proposer({"kind": "gpt"})
  with pytest.raises(ValueError, match=r"config.proposer: openai backend: .*url"):
    apo_proposers.build_proposer({"kind": "openai", "model": "m"})


def test_failure_categories_and_rule_edits():
  cat = apo_proposers.failure_categories
  assert cat(apo.ScoredExample("q", "The answer is 3.", "4", 0.0)) == [
      "missing_answer_tags", "wrong_answer"]
  assert cat(apo.ScoredExample("q", "hmm", "4", 0.0)) == ["missing_answer_tags", "no_answer"]
  assert cat(apo.ScoredExample("q", "<answer>3</answer>", "4", 0.0)) == ["wrong_answer"]
  assert cat(apo.ScoredExample("q", "1 2 3", "4", 0.0, truncated=True))[0] == "too_long"
  failures = [apo.ScoredExample("q", "<answer>3</answer>", "4", 0.0)] * 3
  out = apo_proposers.RuleProposer().propose("Be nice.", failures, n=5, rng=random.Random(0))
  # Only wrong answers: the three wrong-answer sentences, then two of them together.
  assert {p.prompt for p in out[:3]} == {f"Be nice. {s}" for s in RULES["wrong_answer"]}
  assert len(out) == 4 and out[3].prompt.count(".") == 3
  long = [apo.ScoredExample("q", "1 2", "4", 0.0, truncated=True)]
  out = apo_proposers.RuleProposer().propose(f"Hi. {WORK}", long, n=9, rng=random.Random(0))
  assert any(p.prompt == "Hi." for p in out)


def test_parse_candidates():
  parse = apo_proposers.parse_candidates
  assert parse("Sure:\n<prompt>\nA.\n</prompt>\n<PROMPT>B.</PROMPT> <prompt>C cut") == [
      "A.", "B.", "C cut"]
  assert parse("<START>A<END> and <START>\"B\"<END>") == ["A", "B"]
  assert parse("```\nA\n```\n```text\nB\n```") == ["A", "B"]
  assert parse("I cannot help with that.") == [] and parse("<prompt> </prompt>") == []


def test_with_system_prompt_replaces_the_records_own():
  record = prompts_lib.PromptRecord(messages=({"role": "system", "content": "old"},
                                              {"role": "user", "content": "q"}), answer="1")
  assert prompts_lib.with_system_prompt(record, "new").messages == (
      {"role": "system", "content": "new"}, {"role": "user", "content": "q"})
  assert prompts_lib.with_system_prompt(record, "").messages == ({"role": "user",
                                                                  "content": "q"},)


def test_openai_proposer_critiques_then_rewrites():
  seen = []

  def respond(path, body, headers):
    seen.append(body["messages"][-1]["content"])
    if len(seen) % 2:
      return "The prompt never asks for <answer> tags."
    if len(seen) == 4:
      return (500, b"{}")   # the second rewrite fails: that parent proposes nothing
    return f"<prompt>Be nice. {TAGS}</prompt>\n<prompt>Be nice. Use tags.</prompt>"

  with serving(respond) as url:
    proposer = apo_proposers.build_proposer(
        {"kind": "openai", "url": url, "model": "critic", "retries": 0}, temperature=0.0)
    failures = [apo.ScoredExample("What is 2+2?", "The answer is 4.", "4", 0.0)]
    out = proposer.propose("Be nice.", failures, n=3, rng=random.Random(0))
    assert [p.prompt for p in out] == [f"Be nice. {TAGS}", "Be nice. Use tags."]
    assert out[0].note == "The prompt never asks for <answer> tags."
    assert "What is 2+2?" in seen[0] and "Expected answer: 4" in seen[0]
    assert "never asks for <answer> tags" in seen[1] and "Write 3 different" in seen[1]
    assert proposer.propose("Be nice.", failures, n=3, rng=random.Random(0)) == []
    assert proposer.errors == {"http_error": 1}
    # A whole search through the endpoint, on the fake scorer.
    result = apo.search(fake_scorer(), proposer, apo.APOConfig(start_prompt="Be nice.", rounds=1),
                        log=lambda _: None)
  assert result.best.prompt == f"Be nice. {TAGS}" and result.best.score == 0.5

