"""Three-model collaboration: verified expert trajectories with provenance (issue 16, seed 004).

  context retriever  BM25 over the task's rules and worked examples; the top-k go into the
                     teacher's prompt
  teacher planner    a backend (rl/backends.py: openai, local or programmatic) that writes a
                     step-by-step solution of the problem, given that context
  verifier           the task's verifiable reward on the final answer, its step validator on
                     every step (the first against the problem), and optionally an LLM judge
                     (rl/judge.py) whose score must reach `min_judge_score`

A rejected solution is regenerated up to `max_attempts` times in all, the verifier's reason
(and the rejected text) in the next prompt. Teachers work on `batch_size` problems at a time
(one batched call per attempt round); after each batch the outputs in `out_dir` are
rewritten atomically, so an interrupted run loses at most a batch and a re-run skips the
problems already accepted:

  trajectories.jsonl  accepted records {"problem", "steps", "answer", "meta"} (checked with
                      data/trajectories.py, so SRL loads them), meta holding the
                      provenance: teacher and judge backends and models, scores, attempts,
                      the ids of the retrieved context, the reasons of earlier rejections
  rejected.jsonl      one line per rejected attempt: reason, detail, the text
  summary.json        counts: problems, attempts, accepted, rejected by reason, rates, seconds

Domains come from `task_types.TASK_TYPES`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from wakea_jax.data import sources, trajectories
from wakea_jax.retrieval.bm25 import BM25
from wakea_jax.retrieval.store import Document, Hit
from wakea_jax.rl import answers
from wakea_jax.rl.backends import PROBLEM_CLOSE, PROBLEM_OPEN, Backend, build_backend, generate_all
from wakea_jax.rl.chat_api import ChatError
from wakea_jax.rl.judge import LLMJudge
from wakea_jax.rl.samples import Sample
from wakea_jax.rl.task_types import TASK_TYPES, TaskProblem, TaskType, to_record

TRAJECTORIES, REJECTED, SUMMARY = "trajectories.jsonl", "rejected.jsonl", "summary.json"
# Rejection reasons, in the order the verifier checks them (the first failing one is given).
# judge_error: the judge request failed or its reply had no score; the solution is not
# kept (unjudged), but the count says the judge, not the teacher, failed.
REASONS = ("teacher_error", "no_steps", "no_answer", "wrong_answer", "invalid_step",
           "judge_error", "low_judge_score", "bad_record")
_FEEDBACK_CHARS = 2000   # of a rejected attempt shown back to the teacher


@dataclasses.dataclass(frozen=True)
class CollaborationConfig:
  """What to generate and how hard to try (configs/collaborate.py `collaboration`)."""

  task: str = "equations"
  num_problems: int = 200
  seed: int = 0
  problem_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  context_k: int = 3              # retrieved snippets in the teacher's prompt (0: none)
  context_examples: int = 20      # worked examples indexed beside the rules
  max_attempts: int = 3           # teacher calls per problem, the first included
  batch_size: int = 64            # problems per batched round and per atomic write
  temperature: float = 0.7
  max_tokens: int = 512
  min_judge_score: float = 0.7    # in [0, 1]; used when a judge is configured

  def __post_init__(self) -> None:
    if self.task not in TASK_TYPES:
      raise ValueError(f"task: {self.task!r} is not a task type; known: "
                       f"{', '.join(sorted(TASK_TYPES))}")
    for name in ("num_problems", "max_attempts", "batch_size", "max_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.context_k < 0 or self.context_examples < 0:
      raise ValueError(f"context_k and context_examples must be >= 0, got {self.context_k}, "
                       f"{self.context_examples}")
    if not 0.0 <= self.min_judge_score <= 1.0:
      raise ValueError(f"min_judge_score must be in [0, 1], got {self.min_judge_score}")


class ContextRetriever:
  """BM25 (retrieval/bm25.py) over a task's rules and worked examples, queried with the
  problem text."""

  def __init__(self, documents: Sequence[Document], k: int) -> None:
    self.k = k
    self.index = BM25(documents) if documents and k else None

  def retrieve(self, query: str) -> list[Hit]:
    """The best k snippets for `query` (none when k is 0 or nothing matches)."""
    return self.index.search(query, self.k) if self.index is not None else []


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The verifier's decision on one solution; `reason` is None when accepted."""

  reason: str | None
  detail: str
  scores: Mapping[str, float]

  @property
  def accepted(self) -> bool:
    """Whether every check passed."""
    return self.reason is None


