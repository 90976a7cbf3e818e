"""PB-LLM baseline (Shang et al. 2023, https://arxiv.org/abs/2310.00034).

Partial binarization: the `salient_fraction` most salient weights of each 128-input
block are kept as `salient_bits`-bit symmetric integers with a per-output-channel
scale (absmax over the block's salient entries), the rest are binarized with XNOR
scales (per output channel, mean |W| over the block's binarized entries). Saliency is
the Hessian criterion `W²/[H_F⁻¹]_jj` (PB-LLM's PTQ finding: Hessian beats magnitude),
and GPTQ compensation runs by default (PB-LLM's PTQ is built on GPTQ); with
`compensate=False` every block is quantized from the original weights.

Parts: `PbLlmParts`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.quant.core import binarize_core, bits_core, gptq_core
from sab_jax.quant.providers import base

_ROW_PARTS = ("salient_mask", "int_values", "signs")


def _compose(parts):
  ints = parts["int_values"].astype(jnp.float32) * parts["int_scale"].astype(jnp.float32)[None, :]
  binary = jnp.where(parts["signs"], 1.0, -1.0) * parts["alpha_out"].astype(jnp.float32)[None, :]
  return jnp.where(parts["salient_mask"], ints, binary)


@jax.custom_vjp
def _ste_round(x: jax.Array) -> jax.Array:
  """round(x) with an identity gradient (the salient integers' straight-through estimator)."""
  return jnp.round(x)


_ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


@base.parts_dataclass(meta=("block_size", "salient_bits"))
class PbLlmParts(base.Parts):
  """Partially binarized kernel; B = ceil(in / block_size) blocks.

  salient_mask [in,out] bool   entries kept as integers
  int_values [in,out] int8     the integers (0 off the mask; int16 above 8 bits)
  int_scale [B,out] bf16       per block and output channel
  signs [in,out] bool          signs of the binarized entries (False on the mask)
  alpha_out [B,out] bf16       XNOR scale of the binarized entries per block and output
  block_size, salient_bits     static: rows per block, bits of the integers
  """
  salient_mask: Any
  int_values: Any
  int_scale: Any
  signs: Any
  alpha_out: Any
  block_size: int = 128
  salient_bits: int = 8
  POSITIONS = ("salient_mask",)

  def expected(self):
    n_in, n_out = self.shape
    b = -(-n_in // self.block_size)
    ints = np.int8 if self.salient_bits <= 8 else np.int16
    return {"salient_mask": ((n_in, n_out), np.bool_), "int_values": ((n_in, n_out), ints),
            "int_scale": ((b, n_out), jnp.bfloat16), "signs": ((n_in, n_out), np.bool_),
            "alpha_out": ((b, n_out), jnp.bfloat16)}

  def dequantize(self) -> jax.Array:
    return base.dequantize_blocks(self.arrays(), _compose, n_in=self.shape[0], block_size=self.block_size,
                                  row_parts=_ROW_PARTS)

  @classmethod
  def storage(cls, arrays: Mapping[str, Any]) -> dict[str, base.SparseRule]:
    """int_values: the mask's entries; signs: the other entries."""
    mask = lambda a, s: np.asarray(a["salient_mask"], bool)
    return {"int_values": (mask, 0), "signs": (lambda a, s: ~mask(a, s), False)}

  # --- quantization-aware form: binarized entries by a straight-through sign, salient ones
  # by a straight-through round onto the integer grid of their (trainable) scale.
  def qat_init(self) -> base.QatState:
    expand = lambda x: _per_row(np.asarray(x, np.float32), self.block_size, self.shape[0])
    mask = np.asarray(self.salient_mask, bool)
    ints = np.asarray(self.int_values).astype(np.float32) * expand(self.int_scale)
    binary = base.two_plane_latent(self.signs, expand(self.alpha_out))
    return base.QatState(latent=np.where(mask, ints, binary).astype(np.float32),
                         scales={"int_scale": np.asarray(self.int_scale, np.float32),
                                 "alpha_out": np.asarray(self.alpha_out, np.float32)},
                         masks={"salient_mask": mask})

  @classmethod
  def _ints(cls, meta, latent, int_scale):
    qmax = 2 ** (meta["salient_bits"] - 1) - 1
    scale = _per_row(int_scale, meta["block_size"], latent.shape[0])
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(_ste_round(latent / safe), -qmax, qmax), scale

  @classmethod
  def qat_weight(cls, meta, latent, scales, masks, sign, clip):
    ints, scale = cls._ints(meta, latent, scales["int_scale"])
    alpha = _per_row(scales["alpha_out"], meta["block_size"], latent.shape[0])
    binary = base.two_plane_weight(latent, alpha, None, sign, clip)
    return jnp.where(masks["salient_mask"], ints * scale, binary)

  @classmethod
  def from_qat(cls, meta, latent, scales, masks):
    stored = {k: base.bf16(v) for k, v in scales.items()}
    latent = jnp.asarray(latent, jnp.float32)
    ints, _ = cls._ints(meta, latent, jnp.asarray(stored["int_scale"], jnp.float32))
    mask = np.asarray(masks["salient_mask"], bool)
    dtype = np.int8 if meta["salient_bits"] <= 8 else np.int16
    return cls(salient_mask=mask, int_values=np.where(mask, np.asarray(ints), 0).astype(dtype),
               int_scale=stored["int_scale"], signs=np.asarray(latent >= 0) & ~mask,
               alpha_out=stored["alpha_out"], **meta)


def _per_row(x, block_size: int, n_in: int):
  """Per-block `[B, out]` -> per-row `[in, out]` (numpy in, numpy out; jax otherwise)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.repeat(x, block_size, axis=0)[:n_in]


def _block(w, d, valid, *, fraction, bits):
  """One block: top `fraction` of the valid entries by W²/d² at `bits` bits, rest binary."""
  rows, n_out = w.shape
  qmax = 2 ** (bits - 1) - 1
  k_max = max(1, round(fraction * rows * n_out))
  score = jnp.where(valid[:, None], jnp.square(w) / jnp.square(d)[:, None], -jnp.inf)
  _, idx = jax.lax.top_k(score.reshape(-1), k_max)
  # A partial (padded) last block keeps the same fraction of its real entries.
  k = jnp.round(fraction * jnp.sum(valid) * n_out).astype(jnp.int32)
  keep = jnp.arange(k_max) < jnp.maximum(k, 1)
  sal = jnp.zeros(rows * n_out, bool).at[idx].set(keep).reshape(w.shape) & valid[:, None]
  absmax = jnp.max(jnp.where(sal, jnp.abs(w), 0.0), axis=0)
  scale = binarize_core.bf16_round(absmax / qmax)
  safe = jnp.where(scale > 0, scale, 1.0)
  ints = jnp.where(sal, jnp.clip(jnp.round(w / safe[None, :]), -qmax, qmax), 0.0)
  rest = valid[:, None] & ~sal
  cnt = jnp.sum(rest, axis=0)
  alpha = jnp.sum(jnp.where(rest, jnp.abs(w), 0.0), axis=0) / jnp.maximum(cnt, 1)
  parts = {
      "salient_mask": sal,
      "int_values": ints.astype(jnp.int8 if bits <= 8 else jnp.int16),
      "int_scale": scale.astype(jnp.bfloat16),
      "signs": jnp.where(rest, w >= 0, False),
      "alpha_out": alpha.astype(jnp.bfloat16),
  }
  return jnp.where(valid[:, None], _compose(parts), 0.0), parts


@functools.partial(jax.jit, static_argnames=("block_size", "fraction", "bits", "compensate"))
def _pbllm(kernel, h, *, block_size, fraction, bits, compensate):
  u = gptq_core.hessian_inverse_cholesky(h)
  blk = functools.partial(_block, fraction=fraction, bits=bits)
  return gptq_core.gptq_quantize(kernel, u, blk, block_size=block_size, compensate=compensate)


@dataclasses.dataclass(frozen=True)
class PbLlm:
  """Salient weights at 8 bits, the rest binarized."""
  name: ClassVar[str] = "pbllm"
  parts_class: ClassVar[type] = PbLlmParts
  # Fraction of each block's weights kept at `salient_bits`.
  salient_fraction: float = 0.1
  # Bits of the kept salient weights (symmetric integers, at most 16).
  salient_bits: int = 8
  # Inputs per GPTQ block / scale sharing.
  block_size: int = 128
  # GPTQ compensation of each block's error into later inputs.
  compensate: bool = True

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    n_in, n_out = kernel.shape
    h = stats.h
    _, parts, _ = _pbllm(kernel, h, block_size=self.block_size, fraction=self.salient_fraction,
                      bits=self.salient_bits, compensate=self.compensate)
    parts = self.from_arrays(base.crop_rows(parts, n_in, _ROW_PARTS))
    w_hat = base.dequantize(parts)
    bits = bits_core.pbllm_bits(n_in, n_out, n_salient=int(jnp.sum(parts.salient_mask)),
                                salient_bits=self.salient_bits,
                                n_blocks=len(bits_core.block_rows(n_in, self.block_size)))
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, h))

  def from_arrays(self, arrays: Mapping[str, Any]) -> PbLlmParts:
    return PbLlmParts(**arrays, block_size=self.block_size, salient_bits=self.salient_bits)
