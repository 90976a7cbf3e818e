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

Significance (optional): the layer may carry the per-weight significance map the
calibration pass measured (`OutputSensitivity`: its `[in]` and `[out]` factors, `Significance`
variables, O(in + out)), s[j,k] = the loss cost of a unit² error of weight (j,k). With
`significance_power` γ ≠ 0 the latent is reparametrised as w = m ⊙ u, u trained, m ∝
clip((s / geomean s)^γ, 1/MAX_STEP_RATIO, MAX_STEP_RATIO) with mean 1 (`step_multiplier`):
Adam moves every entry of u by about the learning rate whatever its gradient's scale, so
weight (j,k) moves m[j,k] times as fast — γ > 0 lets the significant weights move (the
others up to 64x slower), γ < 0 protects them. (Scaling the gradient instead would do
nothing: Adam divides it out.) On the demo it does not beat a tuned learning rate, and a
shuffled map does as well (RESULTS.md), so distillation leaves it off by default.
"""

from __future__ import annotations

import math
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


class Significance(nnx.Variable):
  """Factors of the layer's significance map (per modality, inputs' and outputs'): never trained."""


# Largest per-weight step ratio (either way) the significance gives a weight over the layer's typical one.
MAX_STEP_RATIO = 8.0


def step_multiplier(significance: jax.Array, power: float) -> jax.Array:
  """m ∝ clip((s / geomean s)^power, 1/MAX_STEP_RATIO, MAX_STEP_RATIO), scaled to mean 1 over
  the layer's entries, so the layer's average step is the learning rate's, as without the map
  (s floored at 1e-8 of its largest entry: an entry no calibration token reached moves least)."""
  s = significance.astype(jnp.float32)
  log_s = jnp.log(jnp.maximum(s, 1e-8 * jnp.maximum(jnp.max(s), 1e-30)))
  bound = math.log(MAX_STEP_RATIO)
  m = jnp.exp(jnp.clip(power * (log_s - jnp.mean(log_s)), -bound, bound))
  return m / jnp.mean(m)


class BinaryDense(nnx.Module):
  """A binarized Dense with trainable latent weights and scales; same call as `layers.Dense`."""

  def __init__(self, parts: base.Parts, *, bias: Any = None, dtype: Any = jnp.float32, clip: float = 1.0,
               mode: str = "train", axes: tuple[str | None, str | None] = ("embed", "mlp"),
               significance: base.OutputSensitivity | None = None, significance_power: float = 0.0):
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not in {MODES}")
    if significance_power and significance is None:
      raise ValueError(f"significance_power={significance_power} needs the layer's significance (measured by "
                       "calib.sensitivity on the full-precision model)")
    state = parts.qat_init()  # NotImplementedError names a layout without a QAT form
    self.layout, self.meta = type(parts), tuple(sorted(parts.meta().items()))
    self.dtype, self.clip, self.mode = dtype, clip, mode
    self.in_features, self.out_features = parts.shape
    self.scale_names, self.mask_names = tuple(state.scales), tuple(state.masks)
    for k, v in state.scales.items():
      setattr(self, k, Scale(jnp.asarray(v, jnp.float32)))
    for k, v in state.masks.items():
      setattr(self, k, Mask(jnp.asarray(v)))
    self.significance_power = float(significance_power)
    sig = significance
    if sig is not None and (sig.diag_text.shape, sig.grad_text.shape) != ((self.in_features,), (self.out_features,)):
      raise ValueError(f"the significance is for a {sig.diag_text.shape + sig.grad_text.shape} kernel, the parts "
                       f"for {parts.shape}")
    stack = lambda *a: Significance(jnp.stack(a).astype(jnp.float32))
    self.sig_in, self.sig_out = ((None, None) if sig is None else  # [2, in] and [2, out]: text, image
                                 (stack(sig.diag_text, sig.diag_vis), stack(sig.grad_text, sig.grad_vis)))
    latent = jnp.asarray(state.latent)
    if self.significance_power:
      latent = latent / self._step()  # m > 0: the same signs, so step 0 is still the PTQ layer
    self.kernel = Latent(latent, out_sharding=tuple(axes), eager_sharding=False)
    self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

  def significance_map(self) -> jax.Array | None:
    """s `[in, out]`: a unit² error of weight (j,k) costs the loss s[j,k] (`OutputSensitivity.loss_weight`)."""
    if self.sig_in is None:
      return None
    d, g = self.sig_in[...], self.sig_out[...]
    return base.entry_weight(g[0], g[1], d[0], d[1])

  def _step(self) -> jax.Array:
    return step_multiplier(self.significance_map(), self.significance_power)

  def latent(self) -> jax.Array:
    """The latent weights w (float32) whose signs are the sign planes: m ⊙ u with a significance step."""
    w = self.kernel[...].astype(jnp.float32)
    return w * self._step() if self.significance_power else w

  def _variables(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    return ({k: getattr(self, k)[...] for k in self.scale_names},
            {k: getattr(self, k)[...] for k in self.mask_names})

  def weight(self) -> jax.Array:
    """Ŵ `[in, out]` from the current latent weights and scales."""
    scales, masks = self._variables()
    return self.layout.qat_weight(dict(self.meta), self.latent(), scales, masks, binarize_core.ste_sign, self.clip)

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
    return self.layout.from_qat(dict(self.meta), self.latent(),
                                {k: np.asarray(v, np.float32) for k, v in scales.items()},
                                {k: np.asarray(v) for k, v in masks.items()})
