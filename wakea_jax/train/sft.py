"""SFT run: the shared setup with the SFT loss, the grain pipeline, the shared loop, export.

`run(run_config, workdir)` is what `python -m wakea_jax.train` calls for objective "sft".
Running it again on the same workdir resumes from the latest checkpoint. Multi-host: each
process reads its logical data shards (`data/pipeline.py`), `data.batch_size` is global.
"""

from __future__ import annotations

import pathlib

from absl import logging

from wakea_jax.data import pipeline as pipeline_lib
from wakea_jax.objectives.sft import sft_loss_fn
from wakea_jax.train import setup as setup_lib
from wakea_jax.train import supervised


def run(run_config: setup_lib.RunConfig, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains (or resumes) per `run_config` in `workdir`; returns the last logged metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  built = setup_lib.setup(run_config, sft_loss_fn)
  data = run_config.data
  supervised.check_global_batch(built, data.batch_size, "data.batch_size")
  train_iter = pipeline_lib.build_pipeline(pipeline_lib.pipeline_config(data), built.tokenizer)
  eval_batches = []
  if data.eval_sources:
    supervised.check_global_batch(built, data.eval_batch_size, "data.eval_batch_size")
    eval_batches = pipeline_lib.make_eval_batches(
        pipeline_lib.pipeline_config(data, eval_split=True), built.tokenizer,
        num_batches=data.eval_batch_limit)
  state, last = supervised.train_on_batches(built, workdir, train_iter=train_iter,
                                            eval_batches=eval_batches, seq_len=data.seq_len)
  logging.info("data: %s", train_iter.global_stats())  # every process's shards
  setup_lib.export_trained(built, state, workdir / "export")
  return last
