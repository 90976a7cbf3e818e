"""BinaryDense: a Dense layer trained through its binarization (quantization-aware distillation).

Built from a post-training binarization (the parts of `providers.xnor` / `sab` / `arb_rc`,
structured or not), it holds
  * `kernel`: the latent float weights (`Latent`, trainable), whose signs are the sign planes;
  * the scales α_in / α_out (`Scale`, trainable, float32 copies of the stored bf16);
  * the salient-row flags and the group bitmap (`Mask`, NOT `nnx.Param`: never in the
    optimiser's `wrt`, so they receive no gradient and stay as the PTQ chose them).
Forward (mode "train" and "eval" compute the same values):

  XNOR:      Ŵ = B1 ⊙ α_out
  ARB-RC/SAB: per input row r in scale block g,
    salient rows: α_in[r,0]·B1·α_out[g,0] + α_in[r,1]·B2·α_out[g,1],
                  B2 = sign(latent − first-order term)   (residual binarization)
    other rows:   α_in[r,0]·B1·α_out[g,2]  (or, where the split's group bitmap is set,
                  α_in[r,1]·B1·α_out[g,3])

with B1 = sign(latent). In "train" mode the signs pass gradients straight through,
clipped: ∂sign(w)/∂w = 1 for |w| ≤ `clip`·(the row's largest first-order scale), else 0.
The latent starts so that its signs reproduce the PTQ's sign planes exactly, so the
student begins as the PTQ model (`init_latent`). The packed mode is
`sab_jax.models.packed.PackedDense`, built from the export that `to_parts` feeds.

BiLLM's mean-offset binarizer and PB-LLM are not covered (distil from xnor, arb_rc or sab).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sab_jax import distributed

MODES = ("train", "eval")


class Latent(nnx.Param):
  """Latent float kernel of a binarized layer."""


class Scale(nnx.Param):
  """A trainable binarization scale."""


class Mask(nnx.Variable):
  """Fixed structure chosen by the PTQ (salient rows, group bitmap): never trained."""


@jax.custom_vjp
def ste_sign(x: jax.Array, clip: jax.Array) -> jax.Array:
  """sign(x) (sign(0) = +1) with the clipped straight-through gradient 1_{|x| ≤ clip}."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _ste_fwd(x, clip):
  return ste_sign(x, clip), (x, clip)


def _ste_bwd(res, g):
  x, clip = res
  return g * (jnp.abs(x) <= clip).astype(g.dtype), jnp.zeros_like(clip)


ste_sign.defvjp(_ste_fwd, _ste_bwd)


def supports(provider: Any) -> bool:
  return getattr(provider, "name", None) in ("xnor", "sab", "arb_rc")


def _group(provider: Any, n_in: int) -> int:
  from sab_jax.quant.providers import base
  if provider.name == "xnor":
    return n_in
  return base.effective_blocks(n_in, provider.block_size,
                               provider.scale_block if provider.structured else None)[1]


