"""Preference-optimisation run (DPO / IPO / SimPO / ORPO): the shared setup with the
preference loss, pairs held in memory, the shared loop, export.

What differs from SFT (`train/sft.py`):
* data are preference pairs (data/preferences.py), tokenised once;
* for losses with a reference (dpo, ipo) the reference log-probs of every train and eval
  pair are computed once, before the first step, under the initial model (with LoRA: the
  base, the adapters being zero), and attached to each batch by pair index. A resumed run
  recomputes them from the same initial model (same config and seed), so they are identical;
* eval_loss is the preference loss per pair and eval_accuracy the reward accuracy (the
  fraction of pairs whose implicit reward margin is > 0); the train log's `accuracy` too.

`python -m wakea_jax.train --config=configs/dpo.py:test --workdir=...` calls `run`.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from wakea_jax.data import media_pairs
from wakea_jax.data import preferences as pref_lib
from wakea_jax.data.config import pooled_specs
from wakea_jax.models.media import MEDIA_KEYS, bind_media, with_media
from wakea_jax.objectives import dpo
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import multimodal, supervised
from wakea_jax.train import setup as setup_lib

States = nnx.State | tuple[nnx.State, ...]


def pair_logps_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None,
                  rules: mesh_lib.Rules | None = None):
  """Jitted (states, global batch) -> (chosen_logps [b], rejected_logps [b]) under the model
  `nnx.merge(graphdef, *states)` in eval mode.

  With `mesh` the batch's rows are split over it like a training batch (each process puts
  its rows, `preferences.process_rows`) and the log-probs come back replicated, whole on
  every process: what a multi-host run needs. Without, the batch goes in as it is (one
  process).
  """
  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())

  @functools.partial(jax.jit, out_shardings=replicated)
  def logps(states: tuple[nnx.State, ...], batch: dict[str, jax.Array]):
    model = nnx.merge(graphdef, *states)
    model.eval()
    pc, pr, _, _ = dpo.pair_logps(bind_media(model, batch), batch)
    return pc, pr

  def run(params: States, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    states = tuple(params) if isinstance(params, (tuple, list)) else (params,)
    keys = pref_lib.PAIR_FIELDS + tuple(k for k in MEDIA_KEYS if k in batch)
    if mesh is None:
      fields = {f: jnp.asarray(batch[f]) for f in keys}
    else:
      rows = pref_lib.process_rows({f: batch[f] for f in keys},
                                   jax.process_index(), jax.process_count())
      fields = mesh_lib.shard_batch(rows, mesh, rules)
    pc, pr = logps(states, fields)
    return np.asarray(pc), np.asarray(pr)

  return run


def compute_reference_logps(graphdef: nnx.GraphDef, params: States,
                            batches: Iterable[Mapping[str, np.ndarray]],
                            mesh: jax.sharding.Mesh | None = None,
                            rules: mesh_lib.Rules | None = None
                            ) -> dict[int, tuple[float, float]]:
  """{pair_index: (ref_chosen_logp, ref_rejected_logp)} under `params` (one state or a
  tuple, e.g. (params, frozen)) over global `batches`; padding rows (pair_mask 0) are
  skipped. `mesh`: see `pair_logps_fn` (needed on several processes)."""
  logps = pair_logps_fn(graphdef, mesh, rules)
  out: dict[int, tuple[float, float]] = {}
  for batch in batches:
    pc, pr = logps(params, batch)
    mask = np.asarray(batch.get("pair_mask", np.ones(len(pc))))
    for i, c, r, m in zip(np.asarray(batch["pair_index"]), pc, pr, mask):
      if m > 0:
        out[int(i)] = (float(c), float(r))
  return out


def attach_reference(dataset: pref_lib.PreferenceDataset, graphdef: nnx.GraphDef,
                     params: States, batch_size: int, mesh: jax.sharding.Mesh | None = None,
                     rules: mesh_lib.Rules | None = None) -> None:
  """Computes the dataset's reference log-probs and stores them per pair index (on every
  process, each holding every pair)."""
  ref = compute_reference_logps(graphdef, params, dataset.batches(batch_size), mesh, rules)
  dataset.set_reference(np.array([ref[i][0] for i in range(len(dataset))]),
                        np.array([ref[i][1] for i in range(len(dataset))]))


def preference_accuracy(graphdef: nnx.GraphDef, params: States,
                        batches: Iterable[Mapping[str, np.ndarray]]) -> float:
  """Fraction of pairs where the policy's summed log-prob of chosen exceeds rejected's.

  No reference; padding rows (pair_mask 0) are not counted.
  """
  logps = pair_logps_fn(graphdef)
  correct = total = 0.0
  for batch in batches:
    pc, pr = logps(params, batch)
    won = (pc > pr).astype(np.float32)
    mask = np.asarray(batch.get("pair_mask", np.ones_like(won)), np.float32)
    correct += float(np.sum(won * mask))
    total += float(np.sum(mask))
  return correct / total if total else float("nan")


def run(run_config: setup_lib.RunConfig, preference: dpo.PreferenceConfig,
        workdir: str | pathlib.Path, media: multimodal.MediaModelConfig | None = None
        ) -> dict[str, float]:
  """Trains (or resumes) per the configs in `workdir`; returns the last logged metrics.
  With `media` (config.media enabled) the model is a vision- or audio-language model and
  the pairs carry images or audio (data/media_pairs.py)."""
  media = media if media is not None and media.enabled else None
  data = run_config.data
  if not data.sources:
    raise ValueError("config.data.sources is empty: give preference pair files, e.g. "
                     "--config.data.sources='(\"pairs.jsonl\",)' (records with prompt/messages, "
                     "chosen and rejected; see wakea_jax/data/preferences.py)")
  if data.batch_size % run_config.grad_accum:
    raise ValueError(f"data.batch_size={data.batch_size} pairs must be divisible by "
                     f"grad_accum={run_config.grad_accum} (micro-batches split pairs, not rows)")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  built = setup_lib.setup(run_config, with_media(dpo.make_loss_fn(preference)),
                          build=multimodal.builder(media) if media is not None else None)
  inputs = None
  if media is not None:
    inputs = multimodal.media_config(
        nnx.merge(built.graphdef, built.state.params, built.state.frozen), media)
  supervised.check_global_batch(built, data.batch_size, "data.batch_size")
  if data.eval_sources or preference.needs_reference:
    supervised.check_global_batch(built, data.eval_batch_size, "data.eval_batch_size")

  def load(field: str) -> pref_lib.PreferenceDataset:
    specs = pooled_specs(getattr(data, field), field)
    if inputs is not None:
      return media_pairs.load_dataset(specs, built.tokenizer, inputs, slots=media.max_media,
                                      seq_len=data.seq_len, overlength=data.overlength,
                                      on_error=data.on_error)
    return pref_lib.load_dataset(specs, built.tokenizer, seq_len=data.seq_len,
                                 overlength=data.overlength, on_error=data.on_error)

  train_set = load("sources")
  eval_set = load("eval_sources") if data.eval_sources else None
  logging.info("preference pairs: train %s%s", train_set.stats,
               f", eval {eval_set.stats}" if eval_set is not None else "")

  checkpoints = setup_lib.checkpoint_manager(
      run_config, workdir, best_metric="eval_loss" if eval_set is not None else None)
  # The step resume will use (a damaged newest step is skipped), not merely the newest.
  latest = checkpoints.latest_verified_step(include_unverifiable=True)
  finished = latest is not None and latest >= run_config.train.steps
  if preference.needs_reference and not finished:
    # The reference is the initial model: computed before any step, also on resume (the
    # initial model is rebuilt from the same config and seed).
    reference = (built.state.params, built.state.frozen)
    for dataset in (train_set, eval_set):
      if dataset is not None:
        attach_reference(dataset, built.graphdef, reference, data.eval_batch_size,
                         built.mesh, built.rules)

  train_iter = pref_lib.PreferenceIterator(train_set, data.batch_size, seed=data.seed)
  # Every process holds every pair; each feeds its rows of the global eval batches.
  eval_batches = ([pref_lib.process_rows(b, jax.process_index(), jax.process_count())
                   for b in eval_set.batches(data.eval_batch_size,
                                             num_batches=data.eval_batch_limit)]
                  if eval_set is not None else [])
  # The loop counts the tokens of input_ids, which hold both sides of every pair.
  state, last = supervised.train_on_batches(built, workdir, train_iter=train_iter,
                                            eval_batches=eval_batches, seq_len=data.seq_len,
                                            checkpoints=checkpoints)
  logging.info("data: %s", train_iter.stats)
  if inputs is not None:
    multimodal.export(built, state, inputs, workdir / "export")
  else:
    setup_lib.export_trained(built, state, workdir / "export")
  return last
