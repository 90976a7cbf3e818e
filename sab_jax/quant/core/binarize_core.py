"""Binarization primitives: sign, XNOR scales, ARB-RC scale refinement, residual
(2nd-order) binarization, BiLLM's bell-shaped group split, and the salient-row block
quantizer that BiLLM, ARB-RC and SAB share.

Layout: kernels are Flax `[in, out]`. The papers write `W` as `[out, in]`, so their
per-row scale `α_r` is our per-output-channel `alpha_out` (one per kernel column) and
their per-column `α_c` is our per-input-channel `alpha_in` (one per kernel row); their
"salient columns" are our salient input channels (kernel rows).

References:
  XNOR-Net, Rastegari et al. 2016, https://arxiv.org/abs/1603.05279
  BiLLM, Huang et al. 2024, https://arxiv.org/abs/2402.04291
  ARB-LLM, Li et al. 2024, https://arxiv.org/abs/2410.03129

Choices made here (the papers leave them open or we simplify):
  * `sign(0) = +1`, so every entry has a stored sign.
  * ARB-RC has no mean/offset `μ` (ARB-LLM's RC variant drops the redistribution mean
    when it adds the column scale). With `B = sign(W)` and scales that stay >= 0 (every
    update is a ratio of non-negative sums), `B = sign(W)` is itself the exact
    minimiser of the error over `B` for fixed scales, so alternating over `B` would
    never change it: `B` is fixed and only `alpha_in` / `alpha_out` alternate.
  * BiLLM's binarizer keeps its per-output-channel mean `μ` (`mean_offset` mode,
    `Ŵ = α·sign(W − μ) + μ`), as BiLLM does.
  * Scales are rounded to bfloat16 inside the block quantizers (what is stored), and
    residuals are taken against the rounded first-order approximation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# Quantile levels of |W| tried as the break point of the bell-shaped split.
SPLIT_LEVELS = tuple(0.40 + 0.03 * i for i in range(20))  # 0.40 ... 0.97
# Quantile levels of the split key tried as the salient-group break point (ARB-LLM's
# `--order2_group` grid, 0.10 ... 0.90).
SALIENT_GROUP_LEVELS = tuple(0.10 + 0.02 * i for i in range(41))


def sign(x: jax.Array) -> jax.Array:
  """±1 with sign(0) = +1 (so every weight has a stored sign bit)."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(jnp.float32)


@jax.custom_vjp
def ste_sign(x: jax.Array, clip: jax.Array) -> jax.Array:
  """sign(x) (sign(0) = +1) with the clipped straight-through gradient 1_{|x| ≤ clip}
  (quantization-aware training through a sign)."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _ste_fwd(x, clip):
  return ste_sign(x, clip), (x, clip)


def _ste_bwd(res, g):
  x, clip = res
  return g * (jnp.abs(x) <= clip).astype(g.dtype), jnp.zeros_like(clip)


ste_sign.defvjp(_ste_fwd, _ste_bwd)


def bf16_round(x: jax.Array) -> jax.Array:
  """Round-trip through bfloat16: the value a 16-bit stored scale really has."""
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array, fallback: jax.Array) -> jax.Array:
  """num/den, and `fallback` where den == 0 (the variable carries no weight there)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def weighted_error(w: jax.Array, w_hat: jax.Array, weight: jax.Array) -> jax.Array:
  """Σ weight·(W − Ŵ)² (a mask is folded into `weight`)."""
  return jnp.sum(weight * jnp.square(w - w_hat))


# ---------------------------------------------------------------------------
# XNOR
# ---------------------------------------------------------------------------


