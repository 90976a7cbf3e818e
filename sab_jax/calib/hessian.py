"""Modality-split input Hessians, summed data-parallel over the mesh.

For one Dense layer with inputs x (one row per token), the calibration statistics are
`Σ_text x xᵀ`, `Σ_image x xᵀ` and the two token counts, accumulated in float32.
Each device sums its shard of the tokens and a `psum` over the mesh's data axes
combines them (`jax.shard_map`): the result is the same on 1 or 8 devices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sab_jax import sharding as sharding_lib
from sab_jax.quant.providers.base import LayerStats


def data_axes(mesh: Mesh) -> tuple[str, ...]:
  spec = sharding_lib.batch_sharding(mesh, 1).spec[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


@functools.partial(jax.jit, static_argnames=("mesh",))
def hessian_sums(x: jax.Array, text: jax.Array, vis: jax.Array, mesh: Mesh):
  """Σ x xᵀ over text and over image tokens, and the counts.

  Args:
    x: `[B, T, d]` Dense inputs, batch-sharded over the mesh's data axes.
    text, vis: `[B, T]` token masks (padding in neither).
    mesh: the mesh `x` lives on.
  Returns:
    (sum_text `[d, d]`, sum_vis `[d, d]`, n_text, n_vis), replicated.
  """
  axes = data_axes(mesh)
  spec = P(axes if axes else None)

  def local(x, text, vis):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    t = text.reshape(-1).astype(jnp.float32)
    v = vis.reshape(-1).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    out = (jnp.dot((x * t[:, None]).T, x, precision=hp), jnp.dot((x * v[:, None]).T, x, precision=hp),
           t.sum(), v.sum())
    return jax.lax.psum(out, axes) if axes else out

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P(), check_vma=False)(x, text, vis)


@dataclasses.dataclass
class Accumulator:
  """Running modality sums for one layer; `stats()` normalises to `2/N Σ x xᵀ`."""

  sum_text: jax.Array | None = None
  sum_vis: jax.Array | None = None
  n_text: float = 0.0
  n_vis: float = 0.0

  def add(self, x: jax.Array, text: jax.Array, vis: jax.Array, mesh: Mesh) -> None:
    st, sv, nt, nv = hessian_sums(x, text, vis, mesh)
    if self.sum_text is None:
      self.sum_text, self.sum_vis = st, sv
    else:
      self.sum_text, self.sum_vis = self.sum_text + st, self.sum_vis + sv
    self.n_text += float(nt)
    self.n_vis += float(nv)

  def stats(self) -> LayerStats:
    if self.sum_text is None or self.n_text + self.n_vis == 0:
      raise ValueError("no calibration tokens reached this layer: check the calibration data")
    norm = lambda s, n: s * (2.0 / n) if n else jnp.zeros_like(s)
    return LayerStats(h_text=norm(self.sum_text, self.n_text), h_vis=norm(self.sum_vis, self.n_vis),
                      n_text=int(self.n_text), n_vis=int(self.n_vis))
