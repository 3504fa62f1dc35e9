"""SRL: Supervised Reinforcement Learning (arXiv 2510.25992), step-wise rewards from experts.

An expert trajectory (data/trajectories.py) of N steps becomes N + 1 step-wise prompts: prompt
k is the problem plus the expert's first k-1 actions, and its reference is the expert's k-th
action; prompt N + 1 asks for the final answer, whose reference is "<answer>ANSWER</answer>".
The model writes a private monologue in <think>...</think> and then its action; the reward is
the sequence similarity between its action and the expert's (difflib's ratio 2M/T, as the
paper defines it), -1 when the output does not parse. The update is the GRPO family's
(rl/learner.py, config.objective="srl") with dynamic sampling that drops groups whose reward
std is below `rl.dynamic_sampling_min_std`, and an optional KL to the initial policy
(`loss.kl_beta`).

Where the expert's previous steps go. They open the *assistant* turn, as the "Step i: action"
lines of the canonical solution text (data/trajectories.py; no monologue, as in the paper),
and the model continues that turn (chat.py's `"continue": true`):

    <|im_start|>system ...<|im_end|>
    <|im_start|>user
    Solve 3x + 1 = 10.<|im_end|>
    <|im_start|>assistant
    Step 1: 3x = 9
                                   <- the model writes "<think>...</think>\\nStep 2: x = 3"

So an SRL-trained model solving a problem from scratch (prompt 1 is exactly the whole-problem
prompt) does at every step what it was trained to do, and RLVR on whole solutions continues
the same text.

`prefix_reasoning=True` (config.srl) also puts each earlier step's monologue, when the
expert wrote one, before its line ("<think>r1</think>\nStep 1: a1\n..."): the text a model
fine-tuned on the expert's whole solutions writes itself. Without it such a model meets, in
every step prompt after the first, a prefix unlike its own solutions, and SRL spends its
updates on that difference: on the equations task (README, the SRL demonstration) the
held-out step similarity rose from 0.59 to 0.90 in 60 steps while whole-problem accuracy
fell from 13.7% to 5.9%. The paper's form (actions only) stays the default.

Why the final answer is an extra step: RLVR's outcome reward reads <answer>...</answer>. If
SRL stopped at the last expert action, an SRL-only model would never have been rewarded for
closing its solution, and the RLVR stage after it would start with almost no reward. With the
answer step it learns to write the <answer> line once the steps are done (`answer_step=False`
leaves it out). That step compares the answers inside the tags, not the whole lines: the 17
characters of "<answer></answer>" would otherwise dominate the ratio ("<answer>5</answer>" vs
"<answer>3</answer>" scores 0.94, a right answer 1.0), so a group with right and wrong
answers has a spread (std ~0.03) below the dynamic-sampling threshold and is dropped. An
action without an <answer> block is compared whole with the whole answer line (`score`).

The action (`parse_action`), exactly: the output may start (after whitespace) with a think
block, which must then be closed by </think>; the action is the first non-blank line after
it (after the first </think>), with a leading "Step k:" label (any k, any case) removed and
surrounding whitespace stripped. The rollouts stop at the end of that line
(`step_complete`, a sampler stop: checked between decode chunks, the row cut right after
the line); whatever follows it is not scored, and not trained on
either: the learner masks the tokens after the action line's "\\n" out of the loss
(`first_step_tokens`). A think block that is never closed, no action line, an empty action,
or think markup inside the action line (text before the monologue): the output does not
parse (reward -1, on the whole output).

Why the monologue is optional by default, where the paper requires it: in the canonical
solution text think blocks are optional, and no solution has one before its <answer> line
(tasks/equations.py's SFT targets included), so a model fine-tuned on them answers the last
step prompt with "<answer>X</answer>" directly; requiring a think block would score that
correct answer -1. `require_think=True` (a reward option: {"srl_similarity":
{"require_think": True}}) is the paper's strict form.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from wakea_jax.data import sources
from wakea_jax.data import trajectories as traj_lib
from wakea_jax.data.tokenizer import THINK_END, THINK_START, Tokenizer
from wakea_jax.parallel import multihost
from wakea_jax.rl.prompts import PromptRecord
from wakea_jax.rl.samples import Sample

SYSTEM = ("Solve the problem step by step. Before each step, think privately inside "
          "<think>...</think>, then write the step on its own line as 'Step k: ...'. After the "
          "last step, write the final answer as <answer>...</answer>.")
STEP_PROMPTS_FILE = "srl_step_prompts.jsonl"
EVAL_STEP_PROMPTS_FILE = "srl_eval_step_prompts.jsonl"
UNPARSED = -1.0   # the reward of an output that does not parse (arXiv 2510.25992)


@dataclasses.dataclass(frozen=True)
class SRLConfig:
  """config.srl: where an SRL run's step-wise prompts come from."""

  trajectories: str | tuple[str, ...] = ""         # data/trajectories.py spec(s)
  eval_trajectories: str | tuple[str, ...] = ""    # held out; empty: no evaluation
  system: str = SYSTEM                             # "" for no system message
  answer_step: bool = True                         # the <answer> line as a last step
  prefix_reasoning: bool = False                   # the expert's monologues in the prefix

  def __post_init__(self) -> None:
    for name in ("trajectories", "eval_trajectories"):
      value = getattr(self, name)
      specs = (value,) if isinstance(value, str) else tuple(value)
      if not all(isinstance(s, str) for s in specs):
        raise ValueError(f"srl.{name} must be a trajectory spec or a list of them, got "
                         f"{value!r}")
      object.__setattr__(self, name, tuple(s for s in specs if s))
    if not self.trajectories:
      raise ValueError("srl.trajectories is empty: give the expert trajectories (a JSONL / "
                       "JSON / Parquet file, a datasets directory or task:equations?n=..)")


