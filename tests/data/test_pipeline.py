"""grain pipeline: packing invariants, packed == unpacked loss, mixture, determinism, resume."""

import collections
import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.data import chat
from wakea_jax.data import pipeline as pipeline_lib
from wakea_jax.data import sources as sources_lib
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset

TOK = default_tokenizer()
ARITH = "task:arithmetic?n=64&seed=0"
TALK = "task:smalltalk?n=64&seed=0"
SpecS = pipeline_lib.SourceSpec


def _config(**kw):
  values = dict(sources=(SpecS(ARITH, 1.0), SpecS(TALK, 1.0)), seq_len=160, batch_size=4, seed=0)
  values.update(kw)
  return pipeline_lib.PipelineConfig(**values)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(batches):
  """Every example in the batches as a tuple (input_ids, targets, loss_mask), in order."""
  out = []
  for batch in batches:
    for row in range(batch["input_ids"].shape[0]):
      seg = batch["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        keep = seg == s
        out.append(tuple(tuple(batch[k][row][keep].tolist())
                         for k in ("input_ids", "targets", "loss_mask")))
  return out


def _expected(spec, seq_len=None):
  """The examples of a source, rendered directly (next-token split, truncated if asked)."""
  out = []
  for record in sources_lib.load_source(spec).records:
    rendered = chat.render(record["messages"], TOK)
    ids, mask = rendered.input_ids.tolist(), rendered.loss_mask.tolist()
    if seq_len is not None:
      ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    out.append((tuple(ids[:-1]), tuple(ids[1:]), tuple(float(m) for m in mask[1:])))
  return out


def test_batch_format_and_packing_invariants():
  batches = _take(pipeline_lib.build_pipeline(_config(), TOK), 5)
  for batch in batches:
    assert sorted(batch) == sorted(pipeline_lib.BATCH_KEYS)
    for key, value in batch.items():
      assert value.shape == (4, 160)
      assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    seg, pos = batch["segment_ids"], batch["positions"]
    pad = seg == 0
    assert (batch["loss_mask"][pad] == 0).all() and (batch["input_ids"][pad] == 0).all()
    assert (pos[pad] == 0).all()
    for row in range(4):
      ids = seg[row][seg[row] > 0]
      # Segments are 1, 2, ..., k, each one contiguous run, and padding only at the end.
      assert (np.diff(ids) >= 0).all() and ids[0] == 1 and set(ids) == set(range(1, ids[-1] + 1))
      assert not pad[row][:len(ids)].any()
      for s in set(ids):
        where = np.where(seg[row] == s)[0]
        np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))
        # Within an example, targets are the inputs shifted by one.
        np.testing.assert_array_equal(batch["input_ids"][row, where][1:],
                                      batch["targets"][row, where][:-1])
  assert max(b["segment_ids"].max() for b in batches) > 1  # really packed


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_appears_exactly_once_per_epoch(packing):
  cfg = _config(sources=(SpecS(ARITH),), packing=packing, num_epochs=1, drop_remainder=False)
  got = _segments(pipeline_lib.build_pipeline(cfg, TOK))
  expected = _expected(ARITH)
  assert sorted(got) == sorted(expected) and got != expected  # all of them, shuffled
  two = _segments(pipeline_lib.build_pipeline(
      _config(sources=(SpecS(ARITH),), packing=packing, num_epochs=2, drop_remainder=False), TOK))
  assert sorted(two) == sorted(expected * 2)
  assert two[:64] != two[64:]  # each epoch shuffled differently (packing may reorder a little)