def teacher_messages(task: TaskType, problem: TaskProblem, context: Sequence[Hit],
                     rejected: tuple[str, Verdict] | None = None) -> list[dict[str, str]]:
  """The teacher's prompt: the task's system prompt; the retrieved snippets, the previous
  attempt and why it was rejected (on a retry), then the problem, fenced last so that no
  echoed text can be taken for it."""
  parts = []
  if context:
    parts.append("Rules and worked examples that may help:\n" + "\n\n".join(
        f"[{hit.doc_id}]\n{hit.text}" for hit in context))
  if rejected is not None:
    text, verdict = rejected
    parts.append("Your previous solution was rejected by the verifier "
                 f"({verdict.reason}: {verdict.detail}).\nPrevious solution:\n<previous>\n"
                 f"{text[:_FEEDBACK_CHARS]}\n</previous>\nWrite a corrected solution.")
  parts.append("Solve the problem step by step.\n" + PROBLEM_OPEN + problem.text
               + PROBLEM_CLOSE)
  return [{"role": "system", "content": task.system},
          {"role": "user", "content": "\n\n".join(parts)}]


class Verifier:
  """Checks a solution: steps parse, the answer is tagged and right, every step is valid,
  and (with a judge) the judge's score reaches `min_judge_score`. The judge is asked only
  about solutions that pass the exact checks: it costs a request and cannot overrule them."""

  def __init__(self, task: TaskType, judge: LLMJudge | None = None,
               min_judge_score: float = 0.7) -> None:
    self.task, self.judge, self.min_judge_score = task, judge, min_judge_score

  def exact(self, problem: TaskProblem, text: str) -> Verdict:
    """The checks without the judge."""
    actions = self.task.parse_steps(text)
    answer_ok = self.task.reward(text, problem.answer)
    bad_step = self.task.check_steps(problem.start, actions) if actions else None
    valid = len(actions) if bad_step is None else bad_step[0]
    scores = {"answer": answer_ok, "steps": float(len(actions)),
              "steps_valid": valid / len(actions) if actions else 0.0}
    if not actions:
      return Verdict("no_steps", "no 'Step k:' lines", scores)
    if answers.extract_answer(text, fallback=None) is None:
      return Verdict("no_answer", "no <answer>...</answer>", scores)
    if not answer_ok:
      given = answers.extract_answer(text, fallback=None)
      return Verdict("wrong_answer", f"the answer {given!r} is not correct", scores)
    if bad_step is not None:
      return Verdict("invalid_step", bad_step[1], scores)
    return Verdict(None, "", scores)

  def verify(self, problems: Sequence[TaskProblem], texts: Sequence[str]) -> list[Verdict]:
    """Verdicts for (problem, text) pairs; judge requests run in parallel."""
    verdicts = [self.exact(p, t) for p, t in zip(problems, texts)]
    if self.judge is None:
      return verdicts
    asked = [i for i, v in enumerate(verdicts) if v.accepted]
    samples = [Sample(prompt=problems[i].text, completion=texts[i], answer=problems[i].answer)
               for i in asked]
    workers = max(1, min(self.judge.config.workers, len(samples)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      critiques = list(pool.map(self.judge.critique, samples))
    for i, (score, critique) in zip(asked, critiques):
      if score is None:
        verdicts[i] = Verdict("judge_error", critique[-500:], verdicts[i].scores)
        continue
      scores = {**verdicts[i].scores, "judge": score}
      verdicts[i] = (Verdict(None, "", scores) if score >= self.min_judge_score else
                     Verdict("low_judge_score", f"judge score {score:.2f} < "
                             f"{self.min_judge_score:.2f}: {critique[-500:]}", scores))
    return verdicts


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  records = []
  for _, record in sources.jsonl_lines(path):
    if isinstance(record, Exception):
      raise record
    records.append(record)
  return records


def _write_json(value: Any, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  os.replace(tmp, path)


class Collaboration:
  """Retriever, teacher and verifier for one task; `run` writes the outputs (module
  docstring)."""

  def __init__(self, config: CollaborationConfig, *, teacher: Backend,
               verifier: Verifier, retriever: ContextRetriever) -> None:
    self.config, self.teacher = config, teacher
    self.verifier, self.retriever = verifier, retriever
    self.task = verifier.task
    self._teacher_answered = False   # has any request of this run succeeded?

  def _check_teacher(self, replies: Sequence[list[str] | ChatError]) -> None:
    """Fails fast when the teacher has not answered a single request of this run (a wrong
    url, model or key would otherwise be retried for every problem, only to end as a
    summary of teacher errors); later failures are rejections, logged once."""
    errors = [r for r in replies if isinstance(r, ChatError)]
    if len(errors) < len(replies):
      self._teacher_answered = True
    if errors and not self._teacher_answered:
      raise RuntimeError(f"teacher ({self.teacher.name}, {self.teacher.model}): all "
                         f"{len(errors)} requests failed, e.g. {errors[0].kind}: {errors[0]}")
    if errors:
      logging.log_first_n(logging.WARNING, "collaboration: %d teacher request(s) failed, "
                          "e.g. %s: %s (recorded as teacher_error rejections)", 1,
                          len(errors), errors[0].kind, errors[0])

  def _provenance(self) -> dict[str, Any]:
    judge = self.verifier.judge
    return {"teacher": {"backend": self.teacher.name, "model": self.teacher.model},
            "verifier": {"checks": self.task.checks,
                         "judge": None if judge is None else {
                             "backend": "openai", "model": judge.config.model,
                             "min_score": self.verifier.min_judge_score}}}

  def _solve(self, problems: Sequence[TaskProblem], counts: Counter[str],
             accepted: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
    """Attempt rounds over `problems` until each is accepted or out of attempts."""
    c = self.config
    context = {p.problem_id: self.retriever.retrieve(p.text) for p in problems}
    last: dict[str, tuple[str, Verdict]] = {}
    history: dict[str, list[str]] = {p.problem_id: [] for p in problems}
    pending = list(problems)
    for attempt in range(1, c.max_attempts + 1):
      if not pending:
        break
      conversations = [teacher_messages(self.task, p, context[p.problem_id],
                                        last.get(p.problem_id)) for p in pending]
      replies = generate_all(self.teacher, conversations, temperature=c.temperature,
                             max_tokens=c.max_tokens)
      self._check_teacher(replies)
      texts = [r[0] if isinstance(r, list) else "" for r in replies]
      verdicts = self.verifier.verify(pending, texts)
      still = []
      for problem, reply, text, verdict in zip(pending, replies, texts, verdicts):
        counts["attempts"] += 1
        if isinstance(reply, ChatError):
          verdict = Verdict("teacher_error", f"{reply.kind}: {reply}", {})
        if verdict.accepted:
          record = to_record(self.task, problem, text)
          record["meta"] = {
              "problem_id": problem.problem_id, "task": self.task.name, **problem.meta,
              **self._provenance(), "scores": dict(verdict.scores), "attempts": attempt,
              "rejections": history[problem.problem_id],
              "context": [hit.doc_id for hit in context[problem.problem_id]]}
          try:   # the SRL loader's own schema check: every kept record loads there
            trajectories.to_trajectory(record, f"{problem.problem_id} attempt {attempt}")
          except ValueError as e:
            verdict = Verdict("bad_record", str(e), verdict.scores)
        if verdict.accepted:
          counts["accepted"] += 1
          accepted.append(record)
          continue
        counts[f"rejected:{verdict.reason}"] += 1
        history[problem.problem_id].append(verdict.reason)
        rejected.append({"problem_id": problem.problem_id, "problem": problem.text,
                         "attempt": attempt, "final": attempt == c.max_attempts,
                         "reason": verdict.reason, "detail": verdict.detail,
                         "scores": dict(verdict.scores), "text": text,
                         "teacher": self._provenance()["teacher"]})
        last[problem.problem_id] = (text, verdict)
        still.append(problem)
      pending = still
    counts["failed"] += len(pending)

  def run(self, problems: Sequence[TaskProblem], out_dir: str | os.PathLike[str]
          ) -> dict[str, Any]:
    """Generates, verifies and writes trajectories for `problems` (resuming: those already
    in out_dir's trajectories.jsonl are skipped) -> the summary, also in summary.json."""
    start = time.perf_counter()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accepted = _read_jsonl(out / TRAJECTORIES)
    rejected = _read_jsonl(out / REJECTED)
    done = {r.get("meta", {}).get("problem_id") for r in accepted}
    todo = [p for p in problems if p.problem_id not in done]
    counts: Counter[str] = Counter()
    summary: dict[str, Any] = {}
    batch = self.config.batch_size
    for begin in range(0, max(len(todo), 1), batch):
      self._solve(todo[begin:begin + batch], counts, accepted, rejected)
      sources.write_jsonl(accepted, out / TRAJECTORIES)
      sources.write_jsonl(rejected, out / REJECTED)
      summary = self._summary(problems, todo, counts, accepted, time.perf_counter() - start)
      _write_json(summary, out / SUMMARY)
      logging.info("collaboration: %d/%d problems, %d accepted, %d attempts",
                   min(begin + batch, len(todo)), len(todo), counts["accepted"],
                   counts["attempts"])
    return summary

  def _summary(self, problems: Sequence[TaskProblem], todo: Sequence[TaskProblem],
               counts: Counter[str], accepted: Sequence[Mapping[str, Any]], seconds: float
               ) -> dict[str, Any]:
    attempts, ok = counts["attempts"], counts["accepted"]
    by_reason = {r: counts[f"rejected:{r}"] for r in REASONS if counts[f"rejected:{r}"]}
    firsts = sum(1 for r in accepted[len(accepted) - ok:] if r["meta"]["attempts"] == 1)
    return {
        "task": self.task.name, **self._provenance(),
        "problems": len(problems), "skipped_already_accepted": len(problems) - len(todo),
        "attempted_problems": ok + counts["failed"], "attempts": attempts,
        "accepted": ok, "failed_problems": counts["failed"],
        "rejected": sum(by_reason.values()), "rejected_by_reason": by_reason,
        "acceptance_rate": ok / attempts if attempts else 0.0,
        "first_attempt_acceptance": firsts / max(ok + counts["failed"], 1),
        "problem_yield": ok / max(ok + counts["failed"], 1),
        "accepted_total": len(accepted), "seconds": round(seconds, 3),
        "metrics": self.task.metrics(accepted)}


def build(config: CollaborationConfig, *, teacher: Mapping[str, Any],
          judge: LLMJudge | None = None) -> tuple[Collaboration, list[TaskProblem]]:
  """The collaboration `config` describes, with the teacher backend `teacher` ({"kind", ...},
  rl/backends.py) and an optional judge -> (collaboration, its problems)."""
  task = TASK_TYPES[config.task]
  problems = task.problems(config.num_problems, config.seed, **dict(config.problem_options))
  backend = build_backend(teacher, where="teacher",
                          solutions={p.text: p.solution for p in problems},
                          expert=f"{task.name}-expert")
  retriever = ContextRetriever(task.context(config.context_examples, config.seed),
                               config.context_k)
  verifier = Verifier(task, judge, config.min_judge_score)
  return Collaboration(config, teacher=backend, verifier=verifier, retriever=retriever), problems
