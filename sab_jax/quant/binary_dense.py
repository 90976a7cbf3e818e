"""BinaryDense: a Dense layer trained through its binarization (quantization-aware distillation).

Built from a post-training binarization's typed parts (`providers.base.Parts`), it holds
  * `kernel`: the latent float weights (`Latent`, trainable), whose signs are the sign planes;
  * the layout's scales (`Scale`, trainable, float32 copies of the stored bf16), under
    their part names (`alpha_out`, `alpha_in`, `mu`, `int_scale`);
  * the layout's fixed structure (`Mask`: salient rows, group bitmap, PB-LLM's salient
    mask), NOT `nnx.Param`: never in the optimiser's `wrt`, so it stays as the PTQ chose it.
The forward is the layout's own (`Parts.qat_weight`): sign planes through the clipped
straight-through sign of `core.binarize_core.ste_sign` (window: `clip` times the row's
largest first-order scale), scales as they are; modes "train" and "eval" compute the same
values. The latent starts so that step 0 *is* the PTQ model (`Parts.qat_init`), and
`to_parts` gives the layout's parts of the current weights, for the exporter. This
module knows no method: every layout that defines the QAT form is covered.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sab_jax import distributed
from sab_jax.quant.core import binarize_core
from sab_jax.quant.providers import base

MODES = ("train", "eval")


class Latent(nnx.Param):
  """Latent float kernel of a binarized layer."""


class Scale(nnx.Param):
  """A trainable binarization scale."""


class Mask(nnx.Variable):
  """Fixed structure chosen by the PTQ (salient rows, group bitmap): never trained."""


class BinaryDense(nnx.Module):
  """A binarized Dense with trainable latent weights and scales; same call as `layers.Dense`."""

  def __init__(self, parts: base.Parts, *, bias: Any = None, dtype: Any = jnp.float32, clip: float = 1.0,
               mode: str = "train", axes: tuple[str | None, str | None] = ("embed", "mlp")):
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not in {MODES}")
    state = parts.qat_init()  # NotImplementedError names a layout without a QAT form
    self.layout, self.meta = type(parts), tuple(sorted(parts.meta().items()))
    self.dtype, self.clip, self.mode = dtype, clip, mode
    self.in_features, self.out_features = parts.shape
    self.scale_names, self.mask_names = tuple(state.scales), tuple(state.masks)
    for k, v in state.scales.items():
      setattr(self, k, Scale(jnp.asarray(v, jnp.float32)))
    for k, v in state.masks.items():
      setattr(self, k, Mask(jnp.asarray(v)))
    self.kernel = Latent(jnp.asarray(state.latent), out_sharding=tuple(axes), eager_sharding=False)
    self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

  def _variables(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    return ({k: getattr(self, k)[...] for k in self.scale_names},
            {k: getattr(self, k)[...] for k in self.mask_names})

  def weight(self) -> jax.Array:
    """Ŵ `[in, out]` from the current latent weights and scales."""
    scales, masks = self._variables()
    return self.layout.qat_weight(dict(self.meta), self.kernel[...].astype(jnp.float32), scales, masks,
                                  binarize_core.ste_sign, self.clip)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight()
    if self.mode == "eval":
      w = jax.lax.stop_gradient(w)
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def to_parts(self) -> base.Parts:
    """The layout's parts for the current weights (stored dtypes), for the exporter."""
    state = nnx.state(self)
    if distributed.spanning_leaf(state) is not None:
      local = nnx.clone(self)  # sharded across processes (FSDP over hosts): gather, then as one process
      nnx.update(local, jax.tree.map(lambda x: jnp.asarray(distributed.host_value(x)), state))
      return local.to_parts()
    scales, masks = self._variables()
    return self.layout.from_qat(dict(self.meta), jnp.asarray(self.kernel[...], jnp.float32),
                                {k: np.asarray(v, np.float32) for k, v in scales.items()},
                                {k: np.asarray(v) for k, v in masks.items()})