def test_packed_loss_equals_unpacked_loss():
  """The acceptance test: packing changes nothing about the loss (token-weighted mean NLL)."""
  model = transformer.create_model(get_preset("tiny", vocab_size=1024), seed=0)
  graphdef, state = nnx.split(model)
  apply = jax.jit(transformer.apply, static_argnums=0)

  def nll_sum_and_tokens(logits, targets, loss_mask):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return float(-jnp.sum(picked * loss_mask)), float(np.sum(loss_mask))

  packed = next(pipeline_lib.build_pipeline(_config(), TOK))
  logits = apply(graphdef, state, jnp.asarray(packed["input_ids"]),
                 positions=jnp.asarray(packed["positions"]),
                 segment_ids=jnp.asarray(packed["segment_ids"]))
  nll, tokens = nll_sum_and_tokens(logits, packed["targets"], packed["loss_mask"])
  packed_loss = nll / tokens

  # The same examples from the unpacked pipeline: one per row, padded, and run with no
  # segment ids or positions at all, as a model would see each example alone.
  examples = _segments([packed])
  assert len(examples) > packed["input_ids"].shape[0]
  unpacked = next(pipeline_lib.build_pipeline(
      _config(packing=False, batch_size=len(examples)), TOK))
  assert sorted(_segments([unpacked])) == sorted(examples)
  logits = apply(graphdef, state, jnp.asarray(unpacked["input_ids"]))
  nll, tokens = nll_sum_and_tokens(logits, unpacked["targets"], unpacked["loss_mask"])
  np.testing.assert_allclose(packed_loss, nll / tokens, rtol=0, atol=1e-5)
  assert np.isfinite(packed_loss) and packed_loss > 1.0  # a random model: a real loss


def test_unpacked_rows_are_single_padded_examples():
  batch = next(pipeline_lib.build_pipeline(_config(packing=False), TOK))
  assert set(np.unique(batch["segment_ids"])) <= {0, 1}
  assert (batch["segment_ids"][:, 0] == 1).all()
  lengths = batch["segment_ids"].sum(axis=1)
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))


