"""A process of the two-process smoke test: global arrays from process-local rows."""

import jax
import numpy as np

from wakea_jax.parallel import distributed, mesh, multihost

assert distributed.initialize()
m = mesh.create_mesh((2, 2, 2))
rows = np.arange(4, dtype=np.float32)[:, None] + 10 * jax.process_index()
batch = mesh.shard_batch({"x": rows}, m)
total = jax.jit(lambda b: b["x"].sum())(batch)
assert float(multihost.to_host(total)) == 6 + 46, float(total)   # rows 0..3 and 10..13
np.testing.assert_array_equal(multihost.to_host(batch)["x"], rows)
np.testing.assert_array_equal(multihost.gather_rows(rows)[:, 0], [0, 1, 2, 3, 10, 11, 12, 13])
assert multihost.global_max(jax.process_index()) == 1
assert multihost.all_true(True) and not multihost.all_true(jax.process_index() == 0)
assert multihost.gather_objects([f"p{jax.process_index()}"]) == ["p0", "p1"]
print("OK", jax.process_index())