class BinaryDense(nnx.Module):
  """A binarized Dense with trainable latent weights and scales; same call as `layers.Dense`."""

  def __init__(self, provider: Any, parts: Mapping[str, Any], kernel_shape: tuple[int, int], *,
               bias: Any = None, dtype: Any = jnp.float32, clip: float = 1.0, mode: str = "train",
               axes: tuple[str | None, str | None] = ("embed", "mlp")):
    if not supports(provider):
      raise ValueError(f"BinaryDense covers xnor, sab and arb_rc, not {provider!r}; distil from one of those")
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not in {MODES}")
    self.provider, self.dtype, self.clip, self.mode = provider, dtype, clip, mode
    self.in_features, self.out_features = n_in, n_out = kernel_shape
    self.group = _group(provider, n_in)
    self.xnor = provider.name == "xnor"
    p = {k: np.asarray(v) for k, v in parts.items()}
    shard = dict(out_sharding=tuple(axes), eager_sharding=False)
    if self.xnor:
      self.alpha_out = Scale(jnp.asarray(p["alpha_out"], jnp.float32)[None, None, :])  # [1 block, 1, out]
      self.alpha_in = None
      self.salient_rows = self.group_hi = None
    else:
      self.alpha_out = Scale(jnp.asarray(p["alpha_out"], jnp.float32))  # [blocks, C, out]
      self.alpha_in = Scale(jnp.asarray(p["alpha_in"], jnp.float32))    # [in, 2]
      self.salient_rows = Mask(jnp.asarray(p["salient_rows"], bool))
      self.group_hi = Mask(jnp.asarray(p["group_hi"], bool)) if "group_hi" in p else None
    self.kernel = Latent(jnp.asarray(init_latent(self, p)), **shard)
    self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

  # --- the binarized kernel -----------------------------------------------------------
  def _blocks(self, x: jax.Array) -> jax.Array:
    """[in, ...] -> [blocks, group, ...] (rows padded with zeros)."""
    nb = math.ceil(self.in_features / self.group)
    x = jnp.pad(x, ((0, nb * self.group - self.in_features),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((nb, self.group) + x.shape[1:])

  def _terms(self, s1: jax.Array, a_in: jax.Array | None = None, a_out: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """(first-order term [in, out], α_in1·α_out1 per entry [in, out] for the residual),
    with the layer's scales unless others are given."""
    a_out = self.alpha_out[...] if a_out is None else a_out
    nb = a_out.shape[0]
    n = nb * self.group
    if self.xnor:
      return s1 * a_out[0, 0][None, :], jnp.zeros_like(s1)
    a_in = self._blocks(self.alpha_in[...] if a_in is None else a_in)  # [nb, group, 2]
    sal = self._blocks(self.salient_rows[...])[..., None]       # [nb, group, 1]
    s = self._blocks(s1)                                        # [nb, group, out]
    first_sal = a_in[..., 0:1] * a_out[:, None, 0, :]
    rest = a_in[..., 0:1] * a_out[:, None, 2, :]
    if self.group_hi is not None:
      hi = self._blocks(self.group_hi[...])
      rest = jnp.where(hi, a_in[..., 1:2] * a_out[:, None, 3, :], rest)
    first = s * jnp.where(sal, first_sal, rest)
    second = jnp.where(sal, a_in[..., 1:2] * a_out[:, None, 1, :], 0.0)
    crop = lambda t: t.reshape(n, -1)[:self.in_features]
    return crop(first), crop(second)

  def weight(self) -> jax.Array:
    """Ŵ `[in, out]` from the current latent weights and scales."""
    w = self.kernel[...].astype(jnp.float32)
    # The first-order term is linear in the signs: build its scale matrix once.
    first_scale, second_scale = self._terms(jnp.ones_like(w))
    clip = self.clip * jnp.max(jnp.abs(first_scale), axis=1, keepdims=True)
    s1 = ste_sign(w, jax.lax.stop_gradient(clip))
    first = s1 * first_scale
    if self.xnor:
      return first
    s2 = ste_sign(w - first, jax.lax.stop_gradient(clip))
    return first + s2 * second_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight()
    if self.mode == "eval":
      w = jax.lax.stop_gradient(w)
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  # --- export ---------------------------------------------------------------------------
  def to_parts(self) -> dict[str, np.ndarray]:
    """The provider's parts for the current weights (bf16 scales), for `export.export`."""
    state = nnx.state(self)
    if distributed.spanning_leaf(state) is not None:
      local = nnx.clone(self)  # sharded across processes (FSDP over hosts): gather, then as one process
      nnx.update(local, jax.tree.map(lambda x: jnp.asarray(distributed.host_value(x)), state))
      return local.to_parts()
    w = jnp.asarray(self.kernel[...], jnp.float32)
    s1 = jnp.where(w >= 0, 1.0, -1.0)
    bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16))
    if self.xnor:
      return {"signs": np.asarray(s1 > 0), "alpha_out": bf(self.alpha_out[...][0, 0])}
    sal = np.asarray(self.salient_rows[...])
    a_in = np.asarray(self.alpha_in[...], np.float32).copy()
    structured = self.group_hi is None and self.provider.structured
    if structured:
      a_in[~sal, 1] = 1.0  # the layout's fill: slot 1 is unused off the salient rows
    # the residual sign against the first-order term built from the rounded scales
    first, _ = self._terms(s1, jnp.asarray(bf(a_in), jnp.float32), jnp.asarray(bf(self.alpha_out[...]), jnp.float32))
    parts = {"signs": np.asarray(s1 > 0), "residual_signs": np.asarray((w - first) >= 0) & sal[:, None],
             "salient_rows": sal, "alpha_in": bf(a_in), "alpha_out": bf(self.alpha_out[...])}
    if self.group_hi is not None:
      parts["group_hi"] = np.asarray(self.group_hi[...])
    return parts


def init_latent(layer: BinaryDense, parts: Mapping[str, np.ndarray]) -> np.ndarray:
  """Latent weights whose signs give exactly the PTQ's sign planes.

  Per entry, with A = |first-order term| and B = |residual term| of the PTQ:
  latent = s1·A (+ s2·min(B, A/2) on salient rows), floored away from 0. Then
  sign(latent) = s1, and latent − s1·A = s2·min(B, A/2) has sign s2.
  """
  s1 = jnp.where(jnp.asarray(parts["signs"]), 1.0, -1.0)
  first, second_scale = layer._terms(s1)
  a = jnp.maximum(jnp.abs(first), 1e-8)
  lat = s1 * a
  if not layer.xnor:
    s2 = jnp.where(jnp.asarray(parts["residual_signs"]), 1.0, -1.0)
    lat = lat + s2 * jnp.maximum(jnp.minimum(second_scale, a / 2), 1e-9) * (second_scale > 0)
  return np.asarray(lat, np.float32)
