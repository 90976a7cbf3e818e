"""BiLLM baseline (Huang et al. 2024, https://arxiv.org/abs/2402.04291).

Per 128-input block under GPTQ compensation: the salient input channels (BiLLM's
"salient columns", ranked by the OBS saliency `Σ_k W[j,k]²/[H_F⁻¹]_jj` with the total H)
get 2nd-order residual binarization; the other channels are split by |W| into two
groups at the break point that minimises the error (bell-shaped split, searched over
quantiles of |W|). Every group uses BiLLM's binarizer `α·sign(W − μ) + μ` with
per-output-channel α and μ only (no per-input scale).

The number of salient channels is searched per block as BiLLM does (`salient_rows="search"`,
`binarize_core.search_salient_count`), or a fixed fraction.

Parts: `salient_split.SalientSplitParts` in "mean_offset" mode (signs: sign(W − μ) of
the entry's group; alpha_out and mu `[n_blocks, 4, out]`, components order1, order2, lo, hi).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from sab_jax.quant.providers import base, salient_split


@dataclasses.dataclass(frozen=True)
class BiLLM:
  """Residual-binarized salient channels + bell-shaped split, per-output scales."""
  name: ClassVar[str] = "billm"
  parts_class: ClassVar[type] = salient_split.SalientSplitParts
  # Input channels with 2nd-order residual binarization: "search" (per block, BiLLM's
  # structural search) or a fraction per block.
  salient_rows: float | str = "search"
  # Inputs per GPTQ block / scale sharing.
  block_size: int = 128

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    h = stats.h
    w_hat, parts, bits = salient_split.salient_split_ptq(
        kernel, h, jnp.ones(kernel.shape, jnp.float32), block_size=self.block_size,
        salient_rows=self.salient_rows, iters=0, mode="mean_offset", split=True)
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, h))

  def from_arrays(self, arrays: Mapping[str, Any]) -> salient_split.SalientSplitParts:
    block, _ = base.effective_blocks(arrays["signs"].shape[0], self.block_size, None)
    return salient_split.SalientSplitParts(**arrays, group=block, mode="mean_offset")
