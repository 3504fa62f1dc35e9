"""plots.py (metrics.jsonl -> learning-curve PNG) and the `python -m wakea_jax.plot` binary."""

import json
import subprocess
import sys

import pytest

from wakea_jax import plot, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path, objective, steps=30, eval_every=10):
  """A metrics.jsonl as the trainers write it: train rows every step, eval rows apart."""
  path.mkdir(parents=True)
  lines = []
  for step in range(1, steps + 1):
    row = {"step": step, "loss": 1.0 / step, "grad_norm": 0.5}
    if objective != "sft":
      row.update(reward_mean=step / steps, approx_kl=1e-4 * step, response_length=10.0 + step)
    lines.append(row)
    if step % eval_every == 0:
      key = "eval_loss" if objective == "sft" else "eval_greedy_accuracy"
      lines.append({"step": step, key: step / (2 * steps)})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return path


def _is_png(path):
  data = path.read_bytes()
  return len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def test_plot_runs_draws_the_panels_with_data(tmp_path):
  grpo = _write_run(tmp_path / "grpo", "grpo")
  sft = _write_run(tmp_path / "sft", "sft")
  out = tmp_path / "figs" / "curves.png"
  panels = plots.plot_runs({"GRPO seed 0": grpo, "SFT": sft / "metrics.jsonl"}, out,
                           title="t", smooth=5)
  assert _is_png(out)
  # Every default panel has data in one run or the other; in order.
  assert [title for title, _ in panels] == [title for title, _ in plots.DEFAULT_PANELS]
  assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left behind
  # Records work as well as paths; a panel no run has data for is left out.
  only = plots.plot_runs({"SFT": plots.read_metrics(sft)}, out)
  assert [title for title, _ in only] == ["loss", "held-out loss"]
  assert _is_png(out)
  with pytest.raises(ValueError, match="no run has any of the keys"):
    plots.plot_runs({"SFT": sft}, out, panels=[("x", ("nope",))])


def test_series_is_per_key_sorted_and_a_relogged_step_keeps_the_later_value():
  records = [{"step": 2, "loss": 2.0}, {"step": 1, "loss": 1.0, "eval_loss": 5.0},
             {"step": 2, "loss": 3.0}, {"step": 3, "eval_loss": float("nan")}]
  assert plots.series(records, "loss") == ([1, 2], [1.0, 3.0])
  steps, values = plots.series(records, "eval_loss")
  assert steps == [1, 3] and values[0] == 5.0
  assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_read_metrics_names_a_malformed_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss": \n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON line"):
    plots.read_metrics(path)
  path.write_text('{"step": 1}\n{"loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: no numeric \"step\""):
    plots.read_metrics(tmp_path)
  path.write_text('{"step": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"):
    plots.read_metrics(path)


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
  assert plots.read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  # With its newline written, a bad last line is corruption, not an interrupted write.
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 3, "lo\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2:"):
    plots.read_metrics(path)


def test_parse_runs(tmp_path):
  run = _write_run(tmp_path / "grpo_seed0", "grpo")
  assert plot.parse_runs([f"GRPO seed 0={run}", str(run / "metrics.jsonl")]) == {
      "GRPO seed 0": run, "grpo_seed0": run / "metrics.jsonl"}
  with pytest.raises(ValueError, match="expected LABEL=PATH"):
    plot.parse_runs([f"={run}"])
  with pytest.raises(FileNotFoundError, match="no .*metrics.jsonl"):
    plot.parse_runs([f"x={tmp_path}"])


def test_plot_binary(tmp_path):
  a, b = _write_run(tmp_path / "a", "grpo"), _write_run(tmp_path / "b", "ppo")
  out = tmp_path / "curves.png"
  result = subprocess.run([sys.executable, "-m", "wakea_jax.plot", f"--runs=A={a},B={b}",
                           f"--out={out}", "--smooth=3"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert _is_png(out)
  assert result.stdout.strip() == (f"{out}: reward, held-out accuracy, KL, "
                                   "completion length (tokens), loss")
