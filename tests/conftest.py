"""Shared test setup.

XLA_FLAGS must be set before JAX is imported anywhere, so that the 8 fake CPU devices exist
and sharding is exercised by the tests.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole session, in a fresh temporary directory (a
# clean run starts empty: nothing carries over between runs). Many tests build the same tiny
# models and steps afresh (new jit closures over equal programs); with the cache a program
# XLA already compiled in this session is loaded instead of compiled again.
# WAKEA_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("WAKEA_TEST_COMPILE_CACHE", "1") != "0":
  import tempfile  # noqa: E402

  _CACHE_DIR = tempfile.mkdtemp(prefix="wakea_jax_test_compile_cache_")
  jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
