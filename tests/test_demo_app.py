"""demo_app.StageTimes: a demonstration's re-run reports the time its stages took to train,
not the time it took to find them finished."""

import json
import time

from wakea_jax import demo_app


def test_a_skipped_stage_keeps_the_time_of_the_run_that_trained_it(tmp_path):
  run_dir = tmp_path / "sft"

  def stage(train: bool) -> str:   # a trainer: appends to metrics.jsonl only when it trains
    if train:
      run_dir.mkdir(exist_ok=True)
      with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1}\n')
      time.sleep(0.05)
    return "out"

  first = demo_app.StageTimes(tmp_path)
  assert first.run("sft", stage, True, run_dir=run_dir) == "out"
  first.run("eval", time.sleep, 0.02)
  assert first.seconds["sft"] >= 0.05 and first.seconds["eval"] >= 0.02
  (tmp_path / "results.json").write_text(json.dumps({"timing_s": first.seconds}))

  again = demo_app.StageTimes(tmp_path)
  again.run("sft", stage, False, run_dir=run_dir)   # found finished: the old time stays
  again.run("eval", lambda: None)                     # no run directory: timed anew
  assert again.seconds["sft"] == first.seconds["sft"]
  assert again.seconds["eval"] < 0.02
  resumed = demo_app.StageTimes(tmp_path)             # trained further: its own time
  resumed.run("sft", stage, True, run_dir=run_dir)
  assert resumed.seconds["sft"] != first.seconds["sft"]
  (tmp_path / "results.json").write_text("not json")  # unreadable: every stage timed anew
  assert demo_app.StageTimes(tmp_path).previous == {}
