"""Orbax checkpoints of the train state and the data-iterator state, with exact resume.

Each step directory holds three items:
  state  the TrainState (params, frozen state, optimizer state, step, RNG), sharded arrays;
  data   the input pipeline's iterator state (JSON), so a resumed run sees exactly the
         batches it would have seen;
  meta   JSON: the step's metrics and whatever the caller records (config, model config).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
(even SIGKILL mid-save) never leaves a directory that `latest_step` would pick up; leftover
temporaries are removed on the next start. Saves are asynchronous: the arrays are copied to
host memory, training continues, and the write finishes in the background.

Retention: the latest `keep` checkpoints, plus the best one by `best_metric` when given.

Integrity. Orbax's atomic rename guards against a crash mid-save, not against damage after
it: a file removed or truncated later makes orbax fail, and a flipped bit in array data
restores silently with wrong values. So once a step's save has finished, process 0 records
every file of the step directory (relative path, size, sha256) in a manifest,
`<directory>/manifests/<step>.json`, written atomically (temporary file, then os.replace).
The manifest is a sidecar, outside the step directory, so orbax never sees a file it did
not write, and a step directory is never modified after orbax finalised it. It is written
by a background thread as soon as the save finishes (and at the latest by the next `save`,
`wait_until_finished` or `close`); pruning a step deletes its manifest too.

A step *verifies* when every file of its manifest is present with the recorded size and
sha256 and the directory holds no file the manifest does not list. Restore policy:
  * `restore(step=None)` restores the newest step that verifies and that orbax can read;
    every step passed over is logged as a warning with the reason (missing file X, size or
    sha256 of X differs, unexpected file X, no manifest, orbax error).
  * A step without a manifest (saved by the code before manifests existed, or whose save
    finished just before a crash) cannot be verified. Verified steps are preferred; when
    none restores, the newest restorable step without a manifest is used, with a warning
    that it cannot be verified. A step whose manifest exists but does not match is never
    restored.
  * When no step qualifies, restore raises `CheckpointIntegrityError` listing each step
    and why; an explicit `step=` that does not verify raises it naming the file(s) (one
    without a manifest restores with a warning).
  * `latest_step()` stays the newest step on disk (orbax's view); `latest_verified_step()`
    is the newest step that verifies. The train loop resumes from the step
    `restore_with_step` picks and names `latest_verified_step()` as the last good one.
  * Saving a step that already exists but is damaged replaces it (a run that fell back to
    an older step and trains past the damaged one again).

Multi-host (`jax.distributed`, every process runs the same calls in the same order; the
checkpoint directory is on a filesystem all processes share). Orbax writes the sharded
arrays (each process its own shards) and, from process 0, the JSON items; `save`,
`restore`, pruning (orbax's delete holds a barrier) and every step check are collective
calls. Manifests are written and checked by process 0 alone, and its verdict on a step is
sent to the others (`_agreed_check`), so all processes restore, keep, replace or skip the
same step; the others never read a manifest that process 0 may be writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from wakea_jax.parallel import multihost

MANIFEST_DIR = "manifests"
_MANIFEST_FORMAT = 1
_BLOCK = 1 << 20  # files are hashed in 1 MiB blocks
_MAX_LISTED = 5  # problems named per step in a message

# Verdicts of a step's check against its manifest.
_VERIFIED, _NO_MANIFEST, _DAMAGED = "verified", "no manifest", "damaged"


class CheckpointIntegrityError(ValueError):
  """A checkpoint step does not match its manifest, or no checkpoint step can be restored."""


def _hash_file(path: pathlib.Path) -> tuple[int, str]:
  """(size in bytes, sha256 hex digest) of `path`, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    while block := f.read(_BLOCK):
      digest.update(block)
      size += len(block)
  return size, digest.hexdigest()


def _list_files(step_dir: pathlib.Path) -> list[str]:
  """Every file under `step_dir` as a sorted relative POSIX path."""
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      out.append((pathlib.Path(root) / name).relative_to(step_dir).as_posix())
  return sorted(out)


