"""Device mesh, logical-axis rules and sharding helpers.

Layers name the logical axes of their parameters (`logical_axes` metadata on each
`nnx.Param`) and of their activations (`constrain(x, ("act_batch", ...))`). A rules table,
part of the config, maps each logical name to a mesh axis (or a tuple of them, or None for
replicated). The mesh has three axes:

  data    pure data parallelism: batch split, parameters replicated;
  fsdp    batch split *and* parameters sharded along their 'embed' dimension (ZeRO-3 style);
  tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary.

Sizes come from the config; -1 means "all remaining devices".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wakea_jax.parallel import multihost

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """config.mesh: the size of each mesh axis; -1 takes the remaining devices.

  `devices`: 0 builds the mesh over every device; N > 0 over the first N only (one
  process). An RL run on a CPU host split into host devices
  (`--xla_force_host_platform_device_count=2`) trains on one of them, where the update's
  large matmuls already use every core, and samples tensor-parallel over all of them
  (`rollout.tensor`), where one device's small decode matmuls would use one core.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  devices: int = 0

  def __post_init__(self):
    if self.devices < 0:
      raise ValueError(f"mesh.devices must be >= 0 (0: every device), got {self.devices}")

  @property
  def shape(self) -> dict[str, int]:
    """{axis name: size} in MESH_AXES order."""
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

  def device_list(self) -> list[jax.Device]:
    """The devices the mesh spans: every device, or the first `devices` of them."""
    every = jax.devices()
    if not self.devices:
      return every
    if jax.process_count() > 1:
      raise ValueError(f"mesh.devices={self.devices} selects devices of one process; a run "
                       f"on {jax.process_count()} processes spans every device (use 0)")
    if self.devices > len(every):
      raise ValueError(f"mesh.devices={self.devices}, but this process has {len(every)} "
                       f"device(s)")
    return every[:self.devices]

  def create(self) -> Mesh:
    """The (data, fsdp, tensor) mesh this config describes."""
    return create_mesh(self.shape, self.device_list())


MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Parameters: 'embed' is sharded by FSDP, the "wide" dimensions by tensor parallelism.
# Activations ('act_*'): batch over data+fsdp, the wide dimensions over tensor.
DEFAULT_RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # The stacked-layer axis of `ModelConfig.scan_layers` models: every layer on every device.
    ("layers", None),
)

# Logical axes added after users wrote rules tables of their own: one missing from a table is
# replicated (its default here) instead of an error, so such tables keep working.
_IMPLICIT_RULES: dict[str, MeshAxes] = {"layers": None}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, MeshAxes]] | None] = (
    contextvars.ContextVar("wakea_logical_rules", default=None))


def normalize_rules(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> Rules:
  """Accepts a tuple of pairs, a dict, or ConfigDict-style lists; validates mesh axis names."""
  if rules is None:
    return DEFAULT_RULES
  items = rules.items() if isinstance(rules, Mapping) else rules
  out = []
  for i, item in enumerate(items):
    if len(item) != 2:
      raise ValueError(f"sharding rule #{i} must be (logical_name, mesh_axes), got {item!r}")
    name, axes = item
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(
            f"sharding rule for {name!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}")
    out.append((str(name), axes))
  names = [n for n, _ in out]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"sharding rules name {duplicates} more than once")
  return tuple(out)


def resolve_mesh_shape(shape: Sequence[int] | Mapping[str, int], num_devices: int
                      ) -> tuple[int, int, int]:
  """Turns (data, fsdp, tensor) sizes with at most one -1 into concrete sizes."""
  if isinstance(shape, Mapping):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")
    shape = [shape.get(axis, 1) for axis in MESH_AXES]
  sizes = [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(sizes)} must give one size per axis {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(sizes)} may hold at most one -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {tuple(sizes)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh shape {tuple(sizes)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh shape {tuple(sizes)} needs {math.prod(sizes)} devices, but {num_devices} are used")
  return tuple(sizes)  # type: ignore[return-value]


def create_mesh(shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # Fake CPU devices and odd slices have no topology to optimise for.
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (the first dimension that asks for it wins).
  Given `mesh` and `shape`, a mesh axis whose size does not divide the dimension is dropped
  (the dimension is replicated over it) rather than failing: small models (2 KV heads on a
  tensor axis of 4) stay runnable, and the choice is logged.
  """
  table = dict(rules)
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for dim, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table and name not in _IMPLICIT_RULES:
      raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    target = table[name] if name in table else _IMPLICIT_RULES[name]
    targets = target if isinstance(target, tuple) else ((target,) if target else ())
    kept = []
    for axis in targets:
      if axis in used:
        continue
      if mesh is not None and shape is not None:
        size = mesh.shape[axis]
        so_far = math.prod(mesh.shape[a] for a in kept)
        if shape[dim] % (so_far * size):
          if size > 1:
            logging.info("logical axis %r (size %d) not divisible by mesh axis %r (size %d); "
                      "replicating it there", name, shape[dim], axis, size)
          continue
      kept.append(axis)
      used.add(axis)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """A tree like `state` (an nnx.State of Variables) holding a NamedSharding per Variable."""
  rules = normalize_rules(rules)

  def one(var: Any) -> Any:
    if not _is_variable(var):
      return NamedSharding(mesh, PartitionSpec())
    axes = var.get_metadata().get("logical_axes")
    shape = getattr(var.get_value(), "shape", ())
    if axes is None:
      spec = PartitionSpec()
    else:
      spec = logical_to_spec(axes, rules, mesh, shape)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Places every Variable of `state` on `mesh` according to its logical axes."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules | None = None, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over the 'act_batch' mesh axes."""
  spec = logical_to_spec(("act_batch",) + (None,) * (ndim - 1), normalize_rules(rules))
  return NamedSharding(mesh, spec)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Process-local host arrays [local_rows, ...] -> global arrays on the mesh, batch split.

  Each process passes only its own rows (its data shard); the global batch is their
  concatenation in process order (`jax.make_array_from_process_local_data`; see
  `parallel/multihost.py`). On one process that is the whole batch, as before.
  """
  rules = normalize_rules(rules)

  def put(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x   # already global
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, max(x.ndim, 1))
    batch_ways = math.prod(mesh.shape[a] for a in _axes_of(sharding.spec[0]))
    local_ways = multihost.local_batch_blocks(sharding)
    if x.ndim and x.shape[0] % local_ways:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by the {local_ways} "
                       f"batch shards on this process (of {batch_ways}) of mesh "
                       f"{dict(mesh.shape)}")
    return multihost.to_global(x, sharding)

  return jax.tree.map(put, batch)


def _axes_of(entry: MeshAxes) -> tuple[str, ...]:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
  """Within this context (at trace time), `constrain` annotates activations for `mesh`."""
  token = _ACTIVE.set((mesh, dict(normalize_rules(rules))))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `logical_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, table = active
  spec = logical_to_spec(axes, tuple(table.items()), mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
