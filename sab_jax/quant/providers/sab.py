"""SAB: significance-aware binarization (SAB-LVLM, arXiv 2607.01876), and ARB-RC.

Significance decides where the precision goes and how errors are weighed
(`significance="fisher"`, the default). The calibration pass first measures, on the
full-precision model, how much the answer loss feels each selected layer's outputs, per
modality (`calib.sensitivity`: true-Fisher gradients, each question weighing 1;
`base.OutputSensitivity`). To second order an error Δ of a kernel then costs
`ΔL ≈ ¼ Σ_k Δ_kᵀ (g_t[k] H_t + g_v[k] H_v) Δ_k`, in the same units in every layer, so:
  * across the model (`plan`, `salient_split.model_salient_budget`): the salient rows (each a
    residual plane with its scales) go to the layers and rows where they lower this loss most
    per stored bit, within the stored bits of the same fraction in every layer: a fixed
    `salient_rows` fraction, or the structured layout's 8% (`salient_budget="model"`);
  * within a layer (`fisher_objective`): GPTQ compensates with `ḡ_t H_t + ḡ_v H_v` (a modality
    the loss does not feel at a layer drops out, e.g. image tokens after the last layer that
    reaches an answer) and the ARB-RC fits weigh entry (j, k) by
    `Λ = (g_t[k] H_t[j,j] + g_v[k] H_v[j,j]) / (ḡ_t H_t[j,j] + ḡ_v H_v[j,j])`.
On the demo this is what separates SAB from ARB-RC and BiLLM at equal stored bits
(RESULTS.md, "Significance that allocates precision"); `significance="uniform"` (every output
felt alike: the same allocation by each layer's Hessian output error) shows the gradients
are what matters.

`significance="hessian"` is the paper as written (steps 2–5, `core.significance_core`): Λ per
kernel entry from the modality Hessians alone, `Λ^lambda_power` weighting the ARB-RC
alternating least squares, the salient input channels of each block ranked by
`Σ_k Λ^p[j,k]·W[j,k]²/[H_F⁻¹]_jj`. Its Λ is constant along each input row (W² cancels in the
modality ratio) and only re-weights the fits, which moves accuracy by less than the noise
over calibration draws. ARB-RC (ARB-LLM arXiv 2410.03129) is the same code path with Λ ≡ 1.

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
    (`salient_budget="group"`), that total spread over the layer's groups where a residual
    plane lowers the error most (`"layer"`: the same bits, 8–26% less layer error on 7B
    shapes, RESULTS.md), or the model's total spread over its layers (`"model"`, above).
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

SIGNIFICANCE = ("fisher", "hessian", "uniform")
# Salient rows per layer (a fraction of its rows) the unstructured layout's whole-model budget
# prices by default: a little under the stored bits of ARB-RC's searched counts on the demo (RESULTS.md).
UNSTRUCTURED_ROWS = 0.09


@jax.jit
def _fisher_objective(h_text, h_vis, grad_text, grad_vis, h_count):
  f_t, f_v = jnp.mean(grad_text), jnp.mean(grad_vis)
  total = f_t + f_v
  live = total > 0
  safe = jnp.where(live, total, 1.0)
  h = jnp.where(live, (f_t * h_text + f_v * h_vis) / safe, h_count)
  d_t, d_v = jnp.diag(h_text), jnp.diag(h_vis)
  num, den = base.entry_weight(grad_text, grad_vis, d_t, d_v), base.entry_weight(f_t, f_v, d_t, d_v)
  lam = jnp.where(live & (den > 0), num / jnp.where(den > 0, den, 1.0), 1.0)
  return h, lam


def fisher_objective(stats: base.LayerStats) -> tuple[jax.Array, jax.Array]:
  """(H, Λ) of the loss-calibrated objective Σ_k Δ_kᵀ (g_t[k] H_t + g_v[k] H_v) Δ_k.

  GPTQ needs one Hessian for every output, so it compensates with the outputs' mean
  `ḡ_t H_t + ḡ_v H_v` (normalised; a modality the loss does not feel here drops out of the
  compensation), and the per-output part goes into the ALS error weights
  `Λ[j,k] = (g_t[k] H_t[j,j] + g_v[k] H_v[j,j]) / (ḡ_t H_t[j,j] + ḡ_v H_v[j,j])` (mean 1 along
  a row). A layer the loss does not feel at all keeps the count-weighted Hessian and Λ ≡ 1.
  """
  sens = stats.sensitivity
  return _fisher_objective(stats.h_text, stats.h_vis, sens.grad_text, sens.grad_vis, stats.h)


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
  # ARB-LLM search it; 8% per scale group in the structured layout), a fraction per block
  # (or per scale group), or "auto": with the whole-model budget UNSTRUCTURED_ROWS of every
  # layer's rows (priced over the model, `plan`), else "search".
  salient_rows: float | str = "auto"
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
  # Structured mode: "group", the same salient-row count in every scale block; "layer", the
  # same total spread over the layer's scale blocks where a residual plane helps most; "model"
  # (significance "fisher" / "uniform"), the same stored bits as "layer" over the whole model,
  # spent on the rows whose residual plane lowers the loss most per bit (`plan`; also the
  # unstructured layout's, with a fixed fraction); "auto": "model" unless significance is
  # "hessian" (then "layer").
  salient_budget: str = "auto"
  # "fisher": the loss-calibrated map of `OutputSensitivity` (module doc); "hessian": the
  # paper's Λ from the modality Hessians alone (steps 2–5, the paper as written); "uniform":
  # the fisher code path with every output felt alike (ablation: what the gradients add).
  significance: str = "fisher"
  # Fisher pass: label draws per question, per-question normalisation, label seed.
  fisher_samples: int = 1
  fisher_normalize: str = "question"
  fisher_seed: int = 0

  def __post_init__(self):
    if self.significance not in SIGNIFICANCE:
      raise ValueError(f"significance={self.significance!r}: one of {SIGNIFICANCE}")
    if self.salient_budget not in ("auto", "model", "layer", "group"):
      raise ValueError(f"salient_budget={self.salient_budget!r}: 'auto', 'model', 'layer' or 'group'")
    if self._budget == "model" and self.significance == "hessian":
      raise ValueError("salient_budget='model' compares layers by their loss sensitivity: it needs "
                       "significance='fisher' (or its 'uniform' ablation)")
    if self._budget == "model" and self.layout_salient_rows == "search" and not self.structured:
      raise ValueError("salient_budget='model' prices a fixed salient_rows fraction over the model; searched "
                       "counts are decided per block (use salient_budget='layer' with salient_rows='search')")

  @property
  def _budget(self) -> str:
    if self.salient_budget == "auto":
      return "layer" if self.significance == "hessian" else "model"
    return self.salient_budget

  @property
  def layout_salient_rows(self) -> float | str:
    """`salient_rows` with "auto" resolved (what the layout uses)."""
    if self.salient_rows != "auto":
      return self.salient_rows
    return UNSTRUCTURED_ROWS if self._budget == "model" and not self.structured else "search"

  # --- the whole-model step (base.ModelPlanner) ---------------------------------------------
  def sensitivity_options(self) -> dict[str, Any] | None:
    if self.significance == "hessian":
      return None
    return {"samples": self.fisher_samples, "normalize": self.fisher_normalize, "seed": self.fisher_seed}

  def plan(self, kernels: Mapping[str, jax.Array], sensitivity: Mapping[str, base.OutputSensitivity]
           ) -> dict[str, Any]:
    """With `salient_budget="model"` (structured, or a fixed `salient_rows` fraction): each
    layer's salient-row count, the rows of largest loss gain per stored bit over the whole
    model, within the stored bits of every layer's own budget. Otherwise nothing to decide
    ahead (the searched counts are decided per block)."""
    if self._budget != "model":
      return {p: None for p in kernels}
    return salient_split.model_salient_budget(
        {p: (kernels[p], self._felt(sensitivity[p]).loss_weight()) for p in kernels}, block_size=self.block_size,
        scale_block=self.scale_block if self.structured else None, salient_rows=self.layout_salient_rows,
        salient_groups=self.salient_groups and not self.structured)

  def significance_map(self, kernel: jax.Array, stats: base.LayerStats) -> significance_core.Significance:
    """Steps 2–5: the significance map of this layer."""
    return _significance(kernel, stats.h_text, stats.h_vis, has_text=stats.n_text > 0,
                         has_vis=stats.n_vis > 0, salient_top_p=self.salient_top_p,
                         diff_quantile=self.diff_quantile)

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    if self.significance == "hessian":
      return self.binarize_with_lambda(kernel, stats, self.significance_map(kernel, stats).lam)
    if stats.sensitivity is None:
      raise ValueError("significance='fisher' needs the loss sensitivity of the layer's outputs, which the "
                       "calibration pass measures (calib.calibrate.binarize_model); for a lone kernel use "
                       "significance='hessian'")
    h, lam = fisher_objective(dataclasses.replace(stats, sensitivity=self._felt(stats.sensitivity)))
    return self.binarize_with_lambda(kernel, stats, lam, h=h, salient_total=stats.plan)

  def _felt(self, sens: base.OutputSensitivity) -> base.OutputSensitivity:
    return sens.uniform() if self.significance == "uniform" else sens

  def binarize_with_lambda(self, kernel: jax.Array, stats: base.LayerStats, lam: jax.Array, *,
                           h: jax.Array | None = None, salient_total: int | None = None) -> base.Binarized:
    """Step 6 with a given Λ `[in, out]` (Λ ≡ 1: ARB-RC), compensating with `h` (default: the
    count-weighted Hessian); `salient_total`: the structured layer's salient rows (`plan`)."""
    weight = lam if self.lambda_power == 1 else jnp.power(lam, self.lambda_power)
    budget = "layer" if self._budget == "model" else self._budget  # the plan's total, if any
    w_hat, parts, bits = salient_split.salient_split_ptq(
        kernel, stats.h if h is None else h, weight, block_size=self.block_size, salient_rows=self.layout_salient_rows,
        iters=self.iters, mode="rc", split=not self.structured,
        scale_block=self.scale_block if self.structured else None,
        refine=0 if self.structured else self.refine_iters,
        salient_groups=self.salient_groups and not self.structured, salient_budget=budget,
        salient_total=salient_total)
    # Errors on the count-weighted Hessian, the same yardstick for every method.
    return base.Binarized(w_hat, bits.nominal_bits, bits.stored_bits, parts,
                          base.error_metrics(kernel, w_hat, stats.h, weight))

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
  def layout_salient_rows(self) -> float | str:
    """`salient_rows` (as `Sab.layout_salient_rows`; ARB-RC has no "auto")."""
    return self.salient_rows

  @property
  def _sab(self) -> Sab:
    return Sab(salient_rows=self.salient_rows, block_size=self.block_size, iters=self.iters,
               refine_iters=self.refine_iters, salient_groups=self.salient_groups, structured=self.structured,
               scale_block=self.scale_block, salient_budget=self.salient_budget, significance="hessian")

  def __call__(self, kernel: jax.Array, stats: base.LayerStats) -> base.Binarized:
    return self._sab.binarize_with_lambda(kernel, stats, jnp.ones(kernel.shape, jnp.float32))

  def from_arrays(self, arrays: Mapping[str, Any]) -> salient_split.SalientSplitParts:
    return self._sab.from_arrays(arrays)
