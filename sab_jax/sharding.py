"""Meshes and logical-axis rules: the one place where model axes meet devices.

Parameters carry logical names (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, ...);
a rule table maps each name to mesh axes, first match wins, as in MaxText. A
dimension that the mapped mesh axes do not divide is replicated instead (tiny
test models on 8 devices), and says so once through `logging`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (logical axis, mesh axes). Mesh axes absent from the mesh are ignored, so one table
# serves data-only, FSDP and tensor-parallel meshes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("patch", None),
    ("norm", None),
)


def make_mesh(axes: dict[str, int] | Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh from `{axis: size}`; one size may be -1 (all remaining devices)."""
  items = list(axes.items()) if isinstance(axes, dict) else list(axes)
  devices = list(devices if devices is not None else jax.devices())
  sizes = [s for _, s in items]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(items)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(items)} does not divide {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip([n for n, _ in items], sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available: set config.mesh so the sizes multiply to the device count")
  return Mesh(np.asarray(devices).reshape(sizes), tuple(n for n, _ in items))


def _mesh_axes_for(name: str | None, rules: Iterable[tuple[str, Any]], mesh: Mesh) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      return tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1)
  raise ValueError(f"no sharding rule for logical axis {name!r}: add it to config.logical_axis_rules")


def logical_to_sharding(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                        rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for one array with logical `axes` (None: replicated)."""
  if axes is None:
    return NamedSharding(mesh, P())
  rules = tuple(rules)
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axes = tuple(a for a in _mesh_axes_for(name, rules, mesh) if a not in used)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if mesh_axes and dim % size:
      logging.info("replicating dim %d (%s) of %s: not divisible by mesh axes %s", dim, name, shape, mesh_axes)
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES):
  """Shardings for every variable of an (abstract) nnx state, from its `out_sharding` names."""
  rules = tuple(rules)

  def one(v):
    return logical_to_sharding(v.get_metadata().get("out_sharding"), v.shape, mesh, rules)

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`jax.device_put` that also accepts a sharding spanning processes: a local value (the
  same on every process) is cut into this process's shards; a global array is resharded."""
  if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(model: nnx.Module, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
  """Moves an existing model's variables onto their shardings on `mesh` (in place; see `put`)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  is_var = lambda x: isinstance(x, nnx.Variable)
  nnx.update(model, jax.tree.map(lambda v, sh: v.replace(put(v.get_value(), sh)), state, shardings, is_leaf=is_var))
  return model


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
  """Initialises a model directly into its shardings (never materialised on one device)."""
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(make_model())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension over the data axes, the rest replicated."""
  axes = _mesh_axes_for("batch", tuple(rules), mesh)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))