def xnor(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """XNOR-Net: `B = sign(W)`, `alpha_out[k] = mean_j |W[j, k]|`.

  Args:
    w: kernel `[in, out]`.

  Returns:
    (signs ±1 `[in, out]` float32, alpha_out `[out]`); `Ŵ = signs * alpha_out`.
  """
  w = w.astype(jnp.float32)
  return sign(w), jnp.mean(jnp.abs(w), axis=0)


# ---------------------------------------------------------------------------
# ARB-RC: Ŵ = alpha_in[j] · B[j, k] · alpha_out[k]
# ---------------------------------------------------------------------------


class RcFit(NamedTuple):
  """Row/column-scaled binarization `Ŵ = alpha_in[:, None] * signs * alpha_out`."""
  signs: jax.Array      # [in, out] ±1 float32
  alpha_in: jax.Array   # [in]
  alpha_out: jax.Array  # [out]
  errors: jax.Array     # [iters + 1] weighted error after init and after each iteration


def rc_dequant(signs: jax.Array, alpha_in: jax.Array, alpha_out: jax.Array) -> jax.Array:
  """`alpha_in[j] · signs[j, k] · alpha_out[k]`."""
  return alpha_in[:, None] * signs * alpha_out[None, :]


def update_alpha_out(w: jax.Array, v: jax.Array, alpha_in: jax.Array,
                     previous: jax.Array) -> jax.Array:
  """Exact minimiser over `alpha_out` of `Σ v (W − a_in B a_out)²`, `B = sign(W)`.

  d/d a_out[k] = −2 Σ_j v_jk a_in[j] B_jk (W_jk − a_in[j] B_jk a_out[k]) = 0 and
  `W·B = |W|`, `B² = 1` give `a_out[k] = Σ_j v |W| a_in[j] / Σ_j v a_in[j]²`.
  Where the denominator is 0 the error does not depend on `a_out[k]`; keep `previous`.
  """
  num = jnp.sum(v * jnp.abs(w) * alpha_in[:, None], axis=0)
  den = jnp.sum(v * jnp.square(alpha_in)[:, None], axis=0)
  return _safe_div(num, den, previous)


def update_alpha_in(w: jax.Array, v: jax.Array, alpha_out: jax.Array,
                    previous: jax.Array) -> jax.Array:
  """Exact minimiser over `alpha_in` (same derivation, summing over outputs)."""
  num = jnp.sum(v * jnp.abs(w) * alpha_out[None, :], axis=1)
  den = jnp.sum(v * jnp.square(alpha_out)[None, :], axis=1)
  return _safe_div(num, den, previous)


def arb_rc(w: jax.Array, weight: jax.Array, mask: jax.Array, iters: int) -> RcFit:
  """ARB-RC alternating refinement of row and column scales.

  Minimises `E = Σ weight·mask·(W − alpha_in ⊙ B ⊙ alpha_out)²` with `B = sign(W)`.
  Init: `alpha_in = 1`, `alpha_out` = its exact minimiser given that. Each iteration
  then sets `alpha_in` and `alpha_out` to their exact minimisers in turn, so `E` never
  increases (block coordinate descent on a quadratic in each block).

  Args:
    w: `[rows, out]` weights.
    weight: `[rows, out]` non-negative per-entry weights (Λ or Λ², or ones).
    mask: `[rows, out]` bool/0-1, entries that belong to this group.
    iters: number of (alpha_in, alpha_out) sweeps (static).

  Returns:
    RcFit; scales of rows/columns with no weight are left at their init
    (alpha_in = 1, alpha_out = unweighted masked mean |W|) and do not matter.
  """
  w = w.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  v = weight.astype(jnp.float32) * m
  b = sign(w)
  a_in = jnp.ones((w.shape[0],), jnp.float32)
  fallback_out = _safe_div(jnp.sum(m * jnp.abs(w), axis=0), jnp.sum(m, axis=0),
                           jnp.zeros((w.shape[1],), jnp.float32))
  a_out = update_alpha_out(w, v, a_in, fallback_out)
  err0 = weighted_error(w, rc_dequant(b, a_in, a_out), v)

  def sweep(carry, _):
    a_in, a_out = carry
    a_in = update_alpha_in(w, v, a_out, a_in)
    a_out = update_alpha_out(w, v, a_in, a_out)
    return (a_in, a_out), weighted_error(w, rc_dequant(b, a_in, a_out), v)

  (a_in, a_out), errs = jax.lax.scan(sweep, (a_in, a_out), None, length=iters)
  return RcFit(b, a_in, a_out, jnp.concatenate([err0[None], errs]))


# ---------------------------------------------------------------------------
# BiLLM's binarizer: Ŵ = alpha_out · sign(W − mu) + mu   (per output channel)
# ---------------------------------------------------------------------------


class MeanOffsetFit(NamedTuple):
  signs: jax.Array      # [in, out] ±1 float32, sign(W − mu)
  alpha_out: jax.Array  # [out]
  mu: jax.Array         # [out]


def mean_offset(w: jax.Array, mask: jax.Array) -> MeanOffsetFit:
  """BiLLM's 1st-order binarizer over the masked entries of each output channel.

  `mu = mean(W)`, `B = sign(W − mu)`, `alpha = mean|W − mu|` (all over the mask): the
  closed-form minimiser of the unweighted error for fixed `mu`.
  """
  w = w.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  cnt = jnp.sum(m, axis=0)
  zero = jnp.zeros((w.shape[1],), jnp.float32)
  mu = _safe_div(jnp.sum(m * w, axis=0), cnt, zero)
  c = w - mu[None, :]
  alpha = _safe_div(jnp.sum(m * jnp.abs(c), axis=0), cnt, zero)
  return MeanOffsetFit(sign(c), alpha, mu)


def mean_offset_dequant(signs: jax.Array, alpha_out: jax.Array, mu: jax.Array) -> jax.Array:
  return signs * alpha_out[None, :] + mu[None, :]


# ---------------------------------------------------------------------------
# Residual binarization and the bell-shaped split
# ---------------------------------------------------------------------------


def residual_binarize(w: jax.Array, weight: jax.Array, mask: jax.Array, iters: int
                      ) -> tuple[RcFit, RcFit, jax.Array]:
  """2nd-order ARB-RC: binarize W, then binarize the residual `W − Ŵ₁` the same way.

  Returns:
    (first fit, residual fit, Ŵ₁ + Ŵ₂ masked).
  """
  f1 = arb_rc(w, weight, mask, iters)
  w1 = rc_dequant(f1.signs, f1.alpha_in, f1.alpha_out)
  f2 = arb_rc(w - w1, weight, mask, iters)
  w2 = rc_dequant(f2.signs, f2.alpha_in, f2.alpha_out)
  return f1, f2, jnp.where(mask, w1 + w2, 0.0)


def split_search(w: jax.Array, weight: jax.Array, mask: jax.Array,
                 quick_fit: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 levels: Sequence[float] = SPLIT_LEVELS, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BiLLM's bell-shaped split of the masked weights into |W| <= t and |W| > t.

  Candidate break points `t` are quantiles (`levels`) of |W| (or of `key`) over the mask;
  each is scored by the weighted error of binarizing both groups with `quick_fit` (each
  group its own scales) and the best is kept.

  Args:
    w, weight, mask: `[rows, out]`.
    quick_fit: `(w, weight, mask) -> Ŵ` (masked entries only matter).
    levels: static quantile levels.
    key: `[rows, out]` non-negative split key (default |W|).

  Returns:
    (hi mask `[rows, out]` bool, threshold, per-candidate errors `[len(levels)]`).
  """
  mask = mask.astype(bool)
  a = jnp.abs(w) if key is None else key
  cands = jnp.nanquantile(jnp.where(mask, a, jnp.nan), jnp.asarray(levels, jnp.float32))
  v = weight * mask

  def err_for(t):
    hi = mask & (a > t)
    lo = mask & ~hi
    w_hat = jnp.where(hi, quick_fit(w, weight, hi), quick_fit(w, weight, lo))
    return weighted_error(w, w_hat, v)

  errs = jax.lax.map(err_for, cands)
  errs = jnp.where(jnp.isnan(errs), jnp.inf, errs)
  t = cands[jnp.argmin(errs)]
  return mask & (a > t), t, errs


def quick_rc(w: jax.Array, weight: jax.Array, mask: jax.Array) -> jax.Array:
  """Cheap scorer for the split search: ARB-RC init only (alpha_in = 1)."""
  f = arb_rc(w, weight, mask, 0)
  return rc_dequant(f.signs, f.alpha_in, f.alpha_out)


def quick_rc2(w: jax.Array, weight: jax.Array, mask: jax.Array) -> jax.Array:
  """Cheap scorer for the salient-group split: the order-2 residual ARB-RC init."""
  q1 = quick_rc(w, weight, mask)
  return q1 + quick_rc(w - q1, weight, mask)


def quick_mean_offset(w: jax.Array, weight: jax.Array, mask: jax.Array) -> jax.Array:
  del weight  # BiLLM's split criterion is the unweighted error
  f = mean_offset(w, mask)
  return mean_offset_dequant(f.signs, f.alpha_out, f.mu)


# ---------------------------------------------------------------------------
# Salient-row count search (BiLLM / ARB-LLM's structural search)
# ---------------------------------------------------------------------------

# Candidate salient-row counts per block: 1 .. SEARCH_MAX_ROWS (the references' 1..49).
SEARCH_MAX_ROWS = 49


def _mean_offset_order2(t: jax.Array, mask: jax.Array) -> jax.Array:
  """BiLLM's order-2 binarizer of the masked entries, per output channel (masked Ŵ)."""
  f1 = mean_offset(t, mask)
  q1 = mean_offset_dequant(f1.signs, f1.alpha_out, f1.mu)
  f2 = mean_offset(t - q1, mask)
  return jnp.where(mask, q1 + mean_offset_dequant(f2.signs, f2.alpha_out, f2.mu), 0.0)


def search_salient_count(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array, valid: jax.Array,
                         max_rows: int = SEARCH_MAX_ROWS) -> tuple[jax.Array, jax.Array]:
  """The number of salient rows of a block, searched as BiLLM and ARB-LLM do.

  The saliency matrix `T = weight·W²/d_j²` (the OBS cost of each weight) is split into the
  top-i rows by `Σ_k T` and the rest; both parts get an order-2 mean-offset binarization
  of T itself, and the i in 1..max_rows with the least mean squared error on T wins
  (first minimum). Both parts at order 2 make the criterion a question of structure (which
  rows need scales of their own), not of bits: more residual planes would always lower the
  plain error.

  Args:
    w, weight: `[rows, out]` current weights and error weights.
    hinv_diag: `[rows]` d_j (GPTQ's upper Cholesky factor of H⁻¹, diagonal).
    valid: `[rows]` bool, False on padding rows.
    max_rows: largest candidate (static); candidates at or above the valid rows are skipped.

  Returns:
    (count, per-candidate errors `[max_rows]`, inf where skipped).
  """
  score, t = _row_scores(w.astype(jnp.float32), weight.astype(jnp.float32), hinv_diag)
  rank = _descending_rank(score, valid)
  t = jnp.where(valid[:, None], t, 0.0)
  n_valid = jnp.sum(valid)
  full = jnp.broadcast_to(valid[:, None], t.shape)

  def err(i):
    top = full & (rank < i)[:, None]
    q = _mean_offset_order2(t, top) + _mean_offset_order2(t, full & ~top)
    e = jnp.sum(jnp.where(full, jnp.square(t - q), 0.0))
    return jnp.where(i < jnp.maximum(n_valid, 2), e, jnp.inf)

  errs = jax.lax.map(err, jnp.arange(1, max_rows + 1))
  return jnp.argmin(errs) + 1, errs


# ---------------------------------------------------------------------------
# ARB-RC's second-order fit with joint refinement ("refine B")
# ---------------------------------------------------------------------------


def _scales_given_signs(t, b, v, a_in, a_out):
  """Exact (alpha_in, then alpha_out) least squares of `Σ v (T − a_in B a_out)²` for fixed B."""
  num = jnp.sum(v * t * b * a_out[None, :], axis=1)
  den = jnp.sum(v * jnp.square(a_out)[None, :], axis=1)
  a_in = _safe_div(num, den, a_in)
  num = jnp.sum(v * t * b * a_in[:, None], axis=0)
  den = jnp.sum(v * jnp.square(a_in)[:, None], axis=0)
  return a_in, _safe_div(num, den, a_out)


def _best_signs(w, k0, k1):
  """Per entry the pair (B0, B1) ∈ {±1}² minimising |W − B0·k0 − B1·k1| (ties: + first)."""
  cands = [(s0, s1) for s0 in (1.0, -1.0) for s1 in (1.0, -1.0)]
  errs = jnp.stack([jnp.abs(w - s0 * k0 - s1 * k1) for s0, s1 in cands])
  best = jnp.argmin(errs, axis=0)
  b0 = jnp.where(best < 2, 1.0, -1.0)
  b1 = jnp.where(best % 2 == 0, 1.0, -1.0)
  return b0, b1


class Order2Fit(NamedTuple):
  """Two planes `Ŵ = a_in0 ⊙ B0 ⊙ a_out0 + a_in1 ⊙ B1 ⊙ a_out1` (scales rounded to bf16)."""
  signs: jax.Array       # [rows, out] ±1, B0
  residual: jax.Array    # [rows, out] ±1, B1
  alpha_in: jax.Array    # [rows, 2]
  alpha_out: jax.Array   # [2, out]
  errors: jax.Array      # [refine + 2] weighted error: residual init, each sweep, stored (bf16) scales


def refine_order2(w: jax.Array, weight: jax.Array, mask: jax.Array, iters: int, refine: int) -> Order2Fit:
  """ARB-RC's 2nd-order fit with joint refinement of both planes (ARB-LLM's "refine B").

  Init: the residual fit (ARB-RC on W, then on what is left). Each sweep then sets, in turn,
  plane 0's (alpha_in, alpha_out) to their exact weighted least squares given plane 1, plane
  1's given plane 0, and both sign planes per entry to the best of the four combinations
  given the scales; each step is an exact minimiser of the weighted error given the rest, so
  the error never increases. After the last sweep the scales are fitted to the final signs
  (ARB-LLM stops on a sign step), rounded to bf16, and the signs re-chosen for the rounded
  scales (what is stored).

  Args:
    w, weight, mask: `[rows, out]`.
    iters: ARB-RC sweeps of the init fits (static).
    refine: joint sweeps (static, >= 1).
  """
  if refine < 1:
    raise ValueError(f"refine={refine}: at least one sweep (refine=0 is the plain residual fit)")
  w = w.astype(jnp.float32)
  v = weight.astype(jnp.float32) * mask.astype(jnp.float32)
  f1 = arb_rc(w, weight, mask, iters)
  f2 = arb_rc(w - rc_dequant(f1.signs, f1.alpha_in, f1.alpha_out), weight, mask, iters)
  init = (f1.signs, f2.signs, f1.alpha_in, f1.alpha_out, f2.alpha_in, f2.alpha_out)

  def total(st):
    b0, b1, ai0, ao0, ai1, ao1 = st
    return weighted_error(w, rc_dequant(b0, ai0, ao0) + rc_dequant(b1, ai1, ao1), v)

  def scales(st):
    b0, b1, ai0, ao0, ai1, ao1 = st
    ai0, ao0 = _scales_given_signs(w - rc_dequant(b1, ai1, ao1), b0, v, ai0, ao0)
    ai1, ao1 = _scales_given_signs(w - rc_dequant(b0, ai0, ao0), b1, v, ai1, ao1)
    return b0, b1, ai0, ao0, ai1, ao1

  def signs(st):
    b0, b1, ai0, ao0, ai1, ao1 = st
    b0, b1 = _best_signs(w, ai0[:, None] * ao0[None, :], ai1[:, None] * ao1[None, :])
    return b0, b1, ai0, ao0, ai1, ao1

  def sweep(st, _):
    st = signs(scales(st))
    return st, total(st)

  state, errs = jax.lax.scan(sweep, init, None, length=refine)
  b0, b1, ai0, ao0, ai1, ao1 = scales(state)
  rounded = signs((b0, b1) + tuple(bf16_round(x) for x in (ai0, ao0, ai1, ao1)))
  b0, b1, ai0, ao0, ai1, ao1 = rounded
  return Order2Fit(b0, b1, jnp.stack([ai0, ai1], axis=1), jnp.stack([ao0, ao1]),
                   jnp.concatenate([total(init)[None], errs, total(rounded)[None]]))


# ---------------------------------------------------------------------------
# The salient-row block quantizer (BiLLM, ARB-RC, SAB)
# ---------------------------------------------------------------------------
# Parts of one block of `rows` input channels (all stacked over blocks by the caller):
#   signs [rows, out] bool     first-order sign (True = +1) of every entry
#   residual_signs [rows,out]  sign of the 2nd-order residual plane (read on salient rows)
#   salient_rows [rows] bool   input channels with residual binarization
#   group_hi [rows, out] bool  the per-weight group bitmap: on non-salient rows the
#                              bell-shaped split (|W| > t; `split`), on salient rows the
#                              salient-group split (`salient_groups`); absent without either
#   alpha_out [C, out] bf16    per-component output scales, C = (order1, order2, rest | lo,
#                              [hi], [order1', order2']): 3 + split + 2·salient_groups
#   alpha_in [rows, S] bf16    ("rc" mode) slot 0: order1 / lo / rest, slot 1: order2 / hi;
#                              with salient groups (S = 4) slots 2, 3: order1' / order2'
#                              of the salient rows' high group
#   mu [C, out] bf16           ("mean_offset" mode) per-component offsets


def salient_layout(alpha_out_components: int, rc: bool) -> tuple[bool, bool]:
  """(split, salient_groups) of a salient-row layout, read off its alpha_out components
  (3 + split + 2·salient_groups; salient groups are ARB-RC's, `rc`)."""
  groups = rc and alpha_out_components >= 5
  extra = alpha_out_components - 3 - 2 * groups
  if extra not in (0, 1):
    raise ValueError(f"no salient-row layout ({'rc' if rc else 'mean_offset'}) has "
                     f"{alpha_out_components} alpha_out components")
  return bool(extra), groups


def _row_scores(w, weight, hinv_diag):
  """Per-row OBS saliency `Σ_k weight·W²/d_j²` and the saliency matrix itself."""
  t = weight * jnp.square(w) / jnp.square(hinv_diag)[:, None]
  return jnp.sum(t, axis=1), t


def _descending_rank(score, valid):
  """Each row's rank by `score`, 0 = largest; invalid rows last, ties: lower row first (as top_k)."""
  return jnp.argsort(jnp.argsort(-jnp.where(valid, score, -jnp.inf)))


def _top_rows(w, weight, hinv_diag, valid, n):
  """The `n` (static, or a traced count) valid rows of largest saliency; ties: lower row."""
  score, _ = _row_scores(w, weight, hinv_diag)
  return (_descending_rank(score, valid) < n) & valid


def residual_plane_gain(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array) -> jax.Array:
  """Per row, the drop of the OBS-scaled error that a residual plane buys.

  Under a per-row-scale model (the row's weighted least-squares scale, sign(W)): the error
  of one plane minus that of two planes (the second on the residual), over d_j² so rows
  compare as their output error does. Rows with the largest gain are where a layer-wide
  salient-row budget does most (`allocate_salient_rows`).
  """
  w = w.astype(jnp.float32)
  v = weight.astype(jnp.float32)
  den = jnp.maximum(jnp.sum(v, axis=1, keepdims=True), 1e-30)

  def plane(x):
    a = jnp.sum(v * jnp.abs(x), axis=1, keepdims=True) / den
    return x - a * sign(x)

  r1 = plane(w)
  e1 = jnp.sum(v * jnp.square(r1), axis=1)
  e2 = jnp.sum(v * jnp.square(plane(r1)), axis=1)
  return (e1 - e2) / jnp.square(hinv_diag)


def allocate_salient_rows(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array, valid: jax.Array,
                          budget: int | jax.Array) -> jax.Array:
  """`[rows]` bool: the layer-wide `budget` (static or traced) rows of largest `residual_plane_gain`."""
  return (_descending_rank(residual_plane_gain(w, weight, hinv_diag), valid) < budget) & valid


def compose_salient_split(parts: dict[str, jax.Array], mode: str) -> jax.Array:
  """Ŵ of one block from its parts (the exporter's dequantizer, used verbatim here)."""
  s1 = jnp.where(parts["signs"], 1.0, -1.0)
  s2 = jnp.where(parts["residual_signs"], 1.0, -1.0)
  a_out = parts["alpha_out"].astype(jnp.float32)
  n_comp = a_out.shape[0]
  if mode == "rc":
    a_in = parts["alpha_in"].astype(jnp.float32)
    split, groups = salient_layout(n_comp, True)
    comp = lambda s, slot, c: a_in[:, slot, None] * s * a_out[c][None, :]
  else:
    split, groups = salient_layout(n_comp, False)
    mu = parts["mu"].astype(jnp.float32)
    comp = lambda s, slot, c: s * a_out[c][None, :] + mu[c][None, :]
  salient = comp(s1, 0, 0) + comp(s2, 1, 1)
  if groups:
    salient = jnp.where(parts["group_hi"], comp(s1, 2, n_comp - 2) + comp(s2, 3, n_comp - 1), salient)
  rest = comp(s1, 0, 2)
  if split:
    rest = jnp.where(parts["group_hi"], comp(s1, 1, 3), rest)
  return jnp.where(parts["salient_rows"][:, None], salient, rest)


def salient_split_block(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array,
                        valid: jax.Array, *, n_salient: int | None, iters: int, mode: str,
                        split: bool, levels: Sequence[float] = SPLIT_LEVELS, refine: int = 0,
                        salient_groups: bool = False,
                        group_levels: Sequence[float] = SALIENT_GROUP_LEVELS
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Binarize one block of input channels: salient rows 2nd order, rest 1st order.

  Salient rows: the `n_salient` valid rows with the largest
  `Σ_k weight[j,k]·W[j,k]² / d_j²`, d = diag of GPTQ's upper Cholesky factor of H⁻¹
  (so `d_j² = [H_F⁻¹]_jj` of the not-yet-quantized set: the OBS saliency; with
  weight ≡ 1 this is BiLLM's column criterion), or, with `n_salient=None`, as many as
  `search_salient_count` picks for this block. They get residual binarization (in "rc"
  mode with `refine` sweeps of `refine_order2`); with `salient_groups` their entries are
  first split in two by `√weight·|W|` (ARB-LLM's `--order2_group`, which splits by the
  saliency W²/d_j²), each group with its own two planes' scales. The other valid rows
  are split by |W| (when `split`) into two groups with their own scales.

  Args:
    w: `[rows, out]` current (compensated) weights of the block.
    weight: `[rows, out]` error weights (Λ^p for SAB, ones otherwise; unused by
      `mean_offset` mode, which is unweighted like BiLLM).
    hinv_diag: `[rows]` d_j.
    valid: `[rows]` bool, False on padding rows.
    n_salient: salient rows per block (static), or None: searched per block.
    iters: ARB-RC sweeps (static; `rc` mode).
    mode: "rc" (alpha_in ⊙ B ⊙ alpha_out, weighted ALS) or "mean_offset" (BiLLM).
    split: bell-shaped split of the non-salient rows (else one group).
    levels: split candidates.
    refine: joint refinement sweeps of the salient rows' two planes ("rc" mode; 0: the
      plain residual fit).
    salient_groups: split the salient rows' entries into two groups ("rc" mode).
    group_levels: salient-group split candidates (quantiles of √weight·|W|).

  Returns:
    (Ŵ `[rows, out]`, parts dict as documented above).
  """
  if mode not in ("rc", "mean_offset"):
    raise ValueError(f"unknown mode {mode!r}")
  if salient_groups and mode != "rc":
    raise ValueError("salient_groups needs mode 'rc' (ARB-RC's order-2 groups)")
  w = w.astype(jnp.float32)
  weight = weight.astype(jnp.float32)
  if n_salient is None:
    n_salient, _ = search_salient_count(w, weight, hinv_diag, valid, min(SEARCH_MAX_ROWS, w.shape[0]))
  sal = _top_rows(w, weight, hinv_diag, valid, n_salient)
  m_sal = jnp.broadcast_to(sal[:, None], w.shape)
  m_rest = jnp.broadcast_to((valid & ~sal)[:, None], w.shape)
  if split:
    quick = quick_rc if mode == "rc" else quick_mean_offset
    hi, _, _ = split_search(w, weight, m_rest, quick, levels)
    groups = [m_rest & ~hi, hi]
  else:
    hi = jnp.zeros(w.shape, bool)
    groups = [m_rest]

  if mode == "rc":
    def fit(x, m):
      f = arb_rc(x, weight, m, iters)
      a_in, a_out = bf16_round(f.alpha_in), bf16_round(f.alpha_out)
      return f.signs, a_in, a_out, None, rc_dequant(f.signs, a_in, a_out)
  else:
    def fit(x, m):
      f = mean_offset(x, m)
      a_out, mu = bf16_round(f.alpha_out), bf16_round(f.mu)
      return f.signs, None, a_out, mu, mean_offset_dequant(f.signs, a_out, mu)

  def fit2(m):
    """The salient entries `m`: (s1, s2, (ai1, ai2), (ao1, ao2), (mu1, mu2))."""
    if mode == "rc" and refine:
      f = refine_order2(w, weight, m, iters, refine)
      return f.signs, f.residual, (f.alpha_in[:, 0], f.alpha_in[:, 1]), (f.alpha_out[0], f.alpha_out[1]), None
    s1, ai1, ao1, mu1, w1 = fit(w, m)
    s2, ai2, ao2, mu2, _ = fit(w - w1, m)
    return s1, s2, (ai1, ai2), (ao1, ao2), (mu1, mu2)

  if salient_groups:
    # split key √weight·|W| (|W| for ARB-RC; Λ-weighted magnitude for SAB): on the reference
    # layers |W| beat the OBS saliency W²/d_j² ARB-LLM splits by (layer_error.py)
    key = jnp.sqrt(weight) * jnp.abs(w)
    hi_sal, _, _ = split_search(w, weight, m_sal, quick_rc2, group_levels, key=key)
    s1_lo, s2_lo, ai_sal, ao_sal, _ = fit2(m_sal & ~hi_sal)
    s1_hi, s2_hi, ai_hi, ao_hi, _ = fit2(hi_sal)
    s1, s2 = jnp.where(hi_sal, s1_hi, s1_lo), jnp.where(hi_sal, s2_hi, s2_lo)
    hi = jnp.where(m_sal, hi_sal, hi)
  else:
    s1, s2, ai_sal, ao_sal, mu_sal = fit2(m_sal)
  fits = [fit(w, g) for g in groups]
  signs = jnp.where(m_sal, s1 > 0, False)
  for g, f in zip(groups, fits):
    signs = jnp.where(g, f[0] > 0, signs)
  a_out = list(ao_sal) + [f[2] for f in fits] + (list(ao_hi) if salient_groups else [])
  parts = {
      "signs": signs,
      "residual_signs": jnp.where(m_sal, s2 > 0, False),
      "salient_rows": sal,
      "alpha_out": jnp.stack(a_out).astype(jnp.bfloat16),
  }
  if split or salient_groups:
    parts["group_hi"] = hi
  if mode == "rc":
    slots = [jnp.where(sal, ai_sal[0], fits[0][1]), jnp.where(sal, ai_sal[1], fits[1][1] if split else 1.0)]
    if salient_groups:
      slots += [jnp.where(sal, a, 1.0) for a in ai_hi]
    parts["alpha_in"] = jnp.stack(slots, axis=1).astype(jnp.bfloat16)
  else:
    parts["mu"] = jnp.stack(list(mu_sal) + [f[3] for f in fits]).astype(jnp.bfloat16)
  w_hat = jnp.where(valid[:, None], compose_salient_split(parts, mode), 0.0)
  return w_hat, parts


# ---------------------------------------------------------------------------
# Structured variant (≤ 1.2 stored bits): scales shared by a group of blocks
# ---------------------------------------------------------------------------
# Whole input channels are salient (flags only), the other channels form one group (no
# per-weight bitmap), and the three alpha_out vectors (order1, order2, rest) are shared
# by a group of `scale_block` inputs. They are fitted by ARB-RC on the group's current
# weights when GPTQ reaches the group (`structured_prepare`); each 128-input block is
# then binarized with alpha_out fixed and per-row alpha_in set to its exact minimiser on
# the compensated weights (`structured_block`). Parts as `salient_split_block` without
# `group_hi`, alpha_out `[3, out]` per group.


def structured_prepare(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array, valid: jax.Array,
                       *, n_salient: int | jax.Array, iters: int) -> dict[str, jax.Array]:
  """Salient rows and shared alpha_out of one group (GPTQ calls it at the group start).

  Args:
    w, weight: `[group, out]` current weights and error weights.
    hinv_diag, valid: `[group]`.
    n_salient: salient rows of the group (static, or traced: the group's share of a
      layer-wide budget), ranked as in `salient_split_block`.
    iters: ARB-RC sweeps.

  Returns:
    {"salient_rows": [group] bool, "alpha_out": [3, out] bf16}.
  """
  w = w.astype(jnp.float32)
  weight = weight.astype(jnp.float32)
  sal = _top_rows(w, weight, hinv_diag, valid, n_salient)
  m_sal = jnp.broadcast_to(sal[:, None], w.shape)
  m_rest = jnp.broadcast_to((valid & ~sal)[:, None], w.shape)
  f1 = arb_rc(w, weight, m_sal, iters)
  w1 = rc_dequant(f1.signs, bf16_round(f1.alpha_in), bf16_round(f1.alpha_out))
  f2 = arb_rc(w - w1, weight, m_sal, iters)
  f3 = arb_rc(w, weight, m_rest, iters)
  a_out = jnp.stack([f1.alpha_out, f2.alpha_out, f3.alpha_out])
  return {"salient_rows": sal, "alpha_out": a_out.astype(jnp.bfloat16)}


def structured_block(w: jax.Array, weight: jax.Array, hinv_diag: jax.Array, valid: jax.Array,
                     *, state: dict[str, jax.Array], offset: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One block of a group: alpha_out from the group, alpha_in exact per row.

  Args:
    w, weight: `[rows, out]` current weights and error weights of the block.
    hinv_diag: unused (the salient rows were chosen for the whole group).
    valid: `[rows]`.
    state: the group's `structured_prepare` output.
    offset: first row of this block within the group.

  Returns:
    (Ŵ `[rows, out]`, parts: signs, residual_signs, salient_rows, alpha_in `[rows, 2]`).
  """
  del hinv_diag
  w = w.astype(jnp.float32)
  v = weight.astype(jnp.float32) * valid[:, None]
  sal = jax.lax.dynamic_slice_in_dim(state["salient_rows"], offset, w.shape[0], 0)
  a_out = state["alpha_out"].astype(jnp.float32)
  ones = jnp.ones(w.shape[0], jnp.float32)
  s1 = sign(w)
  ai1 = bf16_round(update_alpha_in(w, v, a_out[0], ones))
  res = w - rc_dequant(s1, ai1, a_out[0])
  ai2 = bf16_round(update_alpha_in(res, v, a_out[1], ones))
  ai3 = bf16_round(update_alpha_in(w, v, a_out[2], ones))
  parts = {
      "signs": (s1 > 0) & valid[:, None],
      "residual_signs": (res >= 0) & sal[:, None],
      "salient_rows": sal,
      "alpha_in": jnp.stack([jnp.where(sal, ai1, ai3), jnp.where(sal, ai2, 1.0)],
                            axis=1).astype(jnp.bfloat16),
  }
  w_hat = compose_salient_split(dict(parts, alpha_out=state["alpha_out"]), "rc")
  return jnp.where(valid[:, None], w_hat, 0.0), parts
