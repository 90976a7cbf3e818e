"""What every post-training binarization method takes and returns.

A provider is a frozen dataclass (its knobs are fields) called as
`provider(kernel, stats) -> Binarized` on one Dense kernel (Flax layout `[in, out]`)
with the calibration statistics of that layer's inputs. This file also holds the
plumbing BiLLM, ARB-RC and SAB share: the GPTQ loop around the salient-row block
quantizer of `core.binarize_core`, and its dequantizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from sab_jax.quant.core import binarize_core, bits_core, gptq_core


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration statistics of one Dense layer's inputs (float32)."""
  h_text: jax.Array  # [in, in] = 2/N_t Σ_text x xᵀ (zeros if N_t == 0)
  h_vis: jax.Array   # [in, in] = 2/N_v Σ_image x xᵀ (zeros if N_v == 0)
  n_text: int
  n_vis: int

  @property
  def h(self) -> jax.Array:
    """Count-weighted `(N_t H_t + N_v H_v)/(N_t + N_v)` = 2/N Σ_all x xᵀ (zeros if N = 0)."""
    n = self.n_text + self.n_vis
    if n == 0:
      return jnp.zeros_like(self.h_text, dtype=jnp.float32)
    return (self.n_text * self.h_text.astype(jnp.float32)
            + self.n_vis * self.h_vis.astype(jnp.float32)) / n


@dataclasses.dataclass
class Binarized:
  """One binarized kernel."""
  w_hat: jax.Array               # [in, out] dequantized kernel, Flax layout, float32
  nominal_bits: float            # bits/weight as the papers count them
  stored_bits: int               # every stored bit (signs, bitmaps, residual planes, scales, flags)
  parts: dict[str, jax.Array]    # what an exporter stores to rebuild w_hat exactly (per method)
  error: dict[str, float]        # mse, weighted_mse, output_mse, output_rel

  @property
  def bits_per_weight(self) -> float:
    return bits_core.bits_per_weight(self.stored_bits, self.w_hat.shape)


class Provider(Protocol):
  """A post-training binarization method."""
  name: str

  def __call__(self, kernel: jax.Array, stats: LayerStats) -> Binarized:
    ...


@jax.jit
def _errors(w, w_hat, h, weight):
  e = w.astype(jnp.float32) - w_hat
  return (jnp.mean(jnp.square(e)), jnp.mean(weight * jnp.square(e)),
          gptq_core.output_error(w, w_hat, h), gptq_core.output_error(w, jnp.zeros_like(w_hat), h))


def error_metrics(w: jax.Array, w_hat: jax.Array, h: jax.Array,
                  weight: jax.Array | None = None) -> dict[str, float]:
  """Errors of Ŵ.

  mse: mean (W − Ŵ)². weighted_mse: mean weight·(W − Ŵ)² (= mse without a weight).
  output_mse: tr(EᵀHE)/(2·out) = mean over calibration tokens and outputs of (x E)²
  (H = 2/N Σ x xᵀ). output_rel: tr(EᵀHE)/tr(WᵀHW) = ‖X(W − Ŵ)‖²/‖XW‖² (nan if H = 0).
  """
  mse, wmse, num, den = map(float, _errors(w, w_hat, h, 1.0 if weight is None else weight))
  return {"mse": mse, "weighted_mse": wmse, "output_mse": num / (2 * w.shape[1]),
          "output_rel": num / den if den > 0 else math.nan}


# ---------------------------------------------------------------------------
# Shared by BiLLM, ARB-RC and SAB
# ---------------------------------------------------------------------------

# Parts indexed by input row (leading axis `in`); the others are per block.
_ROW_PARTS = ("signs", "residual_signs", "salient_rows", "group_hi", "alpha_in")


@functools.partial(jax.jit, static_argnames=("block_size", "n_salient", "iters", "mode", "split",
                                             "group_size"))
def _salient_split_ptq(kernel, h, weight, *, block_size, n_salient, iters, mode, split, group_size):
  u = gptq_core.hessian_inverse_cholesky(h)
  if group_size is not None:
    def prepare(w_grp, d, valid, weight_grp):
      return binarize_core.structured_prepare(w_grp, weight_grp, d, valid, n_salient=n_salient,
                                              iters=iters)

    def structured_block(w_blk, d, valid, weight_blk, *, state, offset):
      return binarize_core.structured_block(w_blk, weight_blk, d, valid, state=state,
                                            offset=offset)

    _, parts, state = gptq_core.gptq_quantize(
        kernel, u, structured_block, block_size=block_size, aux=(weight,),
        group_size=group_size, prepare_group=prepare)
    return dict(parts, alpha_out=state["alpha_out"])

  def quantize_block(w_blk, d, valid, weight_blk):
    return binarize_core.salient_split_block(
        w_blk, weight_blk, d, valid, n_salient=n_salient, iters=iters, mode=mode, split=split)

  _, parts, _ = gptq_core.gptq_quantize(kernel, u, quantize_block, block_size=block_size,
                                        aux=(weight,))
  return parts


