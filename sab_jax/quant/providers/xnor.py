"""XNOR baseline (Rastegari et al. 2016, https://arxiv.org/abs/1603.05279).

`Ŵ = sign(W) · alpha_out`, `alpha_out[k] = mean_j |W[j, k]|` (stored in bf16); no
calibration, no compensation. Parts: signs [in,out] bool (True = +1), alpha_out [out] bf16.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sab_jax.quant.core import binarize_core, bits_core
from sab_jax.quant.providers import base


@jax.jit
def _xnor(kernel):
  signs, alpha = binarize_core.xnor(kernel)
  return {"signs": signs > 0, "alpha_out": alpha.astype(jnp.bfloat16)}


@jax.jit
def _dequantize(parts):
  return jnp.where(parts["signs"], 1.0, -1.0) * parts["alpha_out"].astype(jnp.float32)[None, :]


@dataclasses.dataclass(frozen=True)
class Xnor:
  """Sign and per-output-channel mean |W|."""
  name: ClassVar[str] = "xnor"

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    parts = _xnor(kernel)
    w_hat = _dequantize(parts)
    bits = bits_core.xnor_bits(*kernel.shape)
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, stats.h))

  def dequantize(self, parts: dict[str, jax.Array], n_in: int) -> jax.Array:
    del n_in
    return _dequantize(parts)
