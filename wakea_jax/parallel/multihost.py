"""Host <-> global array helpers that are correct on one process and on many.

With `jax.distributed` every process runs the same program but holds only the rows of the
batch that live on its own devices. The rules the rest of the stack follows:

  * Host data is *process-local*: a process reads, tokenises, rewards and calls tools for its
    own rows only. `to_global` turns a pytree of process-local host arrays [local_rows, ...]
    into global `jax.Array`s [local_rows * process_count, ...] split along the batch axis
    (`jax.make_array_from_process_local_data`), and `to_host` is the inverse: a global array
    back to this process's rows as NumPy. On one process both are the identity on the rows,
    so single-host code takes the same path.
  * Process p's rows are the global rows [p * local_rows, (p + 1) * local_rows): the batch
    axis is laid out over the mesh so that each process's devices hold one contiguous block
    (`check_contiguous_rows` says so when a mesh breaks that).
  * Decisions the host makes between jitted calls (stop decoding? a width to pad to?) must be
    the same on every process, or the processes would run different programs and hang in
    a collective. `all_true`, `global_max` and `global_sum` agree on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def process_count() -> int:
  """The number of JAX processes (1 unless `jax.distributed` is initialised)."""
  return jax.process_count()


def batch_spec_axes(mesh: Mesh, spec: PartitionSpec) -> tuple[str, ...]:
  """The mesh axes the first (batch) dimension of `spec` is split over."""
  entry = spec[0] if len(spec) else None
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def batch_shards(sharding: NamedSharding) -> int:
  """Into how many blocks `sharding` splits the batch dimension."""
  return math.prod(sharding.mesh.shape[a] for a in batch_spec_axes(sharding.mesh, sharding.spec))


def local_batch_blocks(sharding: NamedSharding) -> int:
  """How many of the batch blocks of `sharding` live on this process's devices."""
  blocks = set()
  for device, index in sharding.addressable_devices_indices_map((batch_shards(sharding),)
                                                                ).items():
    del device
    blocks.add(index[0].start or 0)
  return len(blocks)


def local_rows(global_rows: int, sharding: NamedSharding) -> int:
  """This process's share of a batch of `global_rows` split by `sharding`."""
  shards = batch_shards(sharding)
  if global_rows % shards:
    raise ValueError(f"a batch of {global_rows} rows cannot be split into the {shards} batch "
                     f"shards of mesh {dict(sharding.mesh.shape)}")
  return global_rows // shards * local_batch_blocks(sharding)


def to_global(tree: Any, sharding: NamedSharding | Any) -> Any:
  """Process-local host arrays [rows, ...] -> global jax.Arrays, batch split by `sharding`.

  `sharding` is one NamedSharding for every leaf of rank >= 1 (its spec's first entry is
  used for the batch axis, the other dimensions replicated) or a matching pytree of them.
  Scalars (rank 0) must be equal on every process and are replicated.
  """

  def put(x: Any, sh: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(sh.mesh, PartitionSpec()))
    spec = PartitionSpec(*(tuple(sh.spec)[:1] + (None,) * (x.ndim - 1)))
    sh = NamedSharding(sh.mesh, spec)
    blocks, local = batch_shards(sh), local_batch_blocks(sh)
    if x.shape[0] % local:
      raise ValueError(f"{x.shape[0]} local rows cannot be split over this process's {local} "
                       f"batch shards (mesh {dict(sh.mesh.shape)}, {blocks} in all)")
    global_shape = (x.shape[0] // local * blocks,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sh, x, global_shape)

  if isinstance(sharding, NamedSharding):
    return jax.tree.map(lambda x: put(x, sharding), tree)
  return jax.tree.map(put, tree, sharding)


def to_host(x: Any) -> Any:
  """Global jax.Arrays -> NumPy: this process's rows of batch-split arrays, the whole value
  of replicated ones (on one process: the whole array either way). Works on pytrees."""

  def get(a: Any) -> np.ndarray:
    if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
      return np.asarray(a)
    shards = {}
    for shard in a.addressable_shards:
      start = shard.index[0].start or 0 if shard.index else 0
      shards.setdefault(start, shard.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)

  return jax.tree.map(get, x)


def all_true(flag: bool) -> bool:
  """Whether `flag` holds on every process."""
  if process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def global_max(value: int | float) -> Any:
  """The largest of every process's `value`."""
  if process_count() == 1:
    return value
  return np.max(multihost_utils.process_allgather(np.asarray(value))).item()


def global_sum(value: Any) -> Any:
  """Every process's `value` (a number or an array of one shape) added up."""
  if process_count() == 1:
    return value
  gathered = multihost_utils.process_allgather(np.asarray(value))
  out = np.sum(gathered, axis=0)
  return out.item() if np.ndim(out) == 0 else out


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's rows [n_p, ...] concatenated in process order (equal n_p required)."""
  if process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def gather_objects(items: Sequence[Any]) -> list[Any]:
  """Every process's list of JSON-able `items`, concatenated in process order."""
  if process_count() == 1:
    return list(items)
  data = np.frombuffer(json.dumps(list(items)).encode(), np.uint8)
  sizes = gather_rows(np.asarray([data.size], np.int64))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everything = gather_rows(padded[None])
  out: list[Any] = []
  for row, size in zip(everything, sizes):
    out.extend(json.loads(bytes(row[:int(size)]).decode()))
  return out


def process_slice(items: Sequence[Any]) -> list[Any]:
  """This process's contiguous share of a list every process holds in the same order:
  process p of P gets items [p * k, (p + 1) * k) with k = ceil(len / P) (the last ones may
  get fewer, or none)."""
  count, index = process_count(), jax.process_index()
  per = -(-len(items) // count)
  return list(items[index * per:(index + 1) * per])
