"""Off-policy trace records (rl/offpolicy.py): schema, errors, keys, picking and the filter."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from wakea_jax.rl import offpolicy as op
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl.prompts import to_prompt_record

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
