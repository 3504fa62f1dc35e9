"""LUFFY traces (rl/offpolicy.py): schema, errors, keys, the filter, mixing into groups,
and two learner steps end to end."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from wakea_jax import trainers
from wakea_jax.config_files import get_config
from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.rl import offpolicy as op
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl.prompts import load_prompts, to_prompt_record

GOOD = [
    {"prompt": "Solve 2x + 3 = 7.", "trace": "2x = 4, so <answer>2</answer>", "reward": 1.0,
     "answer": "2", "teacher": "big"},
    {"messages": [{"role": "user", "content": "What is 3 * 4?"}],
     "trace": "<answer>12</answer>", "logprobs": [-0.1, 0.0, -2.5]},
    {"prompt": "What is 3 * 4?", "system": "Be brief.", "trace": "<answer>13</answer>"},
    {"prompt": "Solve 2x + 3 = 7.", "trace": "<answer>5</answer>", "reward": 0},
]


def _write(tmp_path, records, name="traces.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_loads_every_field(tmp_path) -> None:
  traces = op.load_traces(str(_write(tmp_path, GOOD)))
  assert [t.text for t in traces] == [r["trace"] for r in GOOD]
  assert traces[0].reward == 1.0 and traces[0].prompt.answer == "2"
  assert traces[0].prompt.meta == {"teacher": "big"}
  assert traces[1].logprobs == (-0.1, 0.0, -2.5) and traces[1].reward is None
  assert traces[3].reward == 0.0 and traces[0].logprobs is None
  assert traces[1].origin.endswith("traces.jsonl:2")
  # Keyed by the conversation without its system messages: records 1 and 2 share a prompt.
  assert traces[1].key == traces[2].key != traces[0].key == traces[3].key


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p"}, "field 'trace' is missing"),
    ({"prompt": "p", "trace": "  "}, "field 'trace' must be a non-empty string"),
    ({"prompt": "p", "trace": 3}, "field 'trace' must be a non-empty string, got int"),
    ({"trace": "t"}, "field 'prompt' (or 'messages') is missing"),
    ({"prompt": "p", "trace": "t", "logprobs": []}, "field 'logprobs' must be a non-empty list"),
    ({"prompt": "p", "trace": "t", "logprobs": "-1"}, "field 'logprobs' must be a non-empty list"),
    ({"prompt": "p", "trace": "t", "logprobs": [-1, 0.3]}, "field 'logprobs[1]' must be a finite"),
    ({"prompt": "p", "trace": "t", "logprobs": [True]}, "field 'logprobs[0]'"),
    ({"prompt": "p", "trace": "t", "logprobs": [-1e999]}, "field 'logprobs[0]'"),
    ({"prompt": "p", "trace": "t", "reward": "1"}, "field 'reward' must be a finite number"),
    ({"prompt": "p", "trace": "t", "reward": float("nan")}, "field 'reward'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a", "continue": True}], "trace": "t"},
     "ends inside an assistant turn"),
    ([1, 2], "a trace record must be a JSON object, got list"),
])
def test_errors_name_file_line_and_field(tmp_path, record, message) -> None:
  path = _write(tmp_path, [GOOD[0], record])
  with pytest.raises(ValueError, match=r"traces\.jsonl:2: .*" + re.escape(message)):
    op.load_traces(str(path))
  # skip_and_count keeps the good record.
  assert len(op.load_traces(str(path), on_error="skip_and_count")) == 1


def test_parquet_and_list_of_specs(tmp_path) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "t.parquet"
  pq.write_table(pa.Table.from_pylist([{"prompt": "q", "trace": "t", "logprobs": [-0.5, -1.0]},
                                       {"prompt": "r", "trace": "u"}]), path)
  traces = op.load_traces([str(path), str(_write(tmp_path, GOOD[:1]))])
  assert [t.logprobs for t in traces] == [(-0.5, -1.0), None, None]
  assert traces[1].origin.endswith("t.parquet[1]")


def test_check_logprobs_names_the_trace(tmp_path) -> None:
  trace = op.load_traces(str(_write(tmp_path, GOOD)))[1]
  op.check_logprobs(trace, 3)
  with pytest.raises(ValueError, match=r"traces\.jsonl:2: field 'logprobs' has 3 entries.*5 tok"):
    op.check_logprobs(trace, 5)


def test_index_finds_and_picks_deterministically(tmp_path) -> None:
  records = [{"prompt": "Solve 2x + 3 = 7.", "trace": f"t{i}"} for i in range(5)]
  index = op.TraceIndex(op.load_traces(str(_write(tmp_path, records + GOOD[1:2]))))
  assert len(index) == 6 and index.num_prompts == 2
  # A run prompt with a system message finds the traces written without it.
  run_prompt = to_prompt_record({"prompt": "Solve 2x + 3 = 7.", "system": "Think."}, "run:1")
  assert run_prompt in index
  assert [t.text for t in index.for_prompt(run_prompt)] == [f"t{i}" for i in range(5)]
  first = index.pick(run_prompt, 2, np.random.default_rng([0, 7]))
  again = index.pick(run_prompt, 2, np.random.default_rng([0, 7]))
  assert [t.text for t in first] == [t.text for t in again] and len({t.text for t in first}) == 2
  assert len(index.pick(run_prompt, 9, np.random.default_rng(0))) == 5
  other = to_prompt_record({"prompt": "unknown"}, "run:2")
  assert other not in index and index.pick(other, 1, np.random.default_rng(0)) == []
  assert index.most_per_prompt == 5 and op.TraceIndex([]).most_per_prompt == 0
  assert op.per_group_shortfall(index, 5) is None
  assert re.search(r"per_group=6 but no prompt has more than 5 traces: each group takes at "
                   r"most 5", op.per_group_shortfall(index, 6))
  assert "than 0 traces" in op.per_group_shortfall(op.TraceIndex([]), 1)


def test_min_trace_reward_uses_given_or_computed_rewards(tmp_path) -> None:
  traces = op.load_traces(str(_write(tmp_path, GOOD)))
  reward = rewards_lib.build_reward({"exact_match": {"weight": 1.0}})
  run_prompts = [to_prompt_record({"prompt": "What is 3 * 4?", "answer": "12"}, "run:1")]
  index, counts = op.select_traces(traces, min_trace_reward=0.5, reward=reward,
                                   prompts=run_prompts)
  # 0: given 1.0, kept; 1: computed (12 == run answer 12), kept; 2: computed (13), dropped;
  # 3: given 0, dropped. Trace 0's prompt is not a run prompt: counted as unmatched.
  assert counts == {"loaded": 4, "kept": 2, "below_min_reward": 2, "unmatched": 1}
  assert [t.text for t in index.for_prompt(run_prompts[0])] == [GOOD[1]["trace"]]
  # Without a threshold nothing is scored or dropped.
  _, counts = op.select_traces(traces)
  assert counts == {"loaded": 4, "kept": 4, "below_min_reward": 0, "unmatched": 0}
  with pytest.raises(ValueError, match=r"traces\.jsonl:2: field 'reward' is missing"):
    op.select_traces(traces, min_trace_reward=0.5)
  with pytest.raises(ValueError, match=r"first at .*traces\.jsonl:2.*needs an answer"):
    op.select_traces(traces, min_trace_reward=0.5, reward=reward)


def _rollouts(prompts, tokenizer, g=3):
  rows = [p for p in prompts for _ in range(g)]
  ids = [p.render(tokenizer) for p in rows]
  n = len(rows)
  return rollout_lib.Rollouts(
      prompts=rows, prompt_ids=ids, completion_ids=[[5, 6]] * n,
      sampler_logprobs=[np.full(2, -1.0, np.float32)] * n,
      tool_mask=[np.zeros(2, np.int32)] * n, num_tool_calls=[0] * n, stop_reason=["stop"] * n,
      texts=["x"] * n, finals=["x"] * n, tool_errors=[0] * n, group_size=g)


def test_mix_traces_replaces_the_last_members_as_rollouts(tmp_path) -> None:
  tokenizer = default_tokenizer()
  prompts = [to_prompt_record({"prompt": "What is 3 * 4?", "answer": "12"}, "run:1"),
             to_prompt_record({"prompt": "unknown", "answer": "1"}, "run:2")]
  trace = op.load_traces(str(_write(tmp_path, [GOOD[1]])))[0]
  ids = op.trace_completion(trace, prompts[0], tokenizer)
  # The completion is the reply as the chat renders it, ending at the end-of-turn id a
  # sampled completion stops at; the prompt's rendering is its prefix.
  assert tokenizer.decode(ids).startswith("<answer>12</answer>") and ids[-1] in chat_stop_ids(
      tokenizer)
  with_lp = dataclasses.replace(trace, logprobs=tuple(-0.25 for _ in ids))
  for t, behaviour in ((with_lp, -0.25), (dataclasses.replace(trace, logprobs=None), 0.0)):
    mixed = op.mix_traces(_rollouts(prompts, tokenizer), op.TraceIndex([t]), per_group=2,
                          rng=np.random.default_rng(0), tokenizer=tokenizer,
                          stop_ids=chat_stop_ids(tokenizer), max_new_tokens=64)
    # One trace for prompt 0 replaces its last member; prompt 1 has none.
    np.testing.assert_array_equal(op.is_trace_row(mixed), [0, 0, 1, 0, 0, 0])
    assert mixed.completion_ids[2] == ids and mixed.completion_ids[1] == [5, 6]
    np.testing.assert_array_equal(mixed.sampler_logprobs[2], np.full(len(ids), behaviour))
    assert mixed.samples()[2].final == "<answer>12</answer>"
  cut = op.mix_traces(_rollouts(prompts, tokenizer), op.TraceIndex([with_lp]), per_group=1,
                      rng=np.random.default_rng(0), tokenizer=tokenizer,
                      stop_ids=chat_stop_ids(tokenizer), max_new_tokens=3)
  assert cut.completion_ids[2] == ids[:3] and len(cut.sampler_logprobs[2]) == 3
  bad = dataclasses.replace(trace, logprobs=(-1.0,))
  with pytest.raises(ValueError, match=r"traces\.jsonl:1: field 'logprobs' has 1 entries"):
    op.mix_traces(_rollouts(prompts, tokenizer), op.TraceIndex([bad]), per_group=1,
                  rng=np.random.default_rng(0), tokenizer=tokenizer,
                  stop_ids=chat_stop_ids(tokenizer), max_new_tokens=64)


def test_shaped_weights_on_the_host() -> None:
  lp = np.log(np.array([[0.5, 0.05, 1e-30]]))
  mask = np.array([[1, 1, 0]])
  np.testing.assert_allclose(op.shaped_weights(lp, np.zeros_like(lp), mask, 0.1),
                             [0.5 / 0.6, 0.05 / 0.15])
  assert op.shaped_weights(lp, np.full_like(lp, -800.0), np.ones_like(mask), 0.1).max() == 1.0


@pytest.mark.parametrize("kwargs, field", [({"per_group": 0}, "per_group"),
                                           ({"gamma": 0.0}, "gamma"),
                                           ({"min_trace_reward": float("inf")},
                                            "min_trace_reward")])
def test_invalid_offpolicy_config(kwargs, field) -> None:
  with pytest.raises(ValueError, match=field):
    op.OffPolicyConfig(**kwargs)


def test_luffy_end_to_end_two_steps(tmp_path) -> None:
  config = get_config("grpo:test", **{"data.eval_sources": ""})
  tokenizer = default_tokenizer()
  records = []
  for i, p in enumerate(load_prompts(config.data.sources)):
    record = {"messages": [dict(m) for m in p.messages], "trace": f"<answer>{p.answer}</answer>"}
    if i % 2:   # half with the trace model's log-probs, one per token of the run tokenizer
      n = len(op.trace_completion(op.to_trace(record, "x"), p, tokenizer))
      record["logprobs"] = [-0.3] * n
    records.append(record)
  records.append({**records[0], "trace": "<answer>wrong</answer>"})   # dropped by the filter
  config.offpolicy.update(traces=str(_write(tmp_path, records)), per_group=1,
                          min_trace_reward=0.5)
  learner = trainers.make_learner(config, tmp_path / "run")
  assert len(learner.traces) == len(records) - 1
  batches = []
  update = learner._update
  learner._update = lambda batch, step: batches.append(batch) or update(batch, step)
  # Two RL steps (rollout, mix, reward, score, update) without the loop's checkpoints.
  last = [learner.step(step) for step in (1, 2)][-1]
  old = []
  for batch in batches:
    off = batch["off_policy"] > 0
    np.testing.assert_array_equal(off, np.arange(len(off)) % 4 == 3)   # each group's last
    old.append(batch["old_logprobs"][off][batch["loss_mask"][off] > 0])
  # A trace's old log-probs are the file's (-0.3) or 0 (pi_phi = 1), never the policy's.
  old = np.concatenate(old)
  from_file, unknown = np.isclose(old, -0.3), old == 0
  assert np.all(from_file | unknown) and from_file.any() and unknown.any()
  # One of the 4 members of every group is a trace; each earns the full reward.
  assert last["offpolicy_fraction"] == 0.25 and last["reward_mean"] >= 0.25
  w = [last[f"importance_weight_{k}"] for k in ("min", "mean", "max")]
  assert 0 < w[0] <= w[1] <= w[2] < 1 and np.isfinite(last["loss"])
  # The sampler-trainer gap is over sampled rows only (a trace's log-probs are not ours).
  assert last["logprob_gap_mean"] < 1e-4
