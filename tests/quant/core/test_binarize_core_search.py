"""The per-block salient-row count search and ARB-RC's joint 2nd-order refinement (issue 14)."""

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.quant import providers
from sab_jax.quant.core import binarize_core, bits_core
from sab_jax.quant.providers import base, salient_split


def _mean_offset_order2_np(t, mask):
  """BiLLM's order-2 binarizer per output channel over the masked rows, float64 numpy."""
  out = np.zeros_like(t)
  r = np.where(mask, t, 0.0)
  for _ in range(2):
    cnt = mask.sum(0)
    mu = np.where(cnt > 0, (r * mask).sum(0) / np.maximum(cnt, 1), 0.0)
    c = r - mu
    a = np.where(cnt > 0, (np.abs(c) * mask).sum(0) / np.maximum(cnt, 1), 0.0)
    q = np.where(c >= 0, 1.0, -1.0) * a + mu
    out += np.where(mask, q, 0.0)
    r = np.where(mask, r - q, 0.0)
  return out


def _brute_force_count(w, d, valid, max_rows):
  t = (w.astype(np.float64) ** 2) / d.astype(np.float64)[:, None] ** 2
  t[~valid] = 0
  order = np.argsort(-np.where(valid, t.sum(1), -np.inf), kind="stable")
  full = np.broadcast_to(valid[:, None], t.shape)
  errs = []
  for i in range(1, max_rows + 1):
    if i >= max(valid.sum(), 2):
      errs.append(np.inf)
      continue
    top = np.zeros(len(w), bool)
    top[order[:i]] = True
    m = full & top[:, None]
    q = _mean_offset_order2_np(t, m) + _mean_offset_order2_np(t, full & ~m)
    errs.append(((t - q) ** 2)[full].sum())
  return int(np.argmin(errs)) + 1, np.asarray(errs)


@pytest.mark.parametrize("seed, rows, n_valid, max_rows", [(0, 32, 32, 12), (1, 40, 29, 49), (2, 16, 16, 49)])
def test_searched_count_is_the_brute_force_optimum(seed, rows, n_valid, max_rows):
  rng = np.random.default_rng(seed)
  w = (rng.standard_t(3, (rows, 24)) * 0.02).astype(np.float32)
  w[rng.choice(rows, 3, replace=False)] *= 6  # a few outlier rows: a clear optimum exists
  d = rng.uniform(0.3, 1.5, rows).astype(np.float32)
  valid = np.arange(rows) < n_valid
  count, errs = binarize_core.search_salient_count(jnp.asarray(w), jnp.ones_like(jnp.asarray(w)), jnp.asarray(d),
                                                   jnp.asarray(valid), min(max_rows, rows))
  want, want_errs = _brute_force_count(w, d, valid, min(max_rows, rows))
  assert int(count) == want
  finite = np.isfinite(want_errs)
  np.testing.assert_array_equal(np.isfinite(np.asarray(errs)), finite)
  np.testing.assert_allclose(np.asarray(errs)[finite], want_errs[finite], rtol=2e-4)


def _residual_fit_error(w, v, m, iters):
  """The plain (fixed-sign) residual fit with bf16 scales, as `salient_split_block` did before refinement."""
  f1 = binarize_core.arb_rc(w, v, m, iters)
  q1 = binarize_core.rc_dequant(f1.signs, binarize_core.bf16_round(f1.alpha_in), binarize_core.bf16_round(f1.alpha_out))
  f2 = binarize_core.arb_rc(w - q1, v, m, iters)
  q2 = binarize_core.rc_dequant(f2.signs, binarize_core.bf16_round(f2.alpha_in), binarize_core.bf16_round(f2.alpha_out))
  return float(binarize_core.weighted_error(w, jnp.where(m, q1 + q2, 0.0), v * m))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_refinement_never_increases_the_error_and_beats_the_fixed_sign_fit(seed):
  rng = np.random.default_rng(seed)
  w = jnp.asarray((rng.standard_t(3, (20, 64)) * 0.05).astype(np.float32))
  v = jnp.asarray(rng.uniform(0.5, 2.0, (20, 64)).astype(np.float32))  # SAB's Λ-like weights
  m = jnp.asarray(np.broadcast_to((rng.random(20) < 0.7)[:, None], (20, 64)))
  f = binarize_core.refine_order2(w, v, m, 15, 15)
  errs = np.asarray(f.errors)
  sweeps = errs[:-1]  # residual init, then each sweep (float32 scales)
  assert np.all(np.diff(sweeps) <= 1e-6 * sweeps[0]), sweeps
  # what is stored (bf16 scales, signs re-chosen for them) beats the plain residual fit clearly
  plain = _residual_fit_error(w, v, m, 15)
  assert errs[-1] < 0.9 * plain
  # and the parts say what the error says
  w_hat = (binarize_core.rc_dequant(f.signs, f.alpha_in[:, 0], f.alpha_out[0])
           + binarize_core.rc_dequant(f.residual, f.alpha_in[:, 1], f.alpha_out[1]))
  np.testing.assert_allclose(float(binarize_core.weighted_error(w, jnp.where(m, w_hat, 0.0), v * m)), errs[-1],
                             rtol=1e-5)
  assert bool(jnp.all(f.alpha_in == binarize_core.bf16_round(f.alpha_in)))