def test_deterministic_for_a_seed_and_different_across_seeds():
  a = _take(pipeline_lib.build_pipeline(_config(), TOK), 3)
  b = _take(pipeline_lib.build_pipeline(_config(), TOK), 3)
  c = _take(pipeline_lib.build_pipeline(_config(seed=1), TOK), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", [True, False])
def test_exact_resume_from_iterator_state(packing):
  it = pipeline_lib.build_pipeline(_config(packing=packing), TOK)
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  stats = it.stats
  expected = _take(it, 4)
  resumed = pipeline_lib.build_pipeline(_config(packing=packing), TOK)
  resumed.set_state(state)
  assert resumed.stats == stats  # the counters resume with the data
  for x, y in zip(expected, _take(resumed, 4)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(first[0]["input_ids"], expected[0]["input_ids"])
  with pytest.raises(ValueError, match="not a data iterator state"):
    resumed.set_state({"next_index": 3})


def test_resume_with_another_config_warns(caplog):
  state = pipeline_lib.build_pipeline(_config(), TOK).get_state()
  other = pipeline_lib.build_pipeline(_config(seed=5), TOK)
  with caplog.at_level(logging.WARNING):
    other.set_state(state)
  assert "different data config" in caplog.text


def test_mixture_follows_weights():
  sources = (SpecS("task:arithmetic?n=50", 3.0), SpecS("task:smalltalk?n=50", 1.0))
  cfg = _config(sources=sources, packing=False, batch_size=8)
  counts = collections.Counter()
  for batch in _take(pipeline_lib.build_pipeline(cfg, TOK), 50):  # 400 examples, 6+ epochs
    for row in batch["input_ids"]:
      counts["arithmetic" if "calculator" in TOK.decode(row.tolist()) else "smalltalk"] += 1
  assert abs(counts["arithmetic"] / 400 - 0.75) < 0.02, counts


def test_overlength_policies_are_counted_exactly(caplog):
  seq_len = 130  # arithmetic dialogues are 100-160 tokens: some fit, some do not
  expected = _expected(ARITH)
  too_long = sum(len(x[0]) > seq_len for x in expected)
  assert 0 < too_long < len(expected)
  cfg = _config(sources=(SpecS(ARITH),), seq_len=seq_len, num_epochs=1, drop_remainder=False)

  with caplog.at_level(logging.WARNING):
    truncating = pipeline_lib.build_pipeline(cfg, TOK)
    got = _segments(truncating)
  assert sorted(got) == sorted(_expected(ARITH, seq_len))
  counts = truncating.stats.counts[ARITH]
  assert counts == {"examples": 64, "truncated": too_long, "dropped_overlength": 0,
                    "dropped_no_target": 0, "skipped_malformed": 0}
  assert f"{ARITH}[" in caplog.text and "truncated" in caplog.text  # names the example

  dropping = pipeline_lib.build_pipeline(
      _config(sources=(SpecS(ARITH),), seq_len=seq_len, num_epochs=1, drop_remainder=False,
              overlength="drop"), TOK)
  got = _segments(dropping)
  assert sorted(got) == sorted(x for x in expected if len(x[0]) <= seq_len)
  assert dropping.stats.counts[ARITH]["dropped_overlength"] == too_long
  assert dropping.stats.as_metrics()["data/dropped_overlength"] == too_long


def test_examples_without_a_target_left_are_dropped_and_counted(tmp_path):
  long_prompt = {"prompt": "word " * 200, "response": "ok"}
  sources_lib.write_jsonl([long_prompt, {"prompt": "hi", "response": "hello"}],
                          tmp_path / "d.jsonl")
  path = str(tmp_path / "d.jsonl")
  it = pipeline_lib.build_pipeline(
      _config(sources=(SpecS(path),), seq_len=64, num_epochs=1, drop_remainder=False), TOK)
  assert len(_segments(it)) == 1
  assert it.stats.counts[path]["dropped_no_target"] == 1
  assert it.stats.counts[path]["truncated"] == 0  # counted once, as the reason it was lost


def test_skipped_records_show_in_the_stats(tmp_path):
  path = tmp_path / "s.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 1}\n')
  it = pipeline_lib.build_pipeline(
      _config(sources=(SpecS(str(path)),), on_error="skip_and_count"), TOK)
  next(it)
  assert it.stats.counts[str(path)]["skipped_malformed"] == 1
  with pytest.raises(ValueError, match=r"s.jsonl:2: field 'prompt' must be a string"):
    pipeline_lib.build_pipeline(_config(sources=(SpecS(str(path)),)), TOK)


def test_processes_read_disjoint_shards():
  shards = []
  for index in range(2):
    cfg = _config(sources=(SpecS(ARITH),), num_epochs=1, drop_remainder=False)
    shards.append(_segments(pipeline_lib.build_pipeline(cfg, TOK, process_index=index,
                                                        process_count=2)))
  assert len(shards[0]) == len(shards[1]) == 32
  assert sorted(shards[0] + shards[1]) == sorted(_expected(ARITH))


def test_global_batches_do_not_depend_on_the_process_count():
  # shards=4: one process builds all four shards, each of two processes two of them, each
  # of four processes one; the global batch (process rows in process order) is the same.
  cfg = _config(batch_size=8, shards=4)
  one = _take(pipeline_lib.build_pipeline(cfg, TOK), 3)
  assert all(b["input_ids"].shape == (8, 160) for b in one)
  for count in (2, 4):
    parts = [_take(pipeline_lib.build_pipeline(cfg, TOK, process_index=p, process_count=count),
                   3) for p in range(count)]
    for step, batch in enumerate(one):
      for key in pipeline_lib.BATCH_KEYS:
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts]), batch[key])


