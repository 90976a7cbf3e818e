"""SAB's significance map Λ (steps 2–5 of DESIGN.md, SAB-LVLM arXiv 2607.01876).

Per modality m ∈ {text, vision}: OBS saliency `S_m[j,k] = W[j,k]² / [H_m⁻¹]_jj²`
(j = input channel, Flax layout `[in, out]`), normalised to sum 1 over the layer. The
Hoyer sparsity of the pair `s = (S_text, S_vis)`,
`ρ = (√2 − ‖s‖₁/‖s‖₂)/(√2 − 1)`, is 1 when one modality owns the weight and 0 when
both weigh it equally. `Λ = r·ρ + (1 − r)·(1 − ρ)`, with `r` the share of the layer's
total significance held by single-modality salient weights.

Choices made here (the paper leaves them open):
  * `[H_m⁻¹]` is the inverse of `H_m` damped by `0.01·mean(diag H_m)` (as GPTQ).
  * A modality with no tokens (`N_m = 0`) has `S_m ≡ 0`. Then ρ = 1 wherever W ≠ 0, every
    salient weight is single-modality, and Λ is a constant (= r), which leaves the
    binarization identical to ARB-RC up to float rounding (the ALS updates and the
    salient-row ranking are invariant to a constant weight).
  * 0/0 cases: ρ(0, 0) = 0 ("both equal"); the gap of a weight with S_t + S_v = 0 is 0;
    r = 0 when the layer has no significance at all.
  * Salient = exactly `ceil(salient_top_p · N)` weights with the largest S_t + S_v.
  * Partition rule: gap `g = |S_t − S_v|/(S_t + S_v)` ∈ [0, 1]; `τ` = the
    `diff_quantile` quantile (linear interpolation) of g over the salient weights. A
    salient weight is single-modality iff `g ≥ τ and g > 0` (the `g > 0` keeps exact
    ties of two identical modalities cross-modal); among those, text-only iff
    S_t > S_v, vision-only iff S_v > S_t. Every other salient weight is cross-modal.
  * `r = Σ_{single-modality salient}(S_t + S_v) / Σ_{all weights}(S_t + S_v)`: the
    denominator is the layer's total significance, as the paper's wording reads.

The squared inverse diagonal is the formula as the paper writes it. (BiLLM's code
divides by the squared diagonal of the Cholesky factor `U` of H⁻¹, and `U_jj²` is the
conditional `[H_F⁻¹]_jj`, so its column ranking is the classical OBS `w²/[H⁻¹]_jj`;
that is what the salient-row ranking inside the GPTQ loop uses.)

Note: since both S_m share the factor W², the ratio S_t/S_v, hence ρ and g, depends
on the input channel j only (for W ≠ 0): Λ is constant along each kernel row.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_SQRT2 = math.sqrt(2.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Significance:
  """The significance map of one layer; all arrays `[in, out]` unless noted."""
  s_text: jax.Array     # normalised OBS saliency from text tokens (sums to 1, or all 0)
  s_vis: jax.Array      # same for image tokens
  rho: jax.Array        # Hoyer sparsity of (s_text, s_vis), in [0, 1]
  lam: jax.Array        # Λ = r·ρ + (1 − r)(1 − ρ)
  salient: jax.Array    # bool, top salient_top_p of s_text + s_vis
  text_only: jax.Array  # bool, salient and single-modality with s_text > s_vis
  vis_only: jax.Array   # bool, salient and single-modality with s_vis > s_text
  cross: jax.Array      # bool, salient and not single-modality
  r: jax.Array          # scalar, share of significance in single-modality salient weights
  gap_threshold: jax.Array  # scalar τ


def inverse_diag(h: jax.Array, damp_ratio: float = 0.01) -> jax.Array:
  """`diag((H + damp·I)⁻¹)` via Cholesky, `damp = damp_ratio·mean(diag H)`.

  Dead inputs (`H_jj = 0`) get `H_jj = 1` first, as in GPTQ.
  """
  h = h.astype(jnp.float32)
  n = h.shape[0]
  h = h + jnp.diag(jnp.where(jnp.diag(h) == 0, 1.0, 0.0))
  h = h + damp_ratio * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=jnp.float32)
  lower = jnp.linalg.cholesky(h)
  # H⁻¹ = L⁻ᵀ L⁻¹, so [H⁻¹]_jj = Σ_i (L⁻¹)_ij².
  linv = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=jnp.float32), lower=True)
  return jnp.sum(jnp.square(linv), axis=0)


def obs_saliency(w: jax.Array, h: jax.Array, damp_ratio: float = 0.01) -> jax.Array:
  """`W[j,k]² / [H⁻¹]_jj²`, normalised to sum 1 (all zeros if W ≡ 0)."""
  w = w.astype(jnp.float32)
  s = jnp.square(w) / jnp.square(inverse_diag(h, damp_ratio))[:, None]
  total = jnp.sum(s)
  return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 0.0)


def hoyer_rho(a: jax.Array, b: jax.Array) -> jax.Array:
  """Hoyer sparsity of the elementwise pairs (a, b) ≥ 0; 0 where both are 0.

  Computed scale-free (divided by max(a, b)) so tiny normalised scores don't underflow.
  """
  m = jnp.maximum(a, b)
  safe = jnp.where(m > 0, m, 1.0)
  x, y = a / safe, b / safe
  ratio = jnp.where(m > 0, (x + y) / jnp.sqrt(x * x + y * y), _SQRT2)
  return jnp.clip((_SQRT2 - ratio) / (_SQRT2 - 1.0), 0.0, 1.0)


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
  """Boolean mask of exactly `k` largest entries of `x >= 0` (ties: lowest flat index).

  Bisection on the float bit patterns (monotone for non-negative floats) finds the k-th
  largest value in 32 counting passes; much faster than `lax.top_k` with a large k on
  CPU, and exact.
  """
  flat = x.reshape(-1).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(flat, jnp.int32)

  def body(_, lo_hi):
    lo, hi = lo_hi  # invariant: count(bits >= lo) >= k > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(2**31 - 1)))
  above = bits > lo
  ties = (bits == lo) & (jnp.cumsum(bits == lo) <= k - jnp.sum(above))
  return (above | ties).reshape(x.shape)


def significance_map(w: jax.Array, h_text: jax.Array, h_vis: jax.Array, *,
                     has_text: bool, has_vis: bool, salient_top_p: float = 0.05,
                     diff_quantile: float = 0.5, damp_ratio: float = 0.01) -> Significance:
  """Steps 2–5: per-modality saliency, Hoyer ρ, partition, r and Λ.

  Args:
    w: kernel `[in, out]`.
    h_text, h_vis: `[in, in]` modality Hessians `2/N_m Σ x xᵀ`.
    has_text, has_vis: whether the modality had any calibration tokens (static);
      a missing modality's saliency is 0.
    salient_top_p: fraction of weights that are salient.
    diff_quantile: quantile of the modality gap among salient weights (see module doc).
    damp_ratio: Hessian damping.

  Returns:
    Significance.
  """
  w = w.astype(jnp.float32)
  zeros = jnp.zeros(w.shape, jnp.float32)
  s_t = obs_saliency(w, h_text, damp_ratio) if has_text else zeros
  s_v = obs_saliency(w, h_vis, damp_ratio) if has_vis else zeros
  rho = hoyer_rho(s_t, s_v)
  tot = s_t + s_v
  gap = jnp.where(tot > 0, jnp.abs(s_t - s_v) / jnp.where(tot > 0, tot, 1.0), 0.0)

  n = w.size
  k = max(1, min(n, math.ceil(salient_top_p * n)))
  salient = top_k_mask(tot, k)
  idx = jnp.nonzero(salient.reshape(-1), size=k)[0]
  tau = jnp.quantile(gap.reshape(-1)[idx], diff_quantile)
  single = salient & (gap >= tau) & (gap > 0)
  total = jnp.sum(tot)
  r = jnp.where(total > 0, jnp.sum(jnp.where(single, tot, 0.0)) / jnp.where(total > 0, total, 1.0), 0.0)
  lam = r * rho + (1.0 - r) * (1.0 - rho)
  return Significance(
      s_text=s_t, s_vis=s_v, rho=rho, lam=lam, salient=salient,
      text_only=single & (s_t > s_v), vis_only=single & (s_v > s_t),
      cross=salient & ~single, r=r, gap_threshold=tau)