def _layer(seed=0, n_in=384, n_out=96):
  rng = np.random.default_rng(seed)
  w = (rng.standard_t(3, (n_in, n_out)) * 0.02).astype(np.float32)
  w[rng.choice(n_in, 8, replace=False)] *= 5
  x = rng.standard_normal((800, n_in)).astype(np.float32) * np.exp(0.5 * rng.standard_normal(n_in)).astype(np.float32)
  x[:, rng.choice(n_in, 4, replace=False)] *= 10
  h = jnp.asarray(2 / len(x) * x.T @ x)
  return jnp.asarray(w), base.LayerStats(h, jnp.zeros_like(h), len(x), 0), x


@pytest.mark.slow
def test_searched_counts_vary_by_block_and_bits_follow_them():
  w, stats, _ = _layer()
  # SAB with the paper's map searches per block (its loss-calibrated default plans the counts over the model)
  for provider in (providers.BiLLM(), providers.ArbRc(), providers.Sab(significance="hessian")):
    b = provider(w, stats)
    sal = np.asarray(b.parts.salient_rows)
    counts = [int(sal[i:i + 128].sum()) for i in range(0, len(sal), 128)]
    assert all(1 <= c <= binarize_core.SEARCH_MAX_ROWS for c in counts) and len(set(counts)) > 1, counts
    bits = bits_core.salient_split_bits(*w.shape, block_rows=[128] * 3, salient_per_block=counts,
                                        mode=b.parts.mode, split=True, salient_groups=b.parts.salient_groups)
    assert b.stored_bits == bits.stored_bits


@pytest.mark.slow
def test_search_and_refinement_lower_the_layer_output_error():
  """On a heavy-tailed layer with outlier inputs: ARB-RC (one salient group) with the search
  and refinement beats the fixed 8% of rows with the plain residual fit, and each ingredient
  helps on its own."""
  w, stats, x = _layer(1)
  err = lambda p: float(p(w, stats).error["output_rel"])
  old = err(providers.ArbRc(salient_rows=0.08, refine_iters=0, salient_groups=False))
  searched = err(providers.ArbRc(refine_iters=0, salient_groups=False))
  refined = err(providers.ArbRc(salient_rows=0.08, salient_groups=False))
  both = err(providers.ArbRc(salient_groups=False))
  assert both < refined < old and both < searched < old, (old, searched, refined, both)
  assert err(providers.BiLLM()) < err(providers.BiLLM(salient_rows=0.08))


def test_bad_salient_rows_and_refine_are_refused():
  w, stats, _ = _layer(2, 128, 16)
  with pytest.raises(ValueError, match="salient_rows"):
    providers.ArbRc(salient_rows="all")(w, stats)
  with pytest.raises(ValueError, match="refine"):  # BiLLM's mean-offset layout has no joint refinement
    salient_split.salient_split_ptq(w, stats.h, jnp.ones_like(w), block_size=128, salient_rows=0.1, iters=0,
                                    mode="mean_offset", split=True, refine=3)


