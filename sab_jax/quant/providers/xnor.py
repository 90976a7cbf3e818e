"""XNOR baseline (Rastegari et al. 2016, https://arxiv.org/abs/1603.05279).

`Ŵ = sign(W) · alpha_out`, `alpha_out[k] = mean_j |W[j, k]|` (stored in bf16); no
calibration, no compensation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.quant.core import binarize_core, bits_core
from sab_jax.quant.providers import base


@base.parts_dataclass()
class XnorParts(base.Parts):
  """signs [in, out] bool (True = +1), alpha_out [out] bf16."""
  signs: Any
  alpha_out: Any

  def expected(self):
    n_in, n_out = self.shape
    return {"signs": ((n_in, n_out), np.bool_), "alpha_out": ((n_out,), jnp.bfloat16)}

  def dequantize(self) -> jax.Array:
    return base.signs_pm(self.signs) * self.alpha_out.astype(jnp.float32)[None, :]

  def planes(self, *, one_lhs: bool = False) -> list[base.PlaneSource]:
    """One plane, one group, unit row scales."""
    del one_lhs
    n_in = self.shape[0]
    a_out = np.asarray(self.alpha_out, np.float32)
    return [base.PlaneSource(np.asarray(self.signs), [np.arange(n_in)], [np.ones(n_in, np.float32)],
                             [a_out[None]])]

  def qat_init(self) -> base.QatState:
    a = np.asarray(self.alpha_out, np.float32)
    latent = base.two_plane_latent(self.signs, np.broadcast_to(a[None, :], self.shape))
    return base.QatState(latent=latent, scales={"alpha_out": a}, masks={})

  @classmethod
  def qat_weight(cls, meta, latent, scales, masks, sign, clip):
    del meta, masks
    first_scale = jnp.broadcast_to(scales["alpha_out"][None, :], latent.shape)
    return base.two_plane_weight(latent, first_scale, None, sign, clip)

  @classmethod
  def from_qat(cls, meta, latent, scales, masks):
    del meta, masks
    return cls(signs=np.asarray(latent >= 0), alpha_out=base.bf16(scales["alpha_out"]))


@jax.jit
def _xnor(kernel):
  signs, alpha = binarize_core.xnor(kernel)
  return XnorParts(signs=signs > 0, alpha_out=alpha.astype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class Xnor:
  """Sign and per-output-channel mean |W|."""
  name: ClassVar[str] = "xnor"
  parts_class: ClassVar[type] = XnorParts

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    parts = _xnor(kernel)
    w_hat = base.dequantize(parts)
    bits = bits_core.xnor_bits(*kernel.shape)
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, stats.h))

  def from_arrays(self, arrays: Mapping[str, Any]) -> XnorParts:
    return XnorParts(**arrays)