def _head(problem: str, system: str) -> list[dict[str, Any]]:
  return ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": problem}]


def step_prefix(steps: Sequence[traj_lib.Step], *, reasoning: bool = False) -> str:
  """The assistant turn's opening for the step after `steps`: "Step 1: a1\\nStep 2: a2\\n";
  with `reasoning`, each step's think block before it, as `trajectories.solution_text`
  writes a whole solution (both render `trajectories.step_lines`)."""
  return "".join(line + "\n" for line in traj_lib.step_lines(steps, reasoning=reasoning))


def step_prompts(trajectories: Sequence[traj_lib.Trajectory], *, system: str = SYSTEM,
                 answer_step: bool = True, prefix_reasoning: bool = False
                 ) -> list[PromptRecord]:
  """N (+1 with `answer_step`) step-wise prompts per trajectory of N steps (module docstring);
  meta: {"trajectory": index in `trajectories`, "step": k (1-based), "num_steps": N}. With
  `prefix_reasoning`, the expert's earlier steps carry their monologues (module docstring)."""
  out = []
  for t, trajectory in enumerate(trajectories):
    actions = [s.action for s in trajectory.steps]
    targets = actions + ([traj_lib.answer_line(trajectory.answer_text)] if answer_step else [])
    for k, target in enumerate(targets, 1):
      messages = _head(trajectory.problem, system)
      if k > 1:
        messages.append({"role": "assistant",
                         "content": step_prefix(trajectory.steps[:k - 1],
                                                reasoning=prefix_reasoning),
                         "continue": True})
      out.append(PromptRecord(
          messages=tuple(messages), answer=target,
          meta={"trajectory": t, "step": k, "num_steps": len(actions)},
          origin=f"{trajectory.origin or f'trajectories[{t}]'} step {k}"))
  return out


def problem_prompts(trajectories: Sequence[traj_lib.Trajectory], *, system: str = SYSTEM
                    ) -> list[PromptRecord]:
  """One whole-problem prompt per trajectory, its reference the final answer (for RLVR and
  whole-problem accuracy); the same text as each trajectory's first step prompt."""
  return [PromptRecord(messages=tuple(_head(t.problem, system)), answer=t.answer,
                       meta={"trajectory": i}, origin=t.origin or f"trajectories[{i}]")
          for i, t in enumerate(trajectories)]


def prompt_json(prompt: PromptRecord) -> dict[str, Any]:
  """A prompt as a record of rl/prompts.py's schema (meta as top-level fields)."""
  reserved = {"prompt", "messages", "system", "answer"} & set(prompt.meta)
  if reserved:
    raise ValueError(f"{prompt.origin}: meta field(s) {sorted(reserved)} collide with prompt "
                     "record fields")
  return {"prompt": [dict(m) for m in prompt.messages], "answer": prompt.answer,
          **prompt.meta}


