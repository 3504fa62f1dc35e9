"""A model registry in a local directory: versions with lineage, evaluation and serving
figures, and stage aliases. No server: every reader and writer is a process on a filesystem.

  root/models/NAME/VERSION/manifest.json   one JSON manifest per version (1, 2, ...)
  root/models/NAME/VERSION/checkpoint/     the copied model, only when registered copy=True
  root/models/NAME/aliases.json            stage -> version ("production", "staging", ...)
  root/selections/                         selection records (serving/selection.py)

A version's `checkpoint` is the path it was registered with, which the loader
(`wakea_jax.checkpoints.loader.load_model`, as `python -m wakea_jax.evaluate` and `sample`
use) reads: a wakea_jax model directory (model_config.json: a run's export/model or
`convert --out`), a run workdir (its export/model) or a Hugging Face directory (config.json,
e.g. a run's export/hf or `convert --to_hf`). The checkpoint is referenced, not copied
(copy=True copies it into the registry), so the manifest records a fingerprint of the files
the loader reads, and `load_for_serving` refuses a checkpoint that changed since.

Every write is atomic (a temporary file in the same directory, fsync, os.replace), so a
crash leaves the previous manifest or aliases file, never half of one. A new version claims
its number with mkdir, which fails if another process took it first; read-modify-write
updates of one model's files (evaluation, serving figures, aliases) hold a per-model lock
(fcntl.flock), so two writers never lose each other's update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from wakea_jax.checkpoints import loader
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.sampling import media_inputs
from wakea_jax.serving.results import (
  SERVING_FIGURES,
  cell_rows,
  check_serving_figures,
  eval_rows,
  overall_accuracy,
  row_key,
)

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
COPIED_CHECKPOINT = "checkpoint"
# Letters, digits, '.', '_', '-': safe as a directory name and free of the ':' and '@' that
# separate a name from its version or stage in a reference.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REFERENCE_FORMS = "'NAME' (latest version), 'NAME:VERSION' or 'NAME@STAGE'"


class RegistryError(ValueError):
  """A bad name or reference, or a version, stage or record that does not exist."""


def now() -> str:
  """The current UTC time as ISO 8601 (what manifests record)."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes `path` so that readers see the old contents or the new, never a part: the text
  goes to a temporary file beside it, is fsynced and renamed over `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _json(value: Any) -> str:
  return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def fingerprint(directory: str | os.PathLike[str]) -> str:
  """sha256 over every file of `directory` (relative path, size and sha256 of the contents),
  so any change to a file, a new file or a removed one changes it."""
  directory = pathlib.Path(directory)
  digest = hashlib.sha256()
  files = sorted(p for p in directory.rglob("*") if p.is_file())
  for file in files:
    content = hashlib.sha256()
    with open(file, "rb") as f:
      while block := f.read(1 << 20):
        content.update(block)
    digest.update(f"{file.relative_to(directory).as_posix()}\0{file.stat().st_size}\0"
                  f"{content.hexdigest()}\n".encode())
  return digest.hexdigest()


def check_name(name: str, what: str = "model name") -> str:
  """`name` if it is a valid model or stage name, else a RegistryError saying what is allowed."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise RegistryError(f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (':' and '@' separate versions and "
                        "stages)")
  return name


@dataclasses.dataclass(frozen=True)
class ModelVersion:
  """One registered version, as its manifest records it (plus the stages pointing at it)."""

  name: str
  version: int
  checkpoint: str          # what the loader reads (see the module docstring)
  kind: str                # "native" (model_config.json) or "hf" (config.json)
  model_dir: str           # the directory the loader reads (a workdir's export/model)
  fingerprint: str         # `fingerprint(model_dir)` at registration
  created: str
  tokenizer: str = ""      # loader.tokenizer_path(checkpoint) at registration; "": bundled
  parent: str | None = None            # "name:version" of the model it was trained from
  config: Mapping[str, Any] | None = None   # the run's configuration snapshot
  data_sources: tuple[str, ...] = ()
  objective: str = ""
  notes: str = ""
  copied: bool = False
  eval: Mapping[str, Any] | None = None      # record_eval
  serving: Mapping[str, Any] | None = None   # record_serving
  stages: tuple[str, ...] = ()               # aliases pointing here (not in the manifest)

  @property
  def ref(self) -> str:
    """"name:version"."""
    return f"{self.name}:{self.version}"

  def manifest(self) -> dict[str, Any]:
    """The JSON manifest (everything but `stages`, which live in aliases.json)."""
    out = dataclasses.asdict(self)
    del out["stages"]
    out["data_sources"] = list(self.data_sources)
    return out

  @classmethod
  def from_manifest(cls, data: Mapping[str, Any], where: str,
                    stages: Sequence[str] = ()) -> ModelVersion:
    """Parses a manifest; errors name the file and the field."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"stages"}
    missing = sorted({"name", "version", "checkpoint", "kind", "model_dir", "fingerprint",
                      "created"} - set(data))
    if missing:
      raise RegistryError(f"{where}: field(s) {missing} missing")
    values = {k: v for k, v in data.items() if k in fields}
    values["data_sources"] = tuple(values.get("data_sources") or ())
    return cls(**values, stages=tuple(stages))


def _plain(value: Any) -> Any:
  """A JSON-able copy of a config (ConfigDict, dataclass, mapping) or None."""
  if value is None:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  elif dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  return json.loads(json.dumps(value, default=str))


@dataclasses.dataclass(frozen=True)
class CompareRow:
  """One line of `Registry.compare`: a metric of version a and of b, and b - a."""

  section: str             # "eval" or "serving"
  metric: str
  a: float | None
  b: float | None

  @property
  def delta(self) -> float | None:
    """b - a, None when either is missing."""
    return None if self.a is None or self.b is None else self.b - self.a


class Registry:
  """The registry rooted at `root` (created on first write)."""

  def __init__(self, root: str | os.PathLike[str]):
    self.root = pathlib.Path(root).absolute()
    self.models = self.root / "models"

  # -- reading ---------------------------------------------------------------------------

  def names(self) -> list[str]:
    """Registered model names, sorted."""
    if not self.models.is_dir():
      return []
    return sorted(p.name for p in self.models.iterdir()
                  if _NAME.fullmatch(p.name) and self.versions(p.name))

  def versions(self, name: str) -> list[int]:
    """The versions of `name` with a manifest, ascending ([] if none)."""
    directory = self.models / name
    if not directory.is_dir():
      return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file())

  def stages(self, name: str) -> dict[str, int]:
    """{stage: version} of `name`."""
    path = self.models / name / ALIASES
    if not path.is_file():
      return {}
    data = self._read_json(path)
    return {stage: int(entry["version"]) for stage, entry in data.items()}

  def _read_json(self, path: pathlib.Path) -> Any:
    try:
      return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise RegistryError(f"{path}: unreadable registry file: {e}") from None

  def get(self, name: str, version: int) -> ModelVersion:
    """The version `name:version`; RegistryError listing what exists when it does not."""
    check_name(name)
    versions = self.versions(name)
    if not versions:
      raise RegistryError(f"no model named {name!r} in {self.root}; registered: "
                          f"{', '.join(self.names()) or 'none'}")
    if version not in versions:
      raise RegistryError(f"{name!r} has no version {version}; versions: "
                          f"{', '.join(map(str, versions))}")
    path = self.models / name / str(version) / MANIFEST
    stages = sorted(s for s, v in self.stages(name).items() if v == version)
    return ModelVersion.from_manifest(self._read_json(path), str(path), stages)

  def resolve(self, reference: str) -> ModelVersion:
    """'NAME' (its latest version), 'NAME:VERSION' or 'NAME@STAGE' -> the version."""
    if not isinstance(reference, str) or not reference:
      raise RegistryError(f"empty model reference; use {REFERENCE_FORMS}")
    if "@" in reference:
      name, _, stage = reference.partition("@")
      check_name(name)
      check_name(stage, "stage")
      stages = self.stages(name)
      if stage not in stages:
        if not self.versions(name):
          self.get(name, 0)   # raises: no such model, listing the registered names
        known = ", ".join(f"{s} -> {v}" for s, v in sorted(stages.items())) or "none"
        raise RegistryError(f"{name!r} has no stage {stage!r}; stages: {known} (promote a "
                            "version first)")
      return self.get(name, stages[stage])
    name, sep, version = reference.partition(":")
    check_name(name)
    if not sep:
      versions = self.versions(name)
      return self.get(name, versions[-1] if versions else 0)
    if not version.isdigit():
      raise RegistryError(f"bad version in {reference!r}: use {REFERENCE_FORMS}")
    return self.get(name, int(version))

  def list(self) -> list[ModelVersion]:
    """Every version of every model, by name then version."""
    return [self.get(name, v) for name in self.names() for v in self.versions(name)]

  # -- writing ---------------------------------------------------------------------------

  @contextlib.contextmanager
  def _lock(self, name: str) -> Iterator[None]:
    """An exclusive lock on model `name`'s read-modify-write updates."""
    directory = self.models / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  def register(self, name: str, checkpoint_dir: str | os.PathLike[str], *,
               parent: str | None = None, config: Any = None, data_sources: Sequence[str] = (),
               objective: str = "", notes: str = "", copy: bool = False) -> int:
    """Registers `checkpoint_dir` as the next version of `name` (1, 2, ...); returns it.

    `parent` is a reference to an existing version (any form; stored as "name:version").
    `config` (ConfigDict, dataclass or mapping) is snapshotted; when None and the checkpoint
    is a run workdir, the run's own configuration record (workdir/config.json) is.
    """
    check_name(name)
    source = pathlib.Path(checkpoint_dir).absolute()
    try:
      kind, model_dir = loader.resolve(source)
    except FileNotFoundError as e:
      raise RegistryError(f"checkpoint_dir: {e}") from None
    parent_ref = self.resolve(parent).ref if parent else None
    if isinstance(data_sources, str):
      data_sources = (data_sources,)
    if config is None and model_dir != source and (source / "config.json").is_file():
      config = self._read_json(source / "config.json")   # a run workdir's record
    fields = dict(
        name=name, kind=kind, created=now(), tokenizer=loader.tokenizer_path(source),
        parent=parent_ref, config=_plain(config), data_sources=[str(s) for s in data_sources],
        objective=objective, notes=notes, copied=copy)
    directory = self.models / name
    directory.mkdir(parents=True, exist_ok=True)
    version = (self.versions(name) or [0])[-1] + 1
    while True:   # mkdir claims the number; another process may have taken it first
      version_dir = directory / str(version)
      try:
        version_dir.mkdir()
        break
      except FileExistsError:
        version += 1
    try:
      if copy:
        # Copied beside, then renamed: the version never points at half a copy.
        tmp = version_dir / f".{COPIED_CHECKPOINT}.tmp"
        shutil.copytree(model_dir, tmp)
        tmp.rename(version_dir / COPIED_CHECKPOINT)
        if fields["tokenizer"] == str(model_dir):   # its tokenizer files came along
          fields["tokenizer"] = str(version_dir / COPIED_CHECKPOINT)
        model_dir = source = version_dir / COPIED_CHECKPOINT
      entry = ModelVersion(version=version, checkpoint=str(source), model_dir=str(model_dir),
                           fingerprint=fingerprint(model_dir), **fields)
      atomic_write_text(version_dir / MANIFEST, _json(entry.manifest()))
    except BaseException:
      shutil.rmtree(version_dir, ignore_errors=True)
      raise
    return version

  def _update(self, name: str, version: int, **changes: Any) -> ModelVersion:
    with self._lock(name):
      entry = dataclasses.replace(self.get(name, version), **changes)
      atomic_write_text(self.models / name / str(version) / MANIFEST, _json(entry.manifest()))
    return entry

  def record_eval(self, name: str, version: int, results: Any, *, source: str = ""
                  ) -> ModelVersion:
    """Records per-category evaluation results (rows {task, category, difficulty, accuracy,
    n}, e.g. `serving.tracking.evaluate_by_category`'s result), replacing earlier ones."""
    rows = eval_rows(results, f"record_eval({name}:{version})")
    record: dict[str, Any] = {"recorded": now(), "rows": rows, "source": source}
    if isinstance(results, Mapping):
      for key in ("overall", "config", "sources", "checkpoint"):
        if key in results:
          record[key] = _plain(results[key])
    if "overall" not in record:
      record["overall"] = {"accuracy": overall_accuracy(record),
                           "n": sum(r["n"] for r in cell_rows(rows))}
    return self._update(name, version, eval=record)

  def record_serving(self, name: str, version: int, figures: Mapping[str, Any]
                     ) -> ModelVersion:
    """Records measured serving figures: p50/p95 latency (ms), generated tokens/s and peak
    memory (MB) (SERVING_FIGURES; other numeric or text keys such as the machine are kept)."""
    check_serving_figures(figures, f"record_serving({name}:{version})")
    return self._update(name, version, serving={"recorded": now(), **_plain(dict(figures))})

  def promote(self, name: str, version: int, stage: str = "production") -> ModelVersion:
    """Points `name@stage` at `version` (atomically; the previous version is remembered)."""
    check_name(stage, "stage")
    self.get(name, version)   # raises for a missing version
    with self._lock(name):
      path = self.models / name / ALIASES
      aliases = self._read_json(path) if path.is_file() else {}
      previous = aliases.get(stage, {}).get("version")
      aliases[stage] = {"version": version, "promoted": now(), "previous": previous}
      atomic_write_text(path, _json(aliases))
    return self.get(name, version)

  def compare(self, a: str, b: str) -> list[CompareRow]:
    """Eval accuracy per task/category/difficulty and serving figures of `a` and `b`
    (references), with b - a; a metric only one of them has shows the other as None."""
    va, vb = self.resolve(a), self.resolve(b)
    rows = [CompareRow("eval", "overall accuracy", overall_accuracy(va.eval),
                       overall_accuracy(vb.eval))]
    cells = [{row_key(r): r["accuracy"] for r in (v.eval or {}).get("rows", ())}
             for v in (va, vb)]
    for key in sorted(set(cells[0]) | set(cells[1])):
      rows.append(CompareRow("eval", key, cells[0].get(key), cells[1].get(key)))
    serving = [dict(v.serving or {}) for v in (va, vb)]
    numeric = lambda d: {k for k, x in d.items()
                         if isinstance(x, int | float) and not isinstance(x, bool)}
    keys = numeric(serving[0]) | numeric(serving[1])
    for key in [k for k in SERVING_FIGURES if k in keys] + sorted(keys - set(SERVING_FIGURES)):
      rows.append(CompareRow("serving", key, serving[0].get(key), serving[1].get(key)))
    return rows


def load_for_serving(version: ModelVersion, *, verify: bool = True) -> tuple[Any, Any]:
  """(model, tokenizer) of a registered version, loaded as `sample` and `evaluate` load a
  checkpoint. With `verify`, a checkpoint whose files changed since registration (it is
  referenced, not copied) is refused rather than served under the version's name."""
  if verify:
    if not pathlib.Path(version.model_dir).is_dir():
      raise RegistryError(f"{version.ref}: its checkpoint {version.model_dir} is gone")
    found = fingerprint(version.model_dir)
    if found != version.fingerprint:
      raise RegistryError(f"{version.ref}: the files of {version.model_dir} changed since it "
                          f"was registered (fingerprint {found[:12]}, registered "
                          f"{version.fingerprint[:12]}); register it again as a new version")
  model = media_inputs.load_checkpoint(version.checkpoint)
  return model, tokenizer_from(version.tokenizer or loader.tokenizer_path(version.checkpoint))
