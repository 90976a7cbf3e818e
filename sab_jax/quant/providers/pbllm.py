"""PB-LLM baseline (Shang et al. 2023, https://arxiv.org/abs/2310.00034).

Partial binarization: the `salient_fraction` most salient weights of each 128-input
block are kept as `salient_bits`-bit symmetric integers with a per-output-channel
scale (absmax over the block's salient entries), the rest are binarized with XNOR
scales (per output channel, mean |W| over the block's binarized entries). Saliency is
the Hessian criterion `W²/[H_F⁻¹]_jj` (PB-LLM's PTQ finding: Hessian beats magnitude),
and GPTQ compensation runs by default (PB-LLM's PTQ is built on GPTQ); with
`compensate=False` every block is quantized from the original weights.

Parts: salient_mask [in,out] bool, int_values [in,out] int8 (0 off the mask; int16
above 8 bits), int_scale [n_blocks,out] bf16, signs [in,out] bool (read off the mask),
alpha_out [n_blocks,out] bf16.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from sab_jax.quant.core import binarize_core, bits_core, gptq_core
from sab_jax.quant.providers import base

_ROW_PARTS = ("salient_mask", "int_values", "signs")


def _compose(parts):
  ints = parts["int_values"].astype(jnp.float32) * parts["int_scale"].astype(jnp.float32)[None, :]
  binary = jnp.where(parts["signs"], 1.0, -1.0) * parts["alpha_out"].astype(jnp.float32)[None, :]
  return jnp.where(parts["salient_mask"], ints, binary)


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


@functools.partial(jax.jit, static_argnames=("n_in", "block_size"))
def _dequantize(parts, *, n_in, block_size):
  return base.dequantize_blocks(parts, _compose, n_in=n_in, block_size=block_size,
                                row_parts=_ROW_PARTS)


@dataclasses.dataclass(frozen=True)
class PbLlm:
  """Salient weights at 8 bits, the rest binarized."""
  name: ClassVar[str] = "pbllm"
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
    parts = base.crop_rows(parts, n_in, _ROW_PARTS)
    w_hat = self.dequantize(parts, n_in)
    bits = bits_core.pbllm_bits(n_in, n_out, n_salient=int(jnp.sum(parts["salient_mask"])),
                                salient_bits=self.salient_bits,
                                n_blocks=len(bits_core.block_rows(n_in, self.block_size)))
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, h))

  def dequantize(self, parts: dict[str, jax.Array], n_in: int) -> jax.Array:
    return _dequantize(parts, n_in=n_in, block_size=self.block_size)
