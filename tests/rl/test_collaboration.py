"""The three-model collaboration: retriever, teacher backends, verifier, regeneration with the
rejection reason, provenance, counts and resume.

Independent references: data/tasks/equations.py `first_error` (the task's own whole-solution
check, not the verifier's code path) judges every accepted and rejected solution; the fake
OpenAI server (tests/rl/fake_openai.py) is a real HTTP endpoint on 127.0.0.1. The local
backend and the project's own server as teacher are in tests/test_collaborate.py (they share
one tiny checkpoint there).
"""

import json
import threading
import types

import jax
import pytest

from tests.rl import fake_openai
from wakea_jax.data import trajectories
from wakea_jax.data.tasks import equations
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.rl import backends, collaboration, task_types
from wakea_jax.rl.judge import JudgeConfig, LLMJudge
from wakea_jax.rl.samples import Sample

EQUATIONS = task_types.TASK_TYPES["equations"]
_KEY = "sk-teacher-test"


def _config(**changes) -> collaboration.CollaborationConfig:
  values = dict(num_problems=5, context_k=2, context_examples=4, max_attempts=3, batch_size=3,
                temperature=0.0, max_tokens=256, min_judge_score=0.7)
  return collaboration.CollaborationConfig(**{**values, **changes})


def _read(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_verifier_reasons():
  problem = EQUATIONS.problems(4, 3, level=3)[0]
  verifier = collaboration.Verifier(EQUATIONS)
  steps = [a for _, a in equations.problems(4, 3, level=3)[0].steps]
  good = equations.render_solution([("", a) for a in steps], problem.answer)
  cases = {
      good: None,
      good.replace(f"<answer>{problem.answer}</answer>", f"<answer>{problem.answer + 1}</answer>"):
          "wrong_answer",
      equations.render_solution([("", a) for a in steps[:-1]] + [("", "x = 99")],
                                problem.answer): "invalid_step",
      equations.render_solution([("", a) for a in steps[:-1]], problem.answer): "invalid_step",
      f"The answer is <answer>{problem.answer}</answer>": "no_steps",
      good.split("<answer>")[0]: "no_answer",
  }
  for text, reason in cases.items():
    verdict = verifier.exact(problem, text)
    assert verdict.reason == reason, (text, verdict)
    # The task's own whole-solution check agrees on accept / reject.
    assert (equations.first_error(problem.text, text) is None) == (reason is None), text
  assert verifier.exact(problem, good).scores == {"answer": 1.0, "steps": 3.0,
                                                  "steps_valid": 1.0}


def test_retriever_puts_rules_and_examples_in_the_prompt():
  problem = EQUATIONS.problems(1, 0, level=4)[0]
  retriever = collaboration.ContextRetriever(EQUATIONS.context(6, 0), k=3)
  hits = retriever.retrieve(problem.text)
  assert len(hits) == 3 and all(h.doc_id.startswith(("rule-", "example-")) for h in hits)
  messages = collaboration.teacher_messages(EQUATIONS, problem, hits)
  assert messages[0] == {"role": "system", "content": equations.SYSTEM}
  assert all(f"[{h.doc_id}]\n{h.text}" in messages[1]["content"] for h in hits)
  assert backends.problem_of(messages) == problem.text
  assert collaboration.ContextRetriever(EQUATIONS.context(6, 0), k=0).retrieve("x") == []


def test_programmatic_errors_rejected_counts_and_resume(tmp_path):
  config = _config(num_problems=40, batch_size=16, max_attempts=2)
  collab, problems = collaboration.build(config, teacher={"kind": "programmatic",
                                                          "error_rate": 0.5, "seed": 1})
  summary = collab.run(problems, tmp_path)
  accepted, rejected = _read(tmp_path / "trajectories.jsonl"), _read(tmp_path / "rejected.jsonl")
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert summary["problems"] == 40 and summary["attempts"] == summary["accepted"] + len(rejected)
  assert summary["accepted"] == len(accepted) and summary["rejected"] == len(rejected)
  assert summary["accepted"] + summary["failed_problems"] == 40
  assert summary["failed_problems"] == sum(r["final"] for r in rejected) > 0
  assert sum(summary["rejected_by_reason"].values()) == len(rejected)
  assert set(summary["rejected_by_reason"]) <= {"invalid_step", "wrong_answer"}
  assert 0.3 < summary["acceptance_rate"] < 0.8
  for record in accepted:   # the task's own check accepts every kept trajectory...
    assert equations.first_error(record["problem"], equations.render_solution(
        record["steps"], record["answer"])) is None
    meta = record["meta"]
    assert meta["teacher"] == {"backend": "programmatic", "model": "equations-expert+errors0.5"}
    assert meta["attempts"] == len(meta["rejections"]) + 1 and len(meta["context"]) == 2
  # The SRL loader (data/trajectories.py) reads the file as it is.
  assert len(trajectories.load_trajectories(str(tmp_path / "trajectories.jsonl"))) == len(
      accepted)
  for r in rejected:        # ...and rejects every dropped one
    problem = next(p for p in problems if p.problem_id == r["problem_id"])
    assert (equations.first_error(r["problem"], r["text"]) is not None
            or f"<answer>{problem.answer}</answer>" not in r["text"])
  # Re-running skips the accepted problems and retries only the failed ones.
  again = collab.run(problems, tmp_path)
  assert again["skipped_already_accepted"] == summary["accepted"]
  assert again["attempted_problems"] == summary["failed_problems"]
  assert again["accepted_total"] == summary["accepted"] + again["accepted"]
  ids = [r["meta"]["problem_id"] for r in _read(tmp_path / "trajectories.jsonl")]
  assert len(ids) == len(set(ids))


class _Teacher:
  """The fake endpoint's teacher and judge. Per problem (by index): 0 wrong step then right,
  1 wrong answer then right, 2 right but "sloppy" (the judge scores it 3/10) then right,
  3 always a wrong answer, 4 a server error."""

  def __init__(self, problems):
    self.problems = problems
    self.requests: list[dict] = []
    self.lock = threading.Lock()

  def respond(self, path, body, headers):
    assert path == "/v1/chat/completions"
    with self.lock:
      self.requests.append({"model": body["model"], "messages": body["messages"],
                            "auth": headers.get("Authorization")})
    if body["model"] == "judge-m":
      response = body["messages"][0]["content"].split("<response>\n", 1)[1]
      return "Careless.\nScore: 3" if "sloppy" in response else "Fine.\nScore: 9"
    assert body["model"] == "teacher-m" and headers.get("Authorization") == f"Bearer {_KEY}"
    text = backends.problem_of(body["messages"])
    index = next(i for i, p in enumerate(self.problems) if p.text == text)
    problem, retry = self.problems[index], "rejected by the verifier" in body["messages"][-1][
        "content"]
    right = problem.solution
    wrong_answer = right.replace(f"<answer>{problem.answer}</answer>",
                                 f"<answer>{problem.answer + 5}</answer>")
    if index == 4:
      return 500, b'{"error": "boom"}'
    if retry and index != 3:
      return right
    return [right.replace("Step 1: ", "Step 1: 3x + "), wrong_answer,
            "<think>sloppy</think>\n" + right, wrong_answer][index]


def test_openai_teacher_and_judge_regenerate_with_the_reason(tmp_path, monkeypatch):
  monkeypatch.setenv("TEACHER_KEY", _KEY)
  config = _config()
  problems = EQUATIONS.problems(5, 0, level=3)
  fake = _Teacher(problems)
  with fake_openai.serving(fake.respond) as url:
    judge = LLMJudge(JudgeConfig(url=url, model="judge-m", retries=0))
    collab, _ = collaboration.build(config, teacher={
        "kind": "openai", "url": url, "model": "teacher-m", "api_key_env": "TEACHER_KEY",
        "retries": 0, "timeout_s": 10.0}, judge=judge)
    summary = collab.run(problems, tmp_path)
  assert summary["rejected_by_reason"] == {"teacher_error": 3, "wrong_answer": 4,
                                           "invalid_step": 1, "low_judge_score": 1}
  assert (summary["attempts"], summary["accepted"], summary["failed_problems"]) == (12, 3, 2)
  assert summary["acceptance_rate"] == pytest.approx(3 / 12)
  # The retry prompt names the reason and shows the rejected text (and the judge's critique).
  teacher_prompts = {}
  for r in fake.requests:
    if r["model"] == "teacher-m":
      teacher_prompts.setdefault(backends.problem_of(r["messages"]), []).append(
          r["messages"][-1]["content"])
  first, second = teacher_prompts[problems[0].text]
  assert "rejected" not in first and "(invalid_step: step 1" in second
  assert "<previous>\n<think>" in second and "Step 1: 3x + " in second
  assert "(wrong_answer: the answer" in teacher_prompts[problems[1].text][1]
  assert "(low_judge_score: judge score 0.30 < 0.70: Careless." in teacher_prompts[
      problems[2].text][1]
  assert len(teacher_prompts[problems[3].text]) == 3
  # The judge is asked only about solutions that pass the exact checks.
  assert sum(r["model"] == "judge-m" for r in fake.requests) == 4
  # Provenance.
  accepted = {r["problem"]: r for r in _read(tmp_path / "trajectories.jsonl")}
  meta = accepted[problems[2].text]["meta"]
  assert meta["teacher"] == {"backend": "openai", "model": "teacher-m"}
  assert meta["verifier"]["judge"] == {"backend": "openai", "model": "judge-m", "min_score": 0.7}
  assert meta["scores"] == {"answer": 1.0, "steps": 3.0, "steps_valid": 1.0, "judge": 0.9}
  assert meta["attempts"] == 2 and meta["rejections"] == ["low_judge_score"]
  assert meta["level"] == 3 and len(meta["context"]) == 2
  assert accepted[problems[0].text]["steps"][0]["reasoning"]
  rejected = _read(tmp_path / "rejected.jsonl")
  assert {r["reason"] for r in rejected if r["problem"] == problems[4].text} == {"teacher_error"}
  assert "HTTP 500" in next(r["detail"] for r in rejected if r["reason"] == "teacher_error")


def test_backend_config_errors():
  with pytest.raises(ValueError, match=r"config.teacher.kind: 'gpt' is not a backend"):
    backends.build_backend({"kind": "gpt"}, where="teacher")
  with pytest.raises(ValueError, match=r"config.teacher: openai backend: .*unexpected keyword "
                     r"argument 'checkpoint'"):
    backends.build_backend({"kind": "openai", "url": "http://x", "model": "m",
                            "checkpoint": "c"}, where="teacher")
  with pytest.raises(ValueError, match=r"config.teacher: openai backend: url must start"):
    backends.build_backend({"kind": "openai", "url": "x", "model": "m"}, where="teacher")
  with pytest.raises(ValueError, match="error_rate must be in"):
    backends.build_backend({"kind": "programmatic", "error_rate": 2.0}, where="teacher",
                           solutions={}, expert="e")
  with pytest.raises(ValueError, match="task: 'nope' is not a task type"):
    collaboration.CollaborationConfig(task="nope")
  with pytest.raises(ValueError, match="no <problem>"):
    backends.problem_of([{"role": "user", "content": "hi"}])


def test_arithmetic_task_type():
  arithmetic = task_types.TASK_TYPES["arithmetic"]
  verifier = collaboration.Verifier(arithmetic)
  problems = arithmetic.problems(30, 0, max_operand=99) + arithmetic.problems(10, 0)
  assert all(verifier.exact(p, p.solution).accepted for p in problems)
  p = next(p for p in problems if "*" in p.text and len(arithmetic.parse_steps(p.solution)) == 3)
  lines = p.solution.splitlines()
  skipped = "\n".join(line for line in lines if not line.startswith("Step 2"))
  assert verifier.exact(p, skipped).reason == "invalid_step"
  assert verifier.exact(p, p.solution.replace("<answer>", "<answer>1")).reason == "wrong_answer"


def test_a_teacher_that_never_answers_fails_fast(tmp_path):
  # Nothing listens on port 9 of 127.0.0.1 in the test machine: connection refused.
  collab, problems = collaboration.build(_config(), teacher={
      "kind": "openai", "url": "http://127.0.0.1:9/v1", "model": "m", "retries": 0,
      "timeout_s": 2.0})
  with pytest.raises(RuntimeError, match=r"teacher \(openai, m\): all 3 requests failed, e.g. "
                     "network_error"):
    collab.run(problems, tmp_path)


def test_a_record_the_srl_loader_refuses_is_rejected(tmp_path):
  problem = EQUATIONS.problems(1, 0, level=2)[0]
  # Right steps and answer, but a turn delimiter in the reasoning: SRL prompts would break.
  text = problem.solution.replace("<think>", "<think><|im_start|>", 1)
  teacher = backends.ProgrammaticBackend(solutions={problem.text: text}, expert="e")
  collab = collaboration.Collaboration(
      _config(max_attempts=1), teacher=teacher, verifier=collaboration.Verifier(EQUATIONS),
      retriever=collaboration.ContextRetriever([], k=0))
  summary = collab.run([problem], tmp_path)
  assert summary["rejected_by_reason"] == {"bad_record": 1} and summary["accepted"] == 0
  assert "reasoning' contains the markup '<|im_start|>'" in _read(
      tmp_path / "rejected.jsonl")[0]["detail"]


def test_local_backend_keeps_the_monologue_markup():
  """<think> and </think> are special ids: the local teacher's text must keep them (the
  verifier and split_steps read them), and only the final stop id is dropped."""
  tok = default_tokenizer()
  reply = "<think>subtract 3</think>\nStep 1: 2x = 4\n<answer>2</answer>"
  stop = tok.special_ids["<|im_end|>"]

  class Sampler:
    stop_ids = (stop,)

    def generate(self, params, rows, **kwargs):
      return types.SimpleNamespace(tokens=[tok.encode(reply) + [stop] for _ in rows])

  backend = object.__new__(backends.LocalBackend)
  backend.__dict__.update(tokenizer=tok, params=None, batch_size=2, _rng=jax.random.key(0),
                          _calls=0, _samplers={0.0: Sampler()})
  messages = [{"role": "user", "content": "Solve for x: 2x + 3 = 7"}]
  assert backend.generate_batch([messages] * 3) == [[reply]] * 3
  assert task_types.split_steps(reply) == [{"action": "2x = 4", "reasoning": "subtract 3"}]


def test_a_failed_judge_is_a_judge_error_not_a_low_score():
  # Nothing listens on port 9 of 127.0.0.1: the request fails at once (no retries).
  judge = LLMJudge(JudgeConfig(url="http://127.0.0.1:9/v1", model="j", retries=0,
                               timeout_s=2.0))
  problem = EQUATIONS.problems(1, 0, level=2)[0]
  verdict, = collaboration.Verifier(EQUATIONS, judge, 0.7).verify([problem], [problem.solution])
  assert verdict.reason == "judge_error" and "network_error" in verdict.detail
  assert "judge" not in verdict.scores and judge.counters["network_error"] == 1
  # As a reward the failure still scores 0.
  assert judge.score(Sample(prompt=problem.text, completion=problem.solution,
                            answer=problem.answer)) == 0.0
