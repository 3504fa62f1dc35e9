"""ExGRPO's replay in the learner (arXiv 2510.02245 §3.2): which of a step's groups are replayed
prompts, how a stored trajectory joins its prompt's group, and what the buffer observes.

A step of `rl.prompts_per_step` groups takes floor(groups * rho) of them from the buffer
(`replay_count`; rl/experience.py decides, after its delayed start) and the rest fresh from
the prompt iterator, so a run samples exactly as many rollouts as plain GRPO: a replayed
prompt takes the place of a fresh one. A replayed prompt is rolled out on-policy like any
other (G members), then `mix_replays` replaces one member by the prompt's stored
successful trajectory of lowest entropy, as the paper's mixed group (§3.2: "one trajectory from
the buffer, K - 1 fresh rollouts"). The replayed row is off-policy: stop reason
REPLAY_STOP_REASON, its `sampler_logprobs` the stored behaviour log-probs (the learner's old
log-probs for it), and LUFFY's shaped weight f(pi_theta / pi_old) = x / (x + gamma)
(objectives/offpolicy.py, `offpolicy.gamma`) in place of the clip, as ExGRPO's policy
shaping. It is rewarded again by the run's reward with the others, so the advantages are
over the mixed group. The entropy is the current policy's (§3.1, `experience.entropy`
"current": `candidate_rollouts` lays every stored trajectory of the replayed prompts out for
one forward pass, `lowest_entropy` picks), or each trajectory's stored one ("behaviour").

Hybrid (LUFFY and ExGRPO at once): LUFFY's traces take the last `offpolicy.per_group` members
of a group whose prompt has traces; the replayed trajectory takes the last member that is not
a trace, so no row is replaced twice (the config check keeps a sampled member in every group).

`observe` feeds the buffer with the sampled (on-policy) rows of every group of the step,
replayed prompts included, without the trace and replay rows: a prompt's correctness rate and
its stored trajectories are the current policy's. Their behaviour log-probs are the sampler's
(the distribution that drew them; the trainer's to within the logged gap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.parallel import multihost
from wakea_jax.rl import experience as experience_lib
from wakea_jax.rl import offpolicy as offpolicy_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl.prompts import PromptRecord

# A replayed row's stop reason: tells it from sampled rows and from LUFFY's traces
# (offpolicy.TRACE_STOP_REASON); it travels with the rows through select / concat.
REPLAY_STOP_REASON = "replay"
# Stop reasons of the rows another policy produced: LUFFY's traces, replayed trajectories.
OFF_POLICY = (offpolicy_lib.TRACE_STOP_REASON, REPLAY_STOP_REASON)


def prompt_index(records: Iterable[PromptRecord]) -> dict[str, PromptRecord]:
  """experience.prompt_key -> record, for turning the buffer's keys back into prompts (the
  first record wins when two have the same messages)."""
  index: dict[str, PromptRecord] = {}
  for record in records:
    index.setdefault(experience_lib.prompt_key(record), record)
  return index


def replay_count(buffer: experience_lib.ExperienceBuffer, groups: int, multiple: int = 1) -> int:
  """How many of this process's `groups` are replayed this step: the buffer's
  floor(groups * rho) (0 before replay starts), the smallest over the processes (every
  process draws the same number of fresh prompts), rounded down to a multiple of `multiple`
  (the prompt shards per process, so the fresh prompts still split evenly over them)."""
  local = buffer.replay_groups(groups)
  count = -int(multihost.global_max(-local))
  return count - count % max(multiple, 1)


def tool_calls(tool_mask: np.ndarray) -> int:
  """The number of tool results in a completion: runs of tool-output tokens."""
  mask = np.asarray(tool_mask, np.int32)
  return int(np.sum(np.diff(np.concatenate([[0], mask])) == 1))


def mix_replays(rollouts: rollout_lib.Rollouts, replays: Sequence[experience_lib.Replay],
                first_group: int, *, tokenizer: Tokenizer, stop_ids: Sequence[int],
                max_new_tokens: int) -> rollout_lib.Rollouts:
  """Groups first_group .. first_group + len(replays) - 1 are the replayed prompts, in
  `replays`' order: in each, the last member that is not off-policy already (a LUFFY trace)
  becomes the stored trajectory, with stop reason REPLAY_STOP_REASON and its behaviour
  log-probs as `sampler_logprobs` (cut at `max_new_tokens`, as a sampled completion is)."""
  g = rollouts.group_size
  fields = {f.name: list(getattr(rollouts, f.name)) for f in dataclasses.fields(rollouts)
            if f.name not in ("group_size", "media")}   # media runs mix nothing in (learner)
  for i, replay in enumerate(replays):
    first = (first_group + i) * g
    if experience_lib.prompt_key(rollouts.prompts[first]) != replay.key:
      raise ValueError(f"mix_replays: group {first_group + i} is not the replayed prompt "
                       f"{replay.key}")
    free = [r for r in range(first, first + g) if fields["stop_reason"][r] not in OFF_POLICY]
    if not free:
      raise ValueError(f"mix_replays: every member of group {first_group + i} is off-policy "
                       "already; keep offpolicy.per_group below rollout.group_size")
    row, t = free[-1], replay.trajectory
    ids = t.completion_ids[:max_new_tokens].tolist()
    tool_mask = (1 - t.completion_mask[:max_new_tokens]).astype(np.int32)
    fields["completion_ids"][row] = ids
    fields["sampler_logprobs"][row] = t.behaviour_logprobs[:max_new_tokens].copy()
    fields["tool_mask"][row] = tool_mask
    fields["num_tool_calls"][row] = tool_calls(tool_mask)
    fields["tool_errors"][row] = 0
    fields["stop_reason"][row] = REPLAY_STOP_REASON
    fields["texts"][row] = tokenizer.decode(ids)
    fields["finals"][row] = tokenizer.decode(rollout_lib.final_turn(ids, tool_mask, stop_ids))
  return rollout_lib.Rollouts(**fields, group_size=g)


def candidate_rollouts(rollouts: rollout_lib.Rollouts,
                       buffer: experience_lib.ExperienceBuffer,
                       replays: Sequence[experience_lib.Replay], first_group: int, *,
                       max_new_tokens: int, rows_multiple: int = 1) -> rollout_lib.Rollouts:
  """Every stored trajectory of each replayed prompt as a row after its prompt (group i:
  `max_per_prompt` rows, the last candidate repeated as padding; cut at `max_new_tokens`), in
  groups of max_per_prompt, plus whole padding groups up to a multiple of `rows_multiple`
  rows: the batch `lowest_entropy` scores under the current policy."""
  per = buffer.config.max_per_prompt
  g = rollouts.group_size
  rows: list[tuple[PromptRecord, list[int], experience_lib.Trajectory]] = []
  for i, replay in enumerate(replays):
    first = (first_group + i) * g
    stored = buffer.trajectories(replay.key)
    for j in range(per):
      rows.append((rollouts.prompts[first], rollouts.prompt_ids[first],
                   stored[min(j, len(stored) - 1)]))
  while rows and len(rows) % max(rows_multiple, 1):
    rows.extend(rows[-per:])
  ids = [t.completion_ids[:max_new_tokens].tolist() for _, _, t in rows]
  return rollout_lib.Rollouts(
      prompts=[p for p, _, _ in rows], prompt_ids=[list(p) for _, p, _ in rows],
      completion_ids=ids, sampler_logprobs=[np.zeros(len(x), np.float32) for x in ids],
      tool_mask=[(1 - t.completion_mask[:max_new_tokens]).astype(np.int32) for _, _, t in rows],
      num_tool_calls=[0] * len(rows), stop_reason=["stop"] * len(rows),
      texts=[""] * len(rows), finals=[""] * len(rows), tool_errors=[0] * len(rows),
      group_size=per)


def lowest_entropy(buffer: experience_lib.ExperienceBuffer,
                   replays: Sequence[experience_lib.Replay], entropies: np.ndarray
                   ) -> tuple[list[experience_lib.Replay], list[float]]:
  """`replays` with each prompt's trajectory of lowest entropy under the current policy
  (arXiv 2510.02245 §3.1), from `entropies` [rows] of `candidate_rollouts`' rows; and the
  chosen ones' entropies."""
  per = buffer.config.max_per_prompt
  out, chosen = [], []
  for i, replay in enumerate(replays):
    stored = buffer.trajectories(replay.key)
    mine = np.asarray(entropies[i * per:i * per + len(stored)], np.float64)
    best = int(np.argmin(mine))
    out.append(dataclasses.replace(replay, trajectory=stored[best]))
    chosen.append(float(mine[best]))
  return out, chosen


