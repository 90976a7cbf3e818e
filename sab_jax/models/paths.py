"""Dotted module paths: name, find and replace the layers of an nnx model.

A layer's path is its attribute/list-index chain from the model root joined by dots,
e.g. `language_model.layers.3.mlp.up_proj`; rules, manifests, calibration and results all
name layers this way. Layers are swapped after construction through `replace` (the
calibration's capture wrappers, the QAT student's `BinaryDense`, the packed model's
`PackedDense`); the models' `dense=` factory only picks the Dense class for every layer at
construction time.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

from flax import nnx

from sab_jax.models import layers


def dotted(path: Iterable[Any]) -> str:
  """('layers', 3, 'mlp') -> 'layers.3.mlp'."""
  return ".".join(str(p) for p in path)


def keys(path: str) -> list[str | int]:
  """'layers.3.mlp' -> ['layers', 3, 'mlp'] (digits are list indices)."""
  return [int(p) if p.isdigit() else p for p in path.split(".")]


def _parent(root: nnx.Module, path: str) -> tuple[Any, str | int]:
  *head, last = keys(path)
  node = root
  for k in head:
    node = node[k] if isinstance(k, int) else getattr(node, k)
  return node, last


def get(root: nnx.Module, path: str) -> Any:
  """The module at `path` under `root`."""
  parent, last = _parent(root, path)
  return parent[last] if isinstance(last, int) else getattr(parent, last)


def replace(root: nnx.Module, path: str, new: nnx.Module) -> None:
  """Puts `new` where the module at `path` was."""
  parent, last = _parent(root, path)
  if isinstance(last, int):
    parent[last] = new
  else:
    setattr(parent, last, new)


@contextlib.contextmanager
def wrapped(root: nnx.Module, paths: Sequence[str], wrap: Callable[[nnx.Module], nnx.Module]):
  """Temporarily puts `wrap(layer)` in place of each layer at `paths` (relative to root)."""
  originals = {p: get(root, p) for p in paths}
  for p, m in originals.items():
    replace(root, p, wrap(m))
  try:
    yield
  finally:
    for p, m in originals.items():
      replace(root, p, m)


def dense_layers(model: nnx.Module) -> list[tuple[str, layers.Dense]]:
  """(dotted path, module) of every `layers.Dense`, in graph order."""
  return [(dotted(path), m) for path, m in nnx.iter_graph(model) if isinstance(m, layers.Dense)]


def params(model: nnx.Module) -> dict[str, nnx.Param]:
  """Every `nnx.Param` (and subclass) of the model by dotted path."""
  return {dotted(path): v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