def step_manifest(step_dir: str | pathlib.Path) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} for every file of a step directory."""
  step_dir = pathlib.Path(step_dir)
  files = {}
  for rel in _list_files(step_dir):
    size, sha = _hash_file(step_dir / rel)
    files[rel] = {"size": size, "sha256": sha}
  return files


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  try:  # make the rename itself durable
    fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _brief(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _join_problems(problems: list[str]) -> str:
  shown = "; ".join(problems[:_MAX_LISTED])
  more = len(problems) - _MAX_LISTED
  return shown + (f"; and {more} more" if more > 0 else "")


class CheckpointManager:
  """Saves and restores (train state, data-iterator state, meta) per step with Orbax.

  Keeps the latest `keep` steps plus, with `best_metric`, the best step by that metric
  (`best_mode` "min" or "max"). With `async_save` the writes finish in the background.
  Every finished step gets a sha256 manifest, and restores verify it (module docstring).
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.keep = keep
    self.best_metric = best_metric
    self._async = async_save
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,  # retention is ours: latest `keep` plus the best
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))
    self._writes_manifests = jax.process_index() == 0
    self._lock = threading.Lock()  # manifests: recording, deleting, the pending set
    self._pending: set[int] = set()  # saved steps whose manifest is not written yet
    self._watchers: list[threading.Thread] = []
    if self._writes_manifests:
      self._remove_orphan_manifests()

  # Paths and manifests.

  def step_dir(self, step: int) -> pathlib.Path:
    """The directory of checkpoint `step`."""
    return self.directory / str(step)

  def manifest_path(self, step: int) -> pathlib.Path:
    """Where the manifest of `step` is (or will be) written."""
    return self.directory / MANIFEST_DIR / f"{step}.json"

  def _remove_orphan_manifests(self) -> None:
    """Deletes manifests of steps no longer on disk and temporaries of interrupted writes."""
    manifests = self.directory / MANIFEST_DIR
    if not manifests.is_dir():
      return
    steps = {str(s) for s in self._manager.all_steps()}
    for path in manifests.iterdir():
      if path.name.startswith(".") or (path.suffix == ".json" and path.stem not in steps):
        path.unlink(missing_ok=True)

  def _record_manifest(self, step: int) -> None:
    """Writes the manifest of `step` if it is still pending (its save has finished)."""
    with self._lock:
      if step not in self._pending:
        return
      self._pending.discard(step)
      step_dir = self.step_dir(step)
      if not step_dir.is_dir():  # the save failed, or the step is already gone
        return
      try:
        files = step_manifest(step_dir)
        path = self.manifest_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(
            {"format": _MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
      except OSError as e:
        logging.warning("cannot write the manifest of checkpoint step %d in %s: %s; the step "
                        "cannot be verified on restore", step, self.directory, e)

  def _drop_manifest(self, step: int) -> None:
    if self._writes_manifests:
      self.manifest_path(step).unlink(missing_ok=True)

  def _watch(self, step: int) -> None:
    """Background: waits for the save of `step` to finish, then records its manifest."""
    try:
      self._manager.wait_until_finished()
    except Exception:  # orbax logged it; the caller's next wait raises it
      return
    self._record_manifest(step)

  def _finish_saves(self) -> None:
    """Waits for the pending save and writes the manifests of every finished step."""
    self._manager.wait_until_finished()
    watchers, self._watchers = self._watchers, []
    for thread in watchers:
      thread.join()
    with self._lock:
      pending = sorted(self._pending)
    for step in pending:
      self._record_manifest(step)

  def _check(self, step: int) -> tuple[str, str]:
    """(verdict, reason): `step` against its manifest (_VERIFIED, _NO_MANIFEST, _DAMAGED)."""
    step_dir = self.step_dir(step)
    if not step_dir.is_dir():
      return _DAMAGED, f"step directory {step_dir} is missing"
    path = self.manifest_path(step)
    if not path.exists():
      return _NO_MANIFEST, f"no manifest ({path}), so it cannot be verified"
    try:
      manifest = json.loads(path.read_text())
      files = manifest["files"]
      if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("step") != step:
        raise ValueError(f"format {manifest.get('format')}, step {manifest.get('step')}")
      expected = {str(rel): (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      return _DAMAGED, f"unreadable manifest {path}: {e}"
    problems: list[str] = []
    try:
      present = set(_list_files(step_dir))
      problems += [f"missing file {rel}" for rel in sorted(expected) if rel not in present]
      problems += [f"unexpected file {rel} (not in the manifest)"
                   for rel in sorted(present - set(expected))]
      for rel in sorted(set(expected) & present):  # sizes first: cheap
        size = (step_dir / rel).stat().st_size
        if size != expected[rel][0]:
          problems.append(f"size differs for {rel} ({size} bytes, manifest {expected[rel][0]})")
      if not problems:
        for rel in sorted(expected):
          size, sha = _hash_file(step_dir / rel)
          if size != expected[rel][0]:
            problems.append(f"size differs for {rel} ({size} bytes, "
                            f"manifest {expected[rel][0]})")
          elif sha != expected[rel][1]:
            problems.append(f"sha256 differs for {rel}")
    except OSError as e:
      problems.append(f"cannot read {e.filename or step_dir}: {e.strerror or e}")
    if problems:
      return _DAMAGED, _join_problems(problems)
    return _VERIFIED, ""

  def _agreed_check(self, step: int) -> tuple[str, str]:
    """`_check(step)` as process 0 sees it, on every process (a collective when several)."""
    verdict = self._check(step) if self._writes_manifests else None
    if jax.process_count() > 1:
      verdict = multihost.gather_objects([verdict])[0]
    return verdict[0], verdict[1]

  def verify(self, step: int) -> bool:
    """True when `step` matches its manifest; False when it has none (cannot be verified).

    Raises CheckpointIntegrityError naming the damaged files, FileNotFoundError when `step`
    was never saved.
    """
    self._finish_saves()
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
    verdict, reason = self._agreed_check(step)
    if verdict == _DAMAGED:
      raise CheckpointIntegrityError(
          f"checkpoint step {step} in {self.directory} is damaged: {reason}")
    return verdict == _VERIFIED

  # Steps.

  def latest_step(self) -> int | None:
    """The newest saved step (not checked), or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def latest_verified_step(self, *, include_unverifiable: bool = False) -> int | None:
    """The newest step that matches its manifest; None when no step does.

    With `include_unverifiable`, when no step verifies, the newest step without a manifest
    (which restore would fall back to). Damaged steps are logged as warnings.
    """
    self._finish_saves()
    unverifiable = None
    for step in sorted(self._manager.all_steps(), reverse=True):
      verdict, reason = self._agreed_check(step)
      if verdict == _VERIFIED:
        return step
      if verdict == _DAMAGED:
        logging.warning("checkpoint step %d in %s is damaged: %s", step, self.directory,
                        reason)
      elif unverifiable is None:
        unverifiable = step
    return unverifiable if include_unverifiable else None

  def all_steps(self) -> list[int]:
    """Every saved step, in ascending order."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The saved step with the best `best_metric`; None without one (or no step has metrics)."""
    return self._manager.best_step() if self.best_metric else None

  # Save.

  def save(self, step: int, state: Any, *, data_state: dict[str, Any] | None = None,
           meta: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` at `step` (asynchronously); returns whether it saved.

    An existing intact (or unverifiable) `step` is kept and nothing is saved; an existing
    damaged one is replaced.
    """
    self._finish_saves()  # the previous save, usually long done, and its manifest
    if step in self._manager.all_steps():
      verdict, reason = self._agreed_check(step)
      if verdict != _DAMAGED:
        return False
      logging.warning("replacing damaged checkpoint step %d in %s (%s)", step, self.directory,
                      reason)
      self._manager.delete(step)
    self._drop_manifest(step)  # a stale one, from a step of that number deleted earlier
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric and self.best_metric not in metrics:
      metrics = {}  # no eval this step: a checkpoint without metrics, never "best"
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave({**(meta or {}), "metrics": metrics})),
        metrics=metrics or None, force=True)
    if saved and self._writes_manifests:
      with self._lock:
        self._pending.add(step)
      if self._async:
        watcher = threading.Thread(target=self._watch, args=(step,), daemon=True,
                                   name=f"checkpoint-manifest-{step}")
        watcher.start()
        self._watchers.append(watcher)
      else:
        self._finish_saves()
    self._prune(extra=step)
    return bool(saved)

  def _prune(self, extra: int) -> None:
    steps = sorted(set(self._manager.all_steps()) | {extra})
    keep = set(steps[-self.keep:])
    best = self.best_step()
    if best is not None:
      keep.add(best)
    for step in steps:
      if step not in keep and step != extra:
        with self._lock:
          self._pending.discard(step)
          self._manager.delete(step)  # the step first: a crash leaves an orphan manifest
          self._drop_manifest(step)

  # Restore.

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state, data_state, meta) at `step` (default: newest intact) laid out like
    `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (or of arrays, whose
    shapes, dtypes and shardings are used). See `restore_with_step` for which step is used.
    """
    _, state, data_state, meta = self.restore_with_step(abstract_state, step)
    return state, data_state, meta

  def restore_with_step(self, abstract_state: Any, step: int | None = None
                        ) -> tuple[int, Any, dict[str, Any], dict[str, Any]]:
    """(step, state, data_state, meta): restores `step`, or by default the newest intact one.

    With `step=None`: the newest step that matches its manifest and that orbax restores;
    steps passed over are logged with the reason; steps without a manifest are used only
    when no verified step restores (with a warning). Raises FileNotFoundError when there is
    no checkpoint and CheckpointIntegrityError when none qualifies. An explicit `step`
    that does not match its manifest raises CheckpointIntegrityError naming the file(s).
    """
    self._finish_saves()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    if step is not None:
      if not self.verify(step):
        logging.warning("checkpoint step %d in %s has no manifest (%s): it cannot be "
                        "verified", step, self.directory, self.manifest_path(step))
      return (step, *self._restore_step(step, abstract))
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    skipped: list[str] = []
    unverifiable: list[int] = []

    def skip(candidate: int, reason: str) -> None:
      logging.warning("skipping checkpoint step %d in %s: %s", candidate, self.directory,
                      reason)
      skipped.append(f"step {candidate}: {reason}")

    for candidate in steps:
      verdict, reason = self._agreed_check(candidate)
      if verdict == _NO_MANIFEST:
        unverifiable.append(candidate)
        logging.warning("checkpoint step %d in %s has %s; trying verified steps first",
                        candidate, self.directory, reason)
        continue
      if verdict == _DAMAGED:
        skip(candidate, f"damaged: {reason}")
        continue
      try:
        restored = self._restore_step(candidate, abstract)
      except ValueError as e:
        skip(candidate, f"verified but orbax cannot restore it: {_brief(e.__cause__ or e)}")
        continue
      if candidate != steps[0]:
        logging.warning("restored checkpoint step %d in %s, not the newest step %d",
                        candidate, self.directory, steps[0])
      return (candidate, *restored)
    for candidate in unverifiable:
      logging.warning("no verified checkpoint step restores; restoring step %d in %s, which "
                      "has no manifest and cannot be verified", candidate, self.directory)
      try:
        return (candidate, *self._restore_step(candidate, abstract))
      except ValueError as e:
        skip(candidate,
             f"unverifiable and orbax cannot restore it: {_brief(e.__cause__ or e)}")
    raise CheckpointIntegrityError(
        f"cannot restore checkpoint from {self.directory}: no step is intact and restorable "
        f"({'; '.join(skipped)}). Orbax errors on intact steps usually mean the target state "
        f"does not match the checkpoint (a changed config); damaged steps have to be moved "
        f"away to start over.")

  def _restore_step(self, step: int, abstract: Any
                    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        data=ocp.args.JsonRestore(),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise ValueError(f"cannot restore checkpoint {self.step_dir(step)}: {e}") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  # Lifetime.

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save, if any, is fully written (with manifest)."""
    self._finish_saves()

  def close(self) -> None:
    """Waits for the pending save and its manifest, then releases the Orbax manager."""
    self._finish_saves()
    self._manager.close()