def dequantize_blocks(parts: dict[str, jax.Array], compose, *, n_in: int, block_size: int,
                      row_parts: tuple[str, ...]) -> jax.Array:
  """Rebuild Ŵ `[in, out]` by applying a block's `compose(parts) -> Ŵ_blk` to every block.

  `row_parts` name the leaves indexed by input row (`[in, ...]`); the other leaves have a
  leading `[n_blocks]` axis.
  """
  nb = math.ceil(n_in / block_size)
  pad = nb * block_size - n_in

  def blocks(k, x):
    if k not in row_parts:
      return x
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((nb, block_size) + x.shape[1:])

  w = jax.vmap(compose)({k: blocks(k, v) for k, v in parts.items()})
  return w.reshape(nb * block_size, -1)[:n_in]


def crop_rows(parts: dict[str, jax.Array], n_in: int, row_parts: tuple[str, ...]) -> dict[str, jax.Array]:
  """Flatten the `[n_blocks, block, ...]` row leaves of stacked parts to `[in, ...]`."""
  return {k: (v.reshape((-1,) + v.shape[2:])[:n_in] if k in row_parts else v)
          for k, v in parts.items()}


@functools.partial(jax.jit, static_argnames=("n_in", "block_size", "mode"))
def dequantize_salient_split(parts: dict[str, jax.Array], *, n_in: int, block_size: int,
                             mode: str) -> jax.Array:
  """Rebuild Ŵ `[in, out]` from the parts of `salient_split_ptq` (the exporter's view)."""
  return dequantize_blocks(parts, lambda p: binarize_core.compose_salient_split(p, mode),
                           n_in=n_in, block_size=block_size, row_parts=_ROW_PARTS)


def effective_blocks(n_in: int, block_size: int, scale_block: int | None) -> tuple[int, int]:
  """(GPTQ block, scale group) actually used: a layer narrower than a block or group is
  one block / group of its own size, so the salient-row budget stays a fraction of the
  real rows."""
  block = min(block_size, n_in)
  if scale_block is None:
    return block, block
  return block, min(scale_block, math.ceil(n_in / block) * block)


def salient_split_ptq(kernel: jax.Array, h: jax.Array, weight: jax.Array, *, block_size: int,
                      salient_rows: float, iters: int, mode: str, split: bool,
                      scale_block: int | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array], bits_core.BitCount]:
  """GPTQ loop around the salient-row block quantizers of `binarize_core`.

  Args:
    kernel: `[in, out]`.
    h: `[in, in]` Hessian used for compensation and the salient-row ranking.
    weight: `[in, out]` error weights of the ALS (Λ^p or ones).
    block_size: inputs per GPTQ block; also the salient-row budget and alpha_out sharing
      unless `scale_block` is given.
    salient_rows: fraction of each block's (or scale block's) inputs that get a residual
      plane; `round(salient_rows · rows)` rows (at least 1).
    iters: ARB-RC sweeps.
    mode: "rc" or "mean_offset".
    split: bell-shaped split of the non-salient rows.
    scale_block: structured mode (mode "rc", no split): salient rows and alpha_out are
      chosen per `scale_block` inputs (a multiple of `block_size`), alpha_in per row.
    Sizes above the layer's are clamped (`effective_blocks`).

  Returns:
    (Ŵ rebuilt from the parts, parts with row parts cropped to `[in, ...]`, bit count).
  """
  n_in, n_out = kernel.shape
  if scale_block is not None and (mode != "rc" or split):
    raise ValueError("scale_block (structured mode) needs mode='rc' and split=False")
  block_size, group = effective_blocks(n_in, block_size, scale_block)
  n_salient = max(1, min(group, round(salient_rows * group)))
  parts = _salient_split_ptq(kernel, h, weight, block_size=block_size, n_salient=n_salient,
                             iters=iters, mode=mode, split=split,
                             group_size=None if scale_block is None else group)
  parts = crop_rows(parts, n_in, _ROW_PARTS)
  w_hat = dequantize_salient_split(parts, n_in=n_in, block_size=group, mode=mode)
  rows = bits_core.block_rows(n_in, group)
  sal = jax.device_get(parts["salient_rows"])
  per_block = [int(sal[i * group:i * group + r].sum()) for i, r in enumerate(rows)]
  bits = bits_core.salient_split_bits(n_in, n_out, block_rows=rows, salient_per_block=per_block,
                                      mode=mode, split=split)
  return w_hat, parts, bits
