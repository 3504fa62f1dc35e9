"""Metric writers and analytic FLOPs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.train import flops, metrics


def test_writer_produces_tensorboard_events_and_jsonl(tmp_path):
  writer = metrics.create_writer(tmp_path)
  writer.write_scalars(1, {"loss": 2.5})
  writer.write_scalars(2, {"loss": 2.0, "eval_loss": 2.2})
  writer.close()
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "eval_loss": 2.2}]
  (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  scalars = [(e.step, v.tag, v.simple_value) for e in LegacyEventFileLoader(str(event_file)).Load()
             for v in e.summary.value]
  assert scalars == [(1, "loss", 2.5), (2, "loss", 2.0), (2, "eval_loss", pytest.approx(2.2))]


def test_throughput_fields():
  tp = metrics.Throughput(total_steps=10, flops_per_token=1e6, peak_flops=1e9, start_step=0)
  tp.add_tokens(1000)
  out = tp.measure(2)
  assert set(out) == {"steps_per_s", "tokens_per_s", "tflops_per_s", "eta_s", "mfu"}
  assert out["eta_s"] > 0


@pytest.mark.parametrize("preset", ["tiny", "bench56m"])
def test_forward_flops_match_xla_cost_analysis(preset):
  """The analytic count agrees with what XLA counts for the compiled forward."""
  cfg = get_preset(preset)
  seq = 128
  graphdef, state = nnx.split(transformer.abstract_model(cfg))
  ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  compiled = jax.jit(lambda s, x: transformer.apply(graphdef, s, x)).lower(state, ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla = cost["flops"] / seq
  ours = flops.forward_flops_per_token(cfg, seq)
  assert abs(ours - xla) / xla < 0.05, (ours, xla)
