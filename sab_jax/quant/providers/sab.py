"""SAB: significance-aware binarization (SAB-LVLM, arXiv 2607.01876), and ARB-RC.

Steps 2–5 (`core.significance_core`) give Λ per kernel entry; step 6 runs the
salient-row block quantizer under GPTQ compensation (`salient_split.salient_split_ptq`) with
the ARB-RC alternating least squares weighted by `Λ^lambda_power`, and the salient
input channels of each block ranked by `Σ_k Λ^p[j,k]·W[j,k]²/[H_F⁻¹]_jj` (the
Λ-weighted OBS saliency over the row, total H). ARB-RC (ARB-LLM arXiv 2410.03129) is
the same code path with Λ ≡ 1.

Error weight: Λ (lambda_power = 1) by default; Λ² is the ablation (the paper does not
say which it uses).

Parts: `salient_split.SalientSplitParts` in "rc" mode (alpha_out `[n_blocks, 6, out]`
and alpha_in `[in, 4]` with the split and two salient groups, `[n_blocks, 4, out]` and
`[in, 2]` with one; structured: no group_hi, alpha_out `[ceil(in/scale_block), 3, out]`).

Structured mode (`structured=True`), a layout that really stores ≤ 1.2 bits/weight:
  * salient structure is whole input channels (a flag per channel, no per-weight bitmap);
  * the non-salient channels form ONE group: no bell-shaped split, whose per-weight
    bitmap alone costs ~1 bit/weight (per-row alpha_in already absorbs the channel
    norms a channel-wise split could capture);
  * the three alpha_out vectors (order1, order2, rest) are shared by `scale_block`
    inputs and fitted (Λ-weighted ARB-RC) when GPTQ reaches that group, as GPTQ's
    `groupsize`; GPTQ still compensates every `block_size` inputs, and each row's
    alpha_in is the exact minimiser given alpha_out on the compensated weights;
  * the salient-row budget is `round(salient_rows · scale_block)` per group
    (`salient_budget="group"`) or, by default, that total spread over the layer's groups
    where a residual plane lowers the error most (`salient_budget="layer"`: the same bits,
    8–26% less layer error on 7B shapes, RESULTS.md).
  Stored bits/weight ≈ 1 (signs) + f_sal (residual plane) + 3·16/scale_block (alpha_out)
  + 16·(1 + f_sal)/out (alpha_in) + salient-row positions; with scale_block 512
  (41 salient rows per group): 1.175 on 4096×11008 and 1.182 on 11008×4096.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from sab_jax.quant.core import significance_core
from sab_jax.quant.providers import base, salient_split

_significance = jax.jit(significance_core.significance_map,
                        static_argnames=("has_text", "has_vis", "salient_top_p",
                                         "diff_quantile", "damp_ratio"))


@dataclasses.dataclass(frozen=True)
class Sab:
  """Significance-aware binarization."""
  name: ClassVar[str] = "sab"
  parts_class: ClassVar[type] = salient_split.SalientSplitParts
  # Fraction of weights that are salient in the significance partition (step 4).
  salient_top_p: float = 0.05
  # Quantile of the modality gap among salient weights separating cross-modal from
  # single-modality ones (step 4).
  diff_quantile: float = 0.5
  # ALS error weight is Λ**lambda_power (1: Λ, 2: Λ²).
  lambda_power: float = 1
  # Input channels with 2nd-order residual binarization: "search" (per block, as BiLLM /
  # ARB-LLM search it; 8% per scale group in the structured layout) or a fraction per block.
  salient_rows: float | str = "search"
  # Inputs per GPTQ block (and per alpha_out / salient-row budget when not structured).
  block_size: int = 128
  # ARB-RC alternating sweeps per group.
  iters: int = 15
  # Joint refinement sweeps of the salient rows' two planes (scales and signs, ARB-LLM's
  # "refine B"); 0: the plain residual fit. Unstructured layout only.
  refine_iters: int = 15
  # Split each block's salient entries by magnitude into two groups, each with its own two
  # planes' scales (ARB-LLM's `--order2_group`): 27% less layer error than one group on the
  # reference layers for +0.29 stored bits/weight (RESULTS.md). Unstructured layout only.
  salient_groups: bool = True
  # Store ≤ 1.2 bits/weight: no per-weight bitmaps, coarser alpha_out (module doc).
  structured: bool = False
  # Structured mode: inputs sharing alpha_out and a salient-row budget (multiple of
  # block_size; GPTQ still compensates every block_size inputs).
  scale_block: int = 512
  # Structured mode: "group", the same salient-row count in every scale block, or "layer",
  # the same total spread over the layer's scale blocks where a residual plane helps most.
  salient_budget: str = "layer"

  def significance(self, kernel: jax.Array, stats: base.LayerStats) -> significance_core.Significance:
    """Steps 2–5: the significance map of this layer."""
    return _significance(kernel, stats.h_text, stats.h_vis, has_text=stats.n_text > 0,
                         has_vis=stats.n_vis > 0, salient_top_p=self.salient_top_p,
                         diff_quantile=self.diff_quantile)

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    return self.binarize_with_lambda(kernel, stats, self.significance(kernel, stats).lam)

  def binarize_with_lambda(self, kernel: jax.Array, stats: base.LayerStats,
                           lam: jax.Array) -> base.Binarized:
    """Step 6 with a given Λ `[in, out]` (Λ ≡ 1: ARB-RC)."""
    weight = lam if self.lambda_power == 1 else jnp.power(lam, self.lambda_power)
    h = stats.h
    w_hat, parts, bits = salient_split.salient_split_ptq(
        kernel, h, weight, block_size=self.block_size, salient_rows=self.salient_rows,
        iters=self.iters, mode="rc", split=not self.structured,
        scale_block=self.scale_block if self.structured else None,
        refine=0 if self.structured else self.refine_iters,
        salient_groups=self.salient_groups and not self.structured, salient_budget=self.salient_budget)
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, h, weight))

  def from_arrays(self, arrays: Mapping[str, Any]) -> salient_split.SalientSplitParts:
    n_in = arrays["signs"].shape[0]
    _, group = base.effective_blocks(n_in, self.block_size, self.scale_block if self.structured else None)
    return salient_split.SalientSplitParts(**arrays, group=group, mode="rc")


@dataclasses.dataclass(frozen=True)
class ArbRc:
  """ARB-RC with BiLLM-style salient rows and GPTQ: SAB's code path with Λ ≡ 1."""
  name: ClassVar[str] = "arb_rc"
  parts_class: ClassVar[type] = salient_split.SalientSplitParts
  # Input channels with 2nd-order residual binarization ("search" or a fraction; as Sab).
  salient_rows: float | str = "search"
  # Inputs per GPTQ block / alpha_out sharing.
  block_size: int = 128
  # Alternating sweeps per group.
  iters: int = 15
  # Joint refinement sweeps of the salient rows' planes (as Sab).
  refine_iters: int = 15
  # Two salient groups per block (as Sab).
  salient_groups: bool = True
  # Sab's <= 1.2-stored-bit layout (for comparisons at matched stored bits).
  structured: bool = False
  # Structured mode: inputs sharing alpha_out.
  scale_block: int = 512
  # Structured mode: where the salient-row budget goes (as Sab).
  salient_budget: str = "layer"

  @property
  def _sab(self) -> Sab:
    return Sab(salient_rows=self.salient_rows, block_size=self.block_size, iters=self.iters,
               refine_iters=self.refine_iters, salient_groups=self.salient_groups, structured=self.structured,
               scale_block=self.scale_block, salient_budget=self.salient_budget)

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    return self._sab.binarize_with_lambda(kernel, stats, jnp.ones(kernel.shape, jnp.float32))

  def from_arrays(self, arrays: Mapping[str, Any]) -> salient_split.SalientSplitParts:
    return self._sab.from_arrays(arrays)