def test_resume_on_another_process_count():
  # A state saved by one process (all four shards) resumes as process 1 of 2 with exactly
  # that process's rows of the batches the uninterrupted run yields.
  cfg = _config(batch_size=8, shards=4)
  it = pipeline_lib.build_pipeline(cfg, TOK)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  assert sorted(state["shards"]) == ["0", "1", "2", "3"] and state["num_shards"] == 4
  expected = _take(it, 2)
  resumed = pipeline_lib.build_pipeline(cfg, TOK, process_index=1, process_count=2)
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed)["input_ids"], batch["input_ids"][4:])
  with pytest.raises(ValueError, match=r"saved with 4 logical data shards, this run has 2"):
    pipeline_lib.build_pipeline(_config(batch_size=8, shards=2), TOK).set_state(state)


def test_version_one_state_still_restores():
  it = pipeline_lib.build_pipeline(_config(), TOK)
  _take(it, 1)
  state = it.get_state()
  old = {"version": 1, "fingerprint": state["fingerprint"], "grain": state["shards"]["0"]}
  expected = next(it)
  resumed = pipeline_lib.build_pipeline(_config(), TOK)
  resumed.set_state(old)
  np.testing.assert_array_equal(next(resumed)["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("kw,count,match", [
    ({"batch_size": 6, "shards": 4}, 1, r"data.batch_size=6 \(the global batch\) must be "
                                        r"divisible by the 4 logical data shards"),
    ({"shards": 3}, 2, r"data.shards=3 logical data shards cannot be split evenly over 2"),
    ({"batch_size": 3}, 2, r"data.batch_size=3 .* 2 logical data shards .*process count"),
])
def test_shard_layout_errors(kw, count, match):
  with pytest.raises(ValueError, match=match):
    pipeline_lib.build_pipeline(_config(**kw), TOK, process_index=0, process_count=count)


def test_eval_batches_are_fixed_complete_and_padded():
  cfg = _config(sources=(SpecS("task:arithmetic?n=9&seed=3"), SpecS("task:smalltalk?n=5")))
  a = pipeline_lib.make_eval_batches(cfg, TOK)
  b = pipeline_lib.make_eval_batches(cfg, TOK)
  assert all(x["input_ids"].shape == (4, 160) for x in a)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  expected = _expected("task:arithmetic?n=9&seed=3") + _expected("task:smalltalk?n=5")
  assert sorted(_segments(a)) == sorted(expected)  # every example once, weights ignored
  unpacked = pipeline_lib.make_eval_batches(dataclasses.replace(cfg, packing=False), TOK)
  assert _segments(unpacked) == expected  # in order: sources concatenated, not shuffled
  assert len(unpacked) == 4 and unpacked[-1]["segment_ids"][2:].sum() == 0  # 14 = 4+4+4+2
  assert len(pipeline_lib.make_eval_batches(cfg, TOK, num_batches=1)) == 1


def test_eval_batches_match_across_processes():
  # 9 examples over 4 processes: the shards differ in size, the batch counts must not; and
  # the processes' rows together are the one-process batches of the same shards.
  cfg = _config(sources=(SpecS("task:arithmetic?n=9"),), packing=False, batch_size=8,
                shards=4)
  parts = [pipeline_lib.make_eval_batches(cfg, TOK, process_index=i, process_count=4)
           for i in range(4)]
  assert {len(p) for p in parts} == {2}
  one = pipeline_lib.make_eval_batches(cfg, TOK)
  for step, batch in enumerate(one):
    np.testing.assert_array_equal(
        np.concatenate([p[step]["segment_ids"] for p in parts]), batch["segment_ids"])
  assert sorted(_segments(one)) == sorted(_expected("task:arithmetic?n=9"))


@pytest.mark.parametrize("kw,match", [
    ({"sources": ()}, "empty"), ({"overlength": "cut"}, "overlength"),
    ({"sources": (SpecS(ARITH, 0.0),)}, "weight"), ({"num_epochs": 0}, "num_epochs"),
    ({"on_error": "ignore"}, "on_error"), ({"sources": (ARITH,)}, "SourceSpec"),
    ({"shards": -1}, "data.shards"),
])
def test_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    _config(**kw)
