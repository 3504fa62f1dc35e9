"""The code's contracts, run with the suite so that CI (and `pytest`) enforces them:
import layers and no cycles (import-linter, contracts in setup.cfg) and ruff's rule set
(pyproject.toml)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
  # `lint-imports` from this interpreter's environment (the console script may not be on
  # PATH when pytest runs outside an activated venv).
  code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(" \
         "lint_imports_command())"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_passes():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
