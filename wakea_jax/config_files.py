"""Loading config files: `configs/<file>.py` modules with `get_config(variant)`.

Config files are plain Python loaded by path (absl's `config_flags` does the same), so they
import each other through `sibling`, not through `import`:

    common = config_files.sibling(__file__, "common")   # configs/common.py

`get_config("configs/grpo.py:test", **{"train.steps": 2})` is what tests and notebooks use
to build a config with overrides, like `--config=configs/grpo.py:test --config.train.steps=2`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
from typing import Any

import ml_collections

# The repository's configs/ folder (for tests and tools run from a checkout).
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_module(path: str | pathlib.Path) -> types.ModuleType:
  """Executes the Python file at `path` as a module (not registered in sys.modules)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location(f"_wakea_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The config module `name`.py in the same folder as `config_file` (pass `__file__`)."""
  return load_module(pathlib.Path(config_file).with_name(f"{name}.py"))


def get_config(spec: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`path[:variant]` -> the file's get_config(variant), then dotted-key overrides.

  A bare name ("grpo:test") is looked up in the repository's configs/ folder.
  """
  path, _, variant = spec.partition(":")
  file = pathlib.Path(path)
  if not file.suffix and not file.parent.parts:
    file = CONFIG_DIR / f"{path}.py"
  config = load_module(file).get_config(variant or None)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"{spec}: no field {key!r} to override")
    node[leaf] = value
  return config