def write_step_prompts(config: SRLConfig, workdir: str | os.PathLike[str], *,
                       on_error: str = "raise") -> tuple[pathlib.Path, pathlib.Path | None]:
  """Expands `config`'s trajectories into step prompt files in `workdir` (train, and held-out
  when `eval_trajectories` is set), atomically; their paths. Rewritten on every start: the
  same trajectories give the same file, so a resumed run sees the prompts it saw (a file
  that changed is logged as a warning). With
  several processes, process 0 writes and the others wait for it: the workdir is shared, as
  the checkpoints already need."""
  workdir = pathlib.Path(workdir)
  paths: list[pathlib.Path | None] = []
  for specs, name in ((config.trajectories, STEP_PROMPTS_FILE),
                      (config.eval_trajectories, EVAL_STEP_PROMPTS_FILE)):
    if not specs:
      paths.append(None)
      continue
    if jax.process_index() == 0:
      prompts = step_prompts(traj_lib.load_trajectories(specs, on_error=on_error),
                             system=config.system, answer_step=config.answer_step,
                             prefix_reasoning=config.prefix_reasoning)
      path = workdir / name
      before = path.read_text(encoding="utf-8") if path.exists() else None
      sources.write_jsonl([prompt_json(p) for p in prompts], path)
      logging.info("srl: %d step prompts from %s -> %s", len(prompts), list(specs), path)
      if before is not None and before != path.read_text(encoding="utf-8"):
        # A resumed learner keeps its position in the prompt order, which now walks other
        # prompts: say so rather than resume silently on different data.
        logging.warning("srl: %s changed since the last start (config.srl or the trajectory "
                        "files differ); a resumed run continues on the new step prompts", path)
    paths.append(workdir / name)
  multihost.all_true(True)   # a barrier: the files exist before any process reads them
  train, held_out = paths
  assert train is not None  # SRLConfig requires trajectories
  return train, held_out


def _action_line(text: str) -> tuple[bool, int, int] | None:
  """(whether the output opens with a think block, the offset where the first non-blank line
  after it starts, the offset of the "\\n" that ends that line or -1 while it does not end),
  or None when the opening think block is not closed (module docstring)."""
  pos = len(text) - len(text.lstrip())
  think = text.startswith(THINK_START, pos)
  if think:
    close = text.find(THINK_END, pos + len(THINK_START))
    if close < 0:
      return None
    pos = close + len(THINK_END)
  while True:   # the first non-blank line
    newline = text.find("\n", pos)
    if newline < 0 or text[pos:newline].strip():
      return think, pos, newline
    pos = newline + 1


def _first_step(text: str, require_think: bool) -> tuple[str, int | None] | None:
  """(the action, the offset in `text` just past the "\\n" that ends its line, None when the
  line does not end), or None when `text` does not parse (module docstring)."""
  found = _action_line(text)
  if found is None or (require_think and not found[0]):
    return None
  _, pos, newline = found
  line = text[pos:] if newline < 0 else text[pos:newline]
  action = traj_lib.STEP_LABEL.sub("", line.strip()).strip()
  if not action or THINK_START in action or THINK_END in action:
    return None
  return action, None if newline < 0 else newline + 1


def step_complete(text: str) -> bool:
  """Whether an output holds its whole first step: after a closed think block, if it opens
  with one, a non-blank line ended by "\\n". True stays true as the text grows, so it is a
  sampler stop (sampler.StopRule): the SRL rollouts stop there, since nothing after that
  line is scored (`parse_action`) or trained (`first_step_tokens`). It holds for lines that
  do not parse too: their reward is -1 whatever follows."""
  found = _action_line(text)
  return found is not None and found[2] >= 0


def parse_action(text: str, *, require_think: bool = False) -> str | None:
  """The action of one step's output (module docstring), or None when it does not parse;
  `require_think`: an output without a leading think block does not parse either."""
  step = _first_step(text, require_think)
  return None if step is None else step[0]