def is_replay_row(rollouts: rollout_lib.Rollouts) -> np.ndarray:
  """bool [rows]: which rows are replayed trajectories."""
  return np.array([r == REPLAY_STOP_REASON for r in rollouts.stop_reason], bool)


def is_offpolicy_row(rollouts: rollout_lib.Rollouts) -> np.ndarray:
  """bool [rows]: which rows another policy produced (LUFFY's traces and replays)."""
  return np.array([r in OFF_POLICY for r in rollouts.stop_reason], bool)


def observe(buffer: experience_lib.ExperienceBuffer, rollouts: rollout_lib.Rollouts,
            rewards: np.ndarray, correct: np.ndarray, off_policy: np.ndarray, *, step: int
            ) -> None:
  """Feeds the buffer one step's groups, each with its sampled rows only (`off_policy` rows,
  traces and replays, are another policy's); a group with none is skipped."""
  keys, groups, flags = experience_lib.groups_from_rollouts(rollouts, rewards, correct,
                                                            step=step)
  g = rollouts.group_size
  kept: tuple[list, list, list] = ([], [], [])
  for i, (key, group, right) in enumerate(zip(keys, groups, flags)):
    sampled = [j for j in range(g) if not off_policy[i * g + j]]
    if sampled:
      kept[0].append(key)
      kept[1].append([group[j] for j in sampled])
      kept[2].append([right[j] for j in sampled])
  buffer.observe(*kept)


def metrics(buffer: experience_lib.ExperienceBuffer, rollouts: rollout_lib.Rollouts
            ) -> dict[str, float]:
  """experience/*: the buffer's counts summed over the processes (each keeps its prompts'),
  and the replay ratio of the step's batch: replayed groups / groups."""
  out = dict(buffer.metrics())
  for name in ("prompts_low", "prompts_medium", "prompts_high", "trajectories", "retired"):
    out[f"experience/{name}"] = float(multihost.global_sum(out[f"experience/{name}"]))
  replayed = float(multihost.global_sum(float(is_replay_row(rollouts).sum())))
  groups = float(multihost.global_sum(float(rollouts.num_groups)))
  out["experience/replay_ratio"] = replayed / max(groups, 1.0)
  return out


def replay_prompts(replays: Sequence[experience_lib.Replay], index: Mapping[str, PromptRecord]
                   ) -> list[PromptRecord]:
  """The prompt records of `replays` (their keys must be the run's prompts)."""
  missing = [r.key for r in replays if r.key not in index]
  if missing:
    raise ValueError(f"the experience buffer holds prompt {missing[0]} that is not among this "
                     "run's prompts (data.sources changed since the checkpoint?)")
  return [index[r.key] for r in replays]

