"""grain pipeline: packing invariants, packed == unpacked loss, mixture, determinism, resume."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.data import pipeline as pipeline_lib
from wakea_jax.data import sources as sources_lib
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.objectives.sft import sft_loss

TOK = default_tokenizer()


def _config(**kw):
  values = dict(sources=(pipeline_lib.SourceSpec("task:arithmetic?n=64&seed=0", 1.0),
                         pipeline_lib.SourceSpec("task:smalltalk?n=64&seed=0", 1.0)),
                seq_len=160, batch_size=4, seed=0)
  values.update(kw)
  return pipeline_lib.PipelineConfig(**values)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_format_and_packing_invariants():
  batches = _take(pipeline_lib.build_pipeline(_config(), TOK), 5)
  for batch in batches:
    assert set(batch) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, 160) for v in batch.values())
    seg, pos = batch["segment_ids"], batch["positions"]
    assert (batch["loss_mask"][seg == 0] == 0).all()
    for row in range(4):
      ids = seg[row]
      assert ((np.diff(ids) >= 0) | (ids[1:] == 0)).all()  # segments contiguous, padding last
      for s in set(ids[ids > 0]):
        where = np.where(ids == s)[0]
        assert (np.diff(where) == 1).all()
        np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))
      assert (seg[row].max() > 1) or seg[row].min() == 0
  # targets are input_ids shifted by one within each example
  row = batches[0]
  first = row["segment_ids"][0] == 1
  np.testing.assert_array_equal(row["input_ids"][0][first][1:], row["targets"][0][first][:-1])


def test_packed_loss_equals_unpacked_loss():
  """The acceptance test: packing changes nothing about the loss."""
  cfg = get_preset("tiny", vocab_size=1024, max_seq_len=512)
  model = transformer.create_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  apply = jax.jit(transformer.apply, static_argnums=0)
  packed = next(pipeline_lib.build_pipeline(_config(shuffle=False), TOK))
  logits = apply(graphdef, state, packed["input_ids"], positions=packed["positions"],
                 segment_ids=packed["segment_ids"])
  total, sums = sft_loss(logits, packed["targets"], packed["loss_mask"])
  packed_loss = float(total / sums["tokens"])

  # The same examples, each alone in its own row, padded.
  examples = []
  for b in range(packed["input_ids"].shape[0]):
    seg = packed["segment_ids"][b]
    for s in sorted(set(seg[seg > 0])):
      keep = seg == s
      examples.append({k: packed[k][b][keep] for k in ("input_ids", "targets", "loss_mask")})
  assert len(examples) > packed["input_ids"].shape[0]  # really packed
  nll, tokens = 0.0, 0.0
  for ex in examples:
    n = len(ex["input_ids"])
    out = apply(graphdef, state, jnp.asarray(ex["input_ids"][None]))
    total, sums = sft_loss(out, jnp.asarray(ex["targets"][None]),
                           jnp.asarray(ex["loss_mask"][None]))
    nll += float(total)
    tokens += float(sums["tokens"])
    assert n <= 160
  np.testing.assert_allclose(packed_loss, nll / tokens, atol=1e-5)


def test_unpacked_rows_are_single_padded_examples():
  batch = next(pipeline_lib.build_pipeline(_config(packing=False), TOK))
  assert set(np.unique(batch["segment_ids"])) <= {0, 1}
  assert (batch["segment_ids"][:, 0] == 1).all()


def test_deterministic_for_a_seed_and_different_across_seeds():
  a = _take(pipeline_lib.build_pipeline(_config(), TOK), 3)
  b = _take(pipeline_lib.build_pipeline(_config(), TOK), 3)
  c = _take(pipeline_lib.build_pipeline(_config(seed=1), TOK), 3)
  assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_exact_resume_from_iterator_state():
  it = pipeline_lib.build_pipeline(_config(), TOK)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  resumed = pipeline_lib.build_pipeline(_config(), TOK)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 4)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_mixture_follows_weights():
  sources = (pipeline_lib.SourceSpec("task:arithmetic?n=50", 3.0),
             pipeline_lib.SourceSpec("task:smalltalk?n=50", 1.0))
  cfg = _config(sources=sources, packing=False, seq_len=200, batch_size=8)
  counts = collections.Counter()
  for batch in _take(pipeline_lib.build_pipeline(cfg, TOK), 25):
    for row in batch["input_ids"]:
      text = TOK.decode(row.tolist())
      counts["arithmetic" if "calculator" in text else "smalltalk"] += 1
  share = counts["arithmetic"] / sum(counts.values())
  assert 0.65 < share < 0.85, counts


def test_overlength_policies_are_counted():
  truncating = pipeline_lib.build_pipeline(_config(seq_len=60, packing=False), TOK)
  _take(truncating, 2)
  assert truncating.stats.counts["task:arithmetic?n=64&seed=0"]["truncated"] > 0
  dropping = pipeline_lib.build_pipeline(_config(seq_len=60, packing=False, overlength="drop"),
                                         TOK)
  batch = next(dropping)
  counts = dropping.stats.counts["task:arithmetic?n=64&seed=0"]
  assert counts["dropped_overlength"] > 0 and counts["truncated"] == 0
  for row in batch["input_ids"]:
    assert "calculator" not in TOK.decode(row.tolist())  # every arithmetic example is too long


def test_eval_batches_are_fixed_and_padded():
  cfg = _config(sources=(pipeline_lib.SourceSpec("task:arithmetic?n=9&seed=3"),))
  a = pipeline_lib.make_eval_batches(cfg, TOK, num_batches=10)
  b = pipeline_lib.make_eval_batches(cfg, TOK, num_batches=10)
  assert len(a) == len(b) >= 1 and all(x["input_ids"].shape == (4, 160) for x in a)
  assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


@pytest.mark.parametrize("kw,match", [
    ({"sources": ()}, "empty"), ({"overlength": "cut"}, "overlength"),
    ({"sources": (pipeline_lib.SourceSpec("task:arithmetic", 0.0),)}, "weight"),
])
def test_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    _config(**kw)


def test_unknown_task_is_reported():
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    sources_lib.load_source("task:nope?n=3")
