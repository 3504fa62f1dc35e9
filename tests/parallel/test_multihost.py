"""Host <-> global helpers, in process and across two real processes."""

import numpy as np

from tests.parallel import cluster
from wakea_jax.parallel import mesh, multihost


def test_to_global_and_back_on_one_process():
  m = mesh.create_mesh((2, 2, 2))
  sharding = mesh.batch_sharding(m)
  rows = np.arange(16).reshape(8, 2)
  out = multihost.to_global({"a": rows}, sharding)
  assert out["a"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(multihost.to_host(out)["a"], rows)
  assert multihost.local_rows(8, sharding) == 8
  assert multihost.gather_objects(["a"]) == ["a"]


def test_two_processes_build_one_global_batch(tmp_path):
  results = cluster.run(["tests/parallel/two_process_smoke.py"], num_processes=2,
                        devices_per_process=4, log_dir=tmp_path, timeout=180)
  cluster.check(results)
  assert all("OK" in r.output for r in results)