@pytest.mark.slow
def test_salient_groups_split_the_salient_rows_and_lower_the_error():
  """ARB-LLM's `--order2_group`: the salient rows' entries in two groups by saliency, each
  with its own planes' scales. On the heavy-tailed layer the error drops, the bitmap marks
  a minority of each salient row's entries, the other rows keep their split, and the bits
  follow the formula."""
  w, stats, _ = _layer(1)
  one, two = providers.ArbRc(salient_groups=False)(w, stats), providers.ArbRc()(w, stats)
  assert float(two.error["output_rel"]) < 0.97 * float(one.error["output_rel"])
  p = two.parts.map(np.asarray)
  sal = p.salient_rows
  # the first block sees the same weights either way (later ones are compensated differently):
  # the same searched rows and the same split of the other rows
  first = slice(0, 128)
  np.testing.assert_array_equal(sal[first], np.asarray(one.parts.salient_rows)[first])
  rest = ~sal[first]
  np.testing.assert_array_equal(p.group_hi[first][rest], np.asarray(one.parts.group_hi)[first][rest])
  frac = p.group_hi[sal].mean()
  assert 0.05 < frac < 0.6, frac
  assert p.alpha_in.shape == (w.shape[0], 4) and p.alpha_out.shape == (3, 6, w.shape[1])
  assert np.all(p.alpha_in[~sal, 2:].astype(np.float32) == 1.0)
  counts = [int(sal[i:i + 128].sum()) for i in range(0, len(sal), 128)]
  bits = bits_core.salient_split_bits(*w.shape, block_rows=[128] * 3, salient_per_block=counts, mode="rc",
                                      split=True, salient_groups=True)
  assert two.stored_bits == bits.stored_bits
  assert two.stored_bits - one.stored_bits == bits.stored_bits - bits_core.salient_split_bits(
      *w.shape, block_rows=[128] * 3, salient_per_block=counts, mode="rc", split=True).stored_bits


def test_salient_groups_are_refused_where_the_layout_has_no_room():
  w, stats, _ = _layer(2, 128, 16)
  for kw in (dict(mode="mean_offset", split=True), dict(mode="rc", split=False, scale_block=128)):
    with pytest.raises(ValueError, match="salient_groups"):
      salient_split.salient_split_ptq(w, stats.h, jnp.ones_like(w), block_size=128, salient_rows=0.1, iters=0,
                                      salient_groups=True, **kw)


def test_residual_plane_gain_is_the_per_row_error_drop():
  rng = np.random.default_rng(3)
  w, v, d = rng.standard_t(3, (6, 40)), rng.uniform(0.5, 2, (6, 40)), rng.uniform(0.5, 1.5, 6)

  def err_after(x):
    a = (v * np.abs(x)).sum(1, keepdims=True) / v.sum(1, keepdims=True)
    r = x - a * np.where(x >= 0, 1.0, -1.0)
    return r, (v * r * r).sum(1)

  r1, e1 = err_after(w)
  _, e2 = err_after(r1)
  got = binarize_core.residual_plane_gain(jnp.asarray(w, jnp.float32), jnp.asarray(v, jnp.float32),
                                          jnp.asarray(d, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), (e1 - e2) / d ** 2, rtol=1e-4)


@pytest.mark.slow
def test_layer_budget_moves_the_fixed_total_to_where_it_helps():
  """Structured layout, 4 scale blocks of 256 inputs, heavy rows all in the first: the
  layer-wide budget keeps the fixed total (20 per block) but gives the first block more,
  and lowers the error; the bits follow the counts."""
  rng = np.random.default_rng(4)
  n_in, n_out = 1024, 64
  w = (rng.standard_t(3, (n_in, n_out)) * 0.02).astype(np.float32)
  w[rng.choice(256, 48, replace=False)] *= 6
  x = rng.standard_normal((1500, n_in)).astype(np.float32)
  h = jnp.asarray(2 / len(x) * x.T @ x)
  stats = base.LayerStats(h, jnp.zeros_like(h), len(x), 0)
  fixed = providers.ArbRc(structured=True, scale_block=256, salient_budget="group")(jnp.asarray(w), stats)
  spread = providers.ArbRc(structured=True, scale_block=256)(jnp.asarray(w), stats)  # "layer", the default
  count = lambda b: [int(np.asarray(b.parts.salient_rows)[i:i + 256].sum()) for i in range(0, n_in, 256)]
  assert count(fixed) == [20] * 4
  assert sum(count(spread)) == 80 and count(spread)[0] > 20, count(spread)
  assert float(spread.error["output_rel"]) < float(fixed.error["output_rel"])
  bits = bits_core.salient_split_bits(n_in, n_out, block_rows=[256] * 4, salient_per_block=count(spread),
                                      mode="rc", split=False)
  assert spread.stored_bits == bits.stored_bits
  with pytest.raises(ValueError, match="salient_budget"):
    providers.ArbRc(structured=True, salient_budget="model")(jnp.asarray(w), stats)