def first_step_tokens(completion_ids: Sequence[int], tokenizer: Tokenizer, *,
                      require_think: bool = False) -> int | None:
  """How many of a completion's tokens write its first step (monologue, action line and the
  line's "\\n"); None when the output does not parse or the action line never ends.

  The reward scores only that step, so the learner trains only on those tokens (objective
  "srl"): the rest (the model going on with later steps) would add gradient noise that no
  reward term measures. Found by binary search over decoded prefixes: a few decodes a row.
  """
  ids = list(completion_ids)
  text = tokenizer.decode(ids)
  step = _first_step(text, require_think)
  if step is None or step[1] is None:
    return None
  first = text[:step[1]]
  low, high = 1, len(ids)
  while low < high:   # the shortest prefix whose text holds the whole first step
    mid = (low + high) // 2
    # startswith, not a length test: a prefix ending inside a multi-byte character decodes
    # to replacement characters and can be longer than the text it stands for.
    if tokenizer.decode(ids[:mid]).startswith(first):
      high = mid
    else:
      low = mid + 1
  return low


def mask_after_first_step(loss_mask: np.ndarray, prompt_ids: Sequence[Sequence[int]],
                          completion_ids: Sequence[Sequence[int]], tokenizer: Tokenizer, *,
                          require_think: bool = False) -> np.ndarray:
  """Zeroes, in place, each row's loss mask (rl/rollout.py `to_batch` layout: position t
  predicts token t + 1, so completion token j is at len(prompt) - 1 + j) after the tokens of
  its first step (`first_step_tokens`); rows whose output does not parse, or whose action
  line never ends, keep their mask. `require_think` must be the reward's, so that an output
  the reward scores -1 is pushed down whole. Returns `loss_mask`."""
  for r, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
    count = first_step_tokens(completion, tokenizer, require_think=require_think)
    if count is not None:
      loss_mask[r, len(prompt) - 1 + count:] = 0
  return loss_mask


def reward_requires_think(reward_spec: Mapping[str, Any]) -> bool:
  """Whether a rewards.build_reward spec scores with `srl_similarity(require_think=True)`."""
  return any((options or {}).get("type", name) == "srl_similarity"
             and bool((options or {}).get("require_think", False))
             for name, options in reward_spec.items())


def similarity(predicted: str, expert: str) -> float:
  """difflib's ratio 2M/T: M characters in matching blocks, T the two lengths summed."""
  return difflib.SequenceMatcher(None, predicted, expert).ratio()


_ANSWER_BLOCK = re.compile(re.escape(traj_lib.ANSWER_START) + "(.*?)"
                           + re.escape(traj_lib.ANSWER_END))


def score(text: str, expert: Any, *, require_think: bool = False) -> float:
  """The SRL reward of one output: similarity of its action to the expert's, or -1. When the
  expert's action is an answer line, the answer inside the model's first <answer> block
  against the expert's answer (module docstring); without such a block, the lines whole."""
  action = parse_action(text, require_think=require_think)
  if action is None:
    return UNPARSED
  expert = str(expert)
  answer = _ANSWER_BLOCK.fullmatch(expert.strip())
  given = _ANSWER_BLOCK.search(action) if answer is not None else None
  if answer is not None and given is not None:
    return similarity(given.group(1).strip(), answer.group(1).strip())
  return similarity(action, expert)


# Outputs the reward could not score (anything raised): counted, scored as unparsed.
FAILURES: collections.Counter[str] = collections.Counter()


def srl_similarity_reward(*, require_think: bool = False
                          ) -> Callable[[Sequence[Sample]], np.ndarray]:
  """The SRL reward over the last assistant turn (`Sample.final`), the reference being the
  expert's action (`Sample.answer`). It never raises on model output; unlike rewards._guarded
  (which gives 0) an output it cannot score gets -1, since 0 would rank it above one that
  merely failed to parse."""
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      if s.answer is None:
        raise ValueError(f"sample {i}: the 'srl_similarity' reward needs the expert's action "
                         "as the answer, got None")
      try:
        out[i] = score(s.final, s.answer, require_think=require_think)
      except Exception as e:  # noqa: BLE001  (model output must never crash the batch)
        if not FAILURES["srl_similarity"]:
          logging.warning("srl_similarity failed on a completion (scored -1): %s: %s",
                          type(e).__name__, str(e)[:200])
        FAILURES["srl_similarity"] += 1
        out[i] = UNPARSED
    return out
  return reward

