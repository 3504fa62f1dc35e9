"""Metric writers and the throughput meter.

`create_writer(workdir)` returns a writer that logs every write and records TensorBoard event
files under `workdir/tensorboard` plus a `metrics.jsonl` (one JSON object per step, easy to
read back in tests and notebooks).

The writers follow clu's `MetricWriter` interface (write_scalars / write_texts /
write_hparams / flush / close) but do not subclass it: importing `clu.metric_writers` at all
requires TensorFlow (its package __init__ imports the TF summary writer), which this stack
does not install. TensorBoard events are written through the `tensorboard` package's
event-file writer, which needs neither TensorFlow nor PyTorch.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging


class MetricWriter:
  """clu's MetricWriter interface; the methods a subclass does not support do nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records numeric `scalars` (name -> value) at `step`; a no-op here."""
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Records text summaries (tag -> string) at `step`; a no-op here."""
    pass

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters once; a no-op here."""
    pass

  def flush(self) -> None:
    """Pushes buffered writes to their destination; a no-op here."""
    pass

  def close(self) -> None:
    """Flushes and releases the writer's resources; a no-op here."""
    pass


class LoggingWriter(MetricWriter):
  """One absl log line per write: `[step] loss=2.31, tokens_per_s=1.2e+04`."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs one line: `[step] name=value, ...` with values to 6 significant digits."""
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs one line per text: `[step] tag: text`."""
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Logs the hyperparameters as one dict."""
    logging.info("hparams: %s", dict(hparams))


class MultiWriter(MetricWriter):
  """Fans every call out to each of `writers`, in order."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = writers

  def write_scalars(self, step, scalars):
    """Writes the scalars to every writer."""
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_texts(self, step, texts):
    """Writes the texts to every writer."""
    for w in self.writers:
      w.write_texts(step, texts)

  def write_hparams(self, hparams):
    """Writes the hyperparameters to every writer."""
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    """Flushes every writer."""
    for w in self.writers:
      w.flush()

  def close(self):
    """Closes every writer."""
    for w in self.writers:
      w.close()


class TensorBoardWriter(MetricWriter):
  """Scalars (and texts) as TensorBoard event files, without TensorFlow."""

  def __init__(self, logdir: str | pathlib.Path):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: PLC0415
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = EventFileWriter(str(logdir))

  def _add(self, step: int, values: list[Any]) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                  summary=self._summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one event holding a `simple_value` summary per scalar."""
    self._add(step, [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes one event holding a string tensor per text, tagged for the text plugin."""
    from tensorboard.compat.proto import tensor_pb2  # noqa: PLC0415
    values = []
    for tag, text in texts.items():
      tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text.encode("utf-8")])  # DT_STRING
      metadata = self._summary_pb2.SummaryMetadata(
          plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
      values.append(self._summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata))
    self._add(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the hyperparameters as indented JSON text under tag `hparams` at step 0."""
    self.write_texts(0, {"hparams": json.dumps(dict(hparams), default=str, indent=1)})

  def flush(self) -> None:
    """Flushes pending events to the event file."""
    self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    self._writer.close()


class JsonlWriter(MetricWriter):
  """One JSON line per write_scalars call: {"step": n, name: value, ...}."""

  def __init__(self, path: str | pathlib.Path):
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one JSON line: {"step": n, name: value, ...}, flushed at once."""
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def flush(self) -> None:
    """Flushes the file."""
    self._file.flush()

  def close(self) -> None:
    """Closes the file."""
    self._file.close()


def create_writer(workdir: str | pathlib.Path | None) -> MetricWriter:
  """Logging on every host; TensorBoard and JSONL files on process 0 only."""
  writers: list[MetricWriter] = [LoggingWriter()]
  if workdir is not None and jax.process_index() == 0:
    workdir = pathlib.Path(workdir)
    (workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
    writers += [TensorBoardWriter(workdir / "tensorboard"), JsonlWriter(workdir / "metrics.jsonl")]
  return MultiWriter(writers)


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, float]]:
  """Reads back a `metrics.jsonl` as a list of per-step dicts, skipping blank lines."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Throughput:
  """Steps/s, ETA, tokens/s, TFLOP/s and MFU over each logging interval (TFLOP/s and MFU
  only when FLOPs per token are known)."""

  def __init__(self, *, total_steps: int, flops_per_token: float, peak_flops: float | None,
               start_step: int):
    self.total_steps = total_steps
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._tokens = 0.0

  def add_tokens(self, tokens: float) -> None:
    """Adds `tokens` processed since the last `measure` to the interval's count."""
    self._tokens += tokens

  def measure(self, step: int) -> dict[str, float]:
    """Returns the rates over the interval since the last call and starts a new one.

    Keys: `steps_per_s`, `tokens_per_s`, `eta_s` (seconds left at this interval's pace), plus
    `tflops_per_s` when `flops_per_token` is set and `mfu` (fraction of `peak_flops`) when both are.
    """
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    out = {
        "steps_per_s": steps / elapsed,
        "tokens_per_s": self._tokens / elapsed,
        "eta_s": (self.total_steps - step) * elapsed / max(steps, 1),
    }
    if self.flops_per_token:
      out["tflops_per_s"] = self._tokens * self.flops_per_token / elapsed / 1e12
      if self.peak_flops:
        out["mfu"] = out["tflops_per_s"] * 1e12 / self.peak_flops
    self._last_time, self._last_step, self._tokens = now, step, 0.0
    return out


def to_float(x: Any) -> float:
  """Fetches a (device) scalar to the host as a Python float."""
  return float(np.asarray(jax.device_get(x)))
