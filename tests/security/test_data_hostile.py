"""Data that can never produce a batch stops training with an error, instead of looping."""

import json

import numpy as np
import pytest

from wakea_jax.data import pipeline
from wakea_jax.data import tokenizer as tokenizer_lib

ARITH = "task:arithmetic?n=50&seed=0"


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.default_tokenizer()


def _config(sources, seq_len, overlength="drop", **kwargs):
  return pipeline.PipelineConfig(sources=tuple(pipeline.SourceSpec(s, w) for s, w in sources),
                                 seq_len=seq_len, batch_size=2, overlength=overlength,
                                 prefetch_batches=0, **kwargs)


def test_a_source_whose_every_example_is_too_long_stops_with_its_counts(tok):
  it = pipeline.build_pipeline(_config([(ARITH, 1.0)], seq_len=8), tok)
  with pytest.raises(ValueError, match=r"data source task:arithmetic\?n=50&seed=0: no usable "
                                       r"example at seq_len=8 .*'dropped_overlength': 100"):
    next(it)


def test_truncation_that_leaves_no_target_stops_too(tmp_path, tok):
  path = tmp_path / "long_prompts.jsonl"
  with open(path, "w") as f:
    for i in range(20):
      f.write(json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                       {"role": "assistant", "content": str(i)}]}) + "\n")
  it = pipeline.build_pipeline(_config([(str(path), 1.0)], seq_len=32, overlength="truncate"),
                               tok)
  with pytest.raises(ValueError, match=rf"{path}: no usable example .*'dropped_no_target': 40"):
    next(it)


def test_one_hopeless_source_in_a_mixture_is_named(tmp_path, tok):
  path = tmp_path / "long.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "x " * 300},
                                           {"role": "assistant", "content": "y"}]}) + "\n")
  it = pipeline.build_pipeline(
      _config([("task:smalltalk?n=50&seed=0", 1.0), (str(path), 1.0)], seq_len=64), tok)
  with pytest.raises(ValueError, match=rf"{path}: no usable example"):
    for _ in range(50):
      next(it)


def test_a_source_with_a_few_usable_examples_keeps_training(tmp_path, tok):
  path = tmp_path / "mostly_long.jsonl"
  lines = [json.dumps({"messages": [{"role": "user", "content": "x " * 300},
                                    {"role": "assistant", "content": "y"}]})] * 29
  lines.insert(17, json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}))
  path.write_text("\n".join(lines) + "\n")
  it = pipeline.build_pipeline(_config([(str(path), 1.0)], seq_len=64), tok)
  for _ in range(20):  # 40 usable rows: many passes over the file
    batch = next(it)
    assert np.asarray(batch["loss_mask"]).sum() > 0


def test_the_train_binary_config_can_skip_and_count_malformed_records(tmp_path, tok):
  """config.data.on_error reaches the pipeline (the train binary could not set it)."""
  from wakea_jax import config_lib
  from wakea_jax.config_files import get_config
  path = tmp_path / "mixed.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}]})
  path.write_text("\n".join([good, '{"messages": [{"role": "user", "contnet": "x"}]}', good])
                  + "\n")
  config = get_config("sft:test", **{"data.on_error": "skip_and_count",
                                     "data.sources": ((str(path), 1.0),)})
  data = config_lib.run_config(config).data
  assert data.on_error == "skip_and_count"
  it = pipeline.build_pipeline(pipeline.pipeline_config(data), tok)
  next(it)
  with pytest.raises(ValueError, match="data.on_error must be one of"):
    config_lib.run_config(get_config("sft:test", **{"data.on_error": "ignore"}))
