"""The off-policy demonstration's pipeline end to end on its `test` variant (a few steps per
stage): SFT, the trace file, one run per arm, the evaluation on every split, the table, the
statistics and the curves. The learning figures come from the full run in the README."""

import json

import pytest

from wakea_jax import offpolicy_demo
from wakea_jax.config_files import get_config
from wakea_jax.data.tasks import arithmetic
from wakea_jax.rl import offpolicy as offpolicy_lib
from wakea_jax.rl import prompts as prompts_lib


@pytest.mark.slow
def test_offpolicy_demo_pipeline(tmp_path, capsys):
  config = get_config("offpolicy_demo:test")
  results = offpolicy_demo.run(config, tmp_path)
  assert [r["arm"] for r in results["rows"]] == (
      ["SFT"] + [offpolicy_demo.LABELS[a] for a in config.arms])
  for row in results["rows"]:
    assert set(config.eval_splits.keys()) <= set(row)
    assert all(0.0 <= row[s] <= 1.0 for s in config.eval_splits.keys())
  # The traces key onto the run's prompts and every one is correct.
  traces = offpolicy_lib.load_traces(str(tmp_path / "traces.jsonl"))
  assert len(traces) == results["traces"] == config.traces.n
  # LUFFY's groups carried traces; on-policy GRPO's did not.
  assert results["stats"]["luffy_seed0"]["offpolicy_fraction"] > 0
  assert results["stats"]["grpo_seed0"].get("offpolicy_fraction", 0.0) == 0
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
  assert "| LUFFY | 0 |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert "| SFT |" in capsys.readouterr().out


def test_unknown_arm_fails_before_training(tmp_path):
  config = get_config("offpolicy_demo:test")
  config.arms = ("grpo", "lufy")
  with pytest.raises(ValueError, match="unknown arm 'lufy'"):
    offpolicy_demo.run(config, tmp_path)
  assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("variant", ["default", "chains", "direct", "inrange", "cued", "leaky"])
def test_traces_key_onto_the_prompts_and_are_right(tmp_path, variant):
  """Each variant's trace file keys onto its RL prompts one for one, every trace ends in the
  prompt's answer, and the hard split is drawn like the prompts (chains of three there)."""
  config = get_config(f"offpolicy_demo:{variant}")
  config.traces.n = 50
  n = offpolicy_demo.write_traces(config, tmp_path / "traces.jsonl")
  traces = offpolicy_lib.load_traces(str(tmp_path / "traces.jsonl"))
  spec = config.grpo.data.sources.replace("n=4000", "n=50")
  prompts = prompts_lib.load_prompts(spec)
  assert n == len(traces) == len(prompts) == 50
  assert [t.key for t in traces] == [offpolicy_lib.trace_key(p) for p in prompts]
  assert all(t.text.endswith(f"The answer is {p.answer}.") for t, p in zip(traces, prompts))
  assert offpolicy_demo.write_traces(config, tmp_path / "traces.jsonl") == 50   # reused
  if variant == "inrange":   # other settings in the same workdir: refused, naming the field
    config.traces.style = "reduce"
    with pytest.raises(ValueError, match=r"traces\.jsonl was written with .*differs in style"):
      offpolicy_demo.write_traces(config, tmp_path / "traces.jsonl")
  operands = 2 if variant == "default" else 3
  assert f"operands={operands}" in config.eval_splits.hard
  assert "seed=777" in config.eval_splits.hard
  if variant != "default":   # the SFT data has seen chains: worked in `chains`, `cued`, `leaky`
    chains = [spec for spec, _ in config.sft.data.sources if "operands=3" in spec]
    assert len(chains) == 1
    assert ("worked=" in chains[0]) == (variant in ("chains", "cued", "leaky"))
  if variant in ("cued", "leaky"):
    # The model is asked for the method on the `cued` split only: same questions and
    # answers as the hard split, each with the cue, which the RL prompts never carry.
    cue = {"role": "system", "content": arithmetic.WORK_CUE}
    hard = prompts_lib.load_prompts(config.eval_splits.hard.replace("n=256", "n=20"))
    asked = prompts_lib.load_prompts(config.eval_splits.cued.replace("n=256", "n=20"))
    assert [p.answer for p in asked] == [p.answer for p in hard]
    assert all(p.messages[0] == cue for p in asked)
    assert not any(cue in p.messages for p in hard + prompts)
    assert f"cue={100 if variant == 'cued' else 95}" in chains[0]
