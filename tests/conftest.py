"""Shared test setup.

XLA_FLAGS must be set before JAX is imported anywhere, so that the 8 fake CPU devices exist
and sharding is exercised by the tests.
"""

import os

# LLVM's optimisation level 0 for XLA:CPU's generated code: most of the suite's time is
# compiling tiny programs, which this makes about 45% faster while they run a little slower
# (tests/rl: 196 -> 143 s with the compile cache below). Library calls (matmuls,
# convolutions) are unaffected. Benchmarks run from the tests drop it (tools/machine.py).
_O0 = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    + ([_O0] if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") else [])
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _persistent_compile_cache() -> None:
  """One persistent XLA compilation cache for the whole run: this process, pytest-xdist's
  workers (started later, they inherit the environment) and every child process the tests
  start (trainers, demos, the two-process runs). Tests build the same tiny models again and
  again, and `_release_compiled_programs` drops the in-memory programs after each module, so
  most compiles repeat one already done; the cache turns them into reads (tests/rl: 302 ->
  196 s from an empty cache). A directory of the run's own, removed at its end by the process
  that made it; a cache the caller names is used as is. Benchmarks switch it off
  (tools/machine.py): their compile seconds must be compiles."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="wakea_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, path, ignore_errors=True)


_persistent_compile_cache()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. One pytest process runs ~1850
  tests; every XLA:CPU executable it keeps holds JIT code mappings, and near the end of the
  suite the process crashed inside XLA's compiler (a segfault once, an abort in serialisation
  once, both at the same test, 98% through): the accumulated mappings approach the kernel's
  vm.max_map_count (65530 here). Modules share few programs, so little is recompiled."""
  yield
  jax.clear_caches()
  gc.collect()


# Longest files first, in this order (the suite's 30 slowest durations), then the rest.
_FIRST = ("tests/test_real_models.py",)


def pytest_collection_modifyitems(config, items):
  """Runs the files holding `slow` tests first (tests/test_real_models.py, ~460 s, before all).

  CI runs `pytest -n 2 --dist loadfile`, and setup.cfg adds `--no-loadscope-reorder`, so
  xdist hands whole files to its two workers in this order (by default it hands out the files
  with the most tests first, which left the 2-test real-model file for the end, where it ran
  alone while the other worker sat idle). Started first, the long files overlap the
  many short ones. The order within a file is unchanged; every worker sorts alike (xdist
  checks that the workers' collections agree)."""
  del config
  slow_files = {item.nodeid.split("::")[0] for item in items
                if item.get_closest_marker("slow") is not None}

  def rank(item):
    path = item.nodeid.split("::")[0]
    if path in _FIRST:
      return _FIRST.index(path)
    return len(_FIRST) + (0 if path in slow_files else 1)

  items.sort(key=rank)   # stable: files stay contiguous and in their collected order
