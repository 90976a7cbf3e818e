"""Binarization primitives: exact ALS updates, monotone error, residual and split gains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.quant.core import binarize_core as bc


def _problem(seed=0, rows=24, cols=40):
  r = np.random.default_rng(seed)
  w = r.normal(size=(rows, cols)).astype(np.float32) * r.lognormal(0, 0.5, size=(rows, 1)).astype(np.float32)
  weight = r.uniform(0.1, 2.0, size=(rows, cols)).astype(np.float32)
  mask = r.uniform(size=(rows, cols)) < 0.7
  return jnp.asarray(w), jnp.asarray(weight), jnp.asarray(mask)


def _err(w, v, a_in, a_out):
  return bc.weighted_error(w, bc.rc_dequant(bc.sign(w), a_in, a_out), v)


def test_sign_of_zero_is_plus_one():
  """sign(0) = +1 so every entry has a sign bit."""
  np.testing.assert_array_equal(bc.sign(jnp.array([-2.0, 0.0, 3.0])), [-1.0, 1.0, 1.0])


def test_xnor_scales_are_column_mean_abs():
  """XNOR: alpha_out = mean |W| over inputs, signs = sign(W)."""
  w = jnp.array([[1.0, -2.0], [-3.0, 0.0]])
  signs, alpha = bc.xnor(w)
  np.testing.assert_allclose(alpha, [2.0, 1.0])
  np.testing.assert_array_equal(signs, [[1, -1], [-1, 1]])


@pytest.mark.parametrize("which", ["out", "in"])
def test_each_update_is_the_exact_minimiser(which):
  """After an alpha update the gradient of the weighted error wrt it is ~0 (jax.grad)."""
  w, weight, mask = _problem()
  v = weight * mask
  r = np.random.default_rng(1)
  a_in = jnp.asarray(r.uniform(0.5, 2.0, size=w.shape[0]), jnp.float32)
  a_out = jnp.asarray(r.uniform(0.5, 2.0, size=w.shape[1]), jnp.float32)
  if which == "out":
    grad_fn = jax.grad(lambda a: _err(w, v, a_in, a))
    before = grad_fn(a_out)
    after = grad_fn(bc.update_alpha_out(w, v, a_in, a_out))
  else:
    grad_fn = jax.grad(lambda a: _err(w, v, a, a_out))
    before = grad_fn(a_in)
    after = grad_fn(bc.update_alpha_in(w, v, a_out, a_in))
  assert float(jnp.max(jnp.abs(before))) > 1.0  # the test can fail: random scales are not optimal
  assert float(jnp.max(jnp.abs(after))) < 1e-4 * float(jnp.max(jnp.abs(before)))


def test_arb_rc_error_never_increases():
  """The weighted error is non-increasing over the alternating sweeps and drops overall."""
  w, weight, mask = _problem(seed=3)
  fit = bc.arb_rc(w, weight, mask, iters=15)
  errs = np.asarray(fit.errors)
  assert errs.shape == (16,)
  assert np.all(np.diff(errs) <= 1e-6 * errs[0])
  assert errs[-1] < 0.999 * errs[0]
  v = weight * mask
  np.testing.assert_allclose(float(_err(w, v, fit.alpha_in, fit.alpha_out)), errs[-1], rtol=1e-5)


def test_arb_rc_beats_per_output_scale_only():
  """Row and column scales fit a rank-1 magnitude pattern that XNOR cannot."""
  r = np.random.default_rng(2)
  mags = np.outer(r.lognormal(0, 1, 32), r.lognormal(0, 1, 16))
  w = jnp.asarray(mags * np.sign(r.normal(size=mags.shape)), jnp.float32)
  ones = jnp.ones(w.shape)
  fit = bc.arb_rc(w, ones, ones > 0, iters=15)
  signs, alpha = bc.xnor(w)
  xnor_err = float(jnp.sum(jnp.square(w - signs * alpha)))
  assert float(fit.errors[-1]) < 1e-3 * xnor_err


def test_masked_out_rows_keep_their_init():
  """Rows with no weight keep alpha_in = 1 (any value is a minimiser there)."""
  w, weight, _ = _problem()
  mask = jnp.zeros(w.shape, bool).at[:10].set(True)
  fit = bc.arb_rc(w, weight, mask, iters=3)
  np.testing.assert_array_equal(fit.alpha_in[10:], 1.0)
  assert np.all(np.isfinite(fit.alpha_in)) and np.all(np.isfinite(fit.alpha_out))


def test_residual_binarization_lowers_error():
  """Ŵ₁ + Ŵ₂ is closer to W than Ŵ₁."""
  w, weight, mask = _problem(seed=4)
  f1, _, w12 = bc.residual_binarize(w, weight, mask, iters=5)
  v = weight * mask
  assert float(bc.weighted_error(w, w12, v)) < 0.6 * float(f1.errors[-1])


def test_mean_offset_closed_form():
  """BiLLM binarizer: mu = mean, alpha = mean |W − mu| over the mask."""
  w = jnp.array([[1.0, 4.0], [3.0, -2.0], [100.0, 0.0]])
  mask = jnp.array([[True, True], [True, True], [False, True]])
  f = bc.mean_offset(w, mask)
  np.testing.assert_allclose(f.mu, [2.0, 2.0 / 3.0], rtol=1e-6)
  np.testing.assert_allclose(f.alpha_out, [1.0, (10 / 3 + 8 / 3 + 2 / 3) / 3], rtol=1e-6)


def test_split_search_picks_the_best_candidate_and_helps():
  """The bell-shaped split keeps the lowest-error break point and beats one group."""
  r = np.random.default_rng(5)
  w = jnp.asarray(r.laplace(size=(32, 64)), jnp.float32)
  ones = jnp.ones(w.shape)
  mask = ones > 0
  hi, t, errs = bc.split_search(w, ones, mask, bc.quick_rc)
  assert bool(jnp.all(jnp.isfinite(errs)))
  best = float(jnp.min(errs))
  w_hat = jnp.where(hi, bc.quick_rc(w, ones, hi), bc.quick_rc(w, ones, mask & ~hi))
  np.testing.assert_allclose(float(bc.weighted_error(w, w_hat, ones)), best, rtol=1e-5)
  assert bool(jnp.all(hi == (jnp.abs(w) > t)))
  one_group = float(bc.weighted_error(w, bc.quick_rc(w, ones, mask), ones))
  assert best < 0.6 * one_group


@pytest.mark.parametrize("mode,split", [("rc", True), pytest.param("rc", False, marks=pytest.mark.slow),
                                        pytest.param("mean_offset", True, marks=pytest.mark.slow)])
def test_salient_split_block(mode, split):
  """Salient-row block: n_salient valid rows flagged, parts rebuild Ŵ, padding is zero."""
  r = np.random.default_rng(6)
  w = jnp.asarray(r.normal(size=(16, 24)), jnp.float32)
  w = w.at[3].multiply(10.0)  # an obviously salient row
  valid = jnp.arange(16) < 13
  w = jnp.where(valid[:, None], w, 0.0)
  d = jnp.ones(16)
  w_hat, parts = bc.salient_split_block(w, jnp.ones(w.shape), d, valid, n_salient=3, iters=4,
                                        mode=mode, split=split)
  assert int(parts["salient_rows"].sum()) == 3 and bool(parts["salient_rows"][3])
  assert not bool(parts["salient_rows"][13:].any())
  np.testing.assert_array_equal(w_hat[13:], 0.0)
  np.testing.assert_array_equal(w_hat[:13], bc.compose_salient_split(parts, mode)[:13])
  assert ("group_hi" in parts) == split
  assert parts["alpha_out"].shape == (4 if split else 3, 24)
  # The residual plane makes the salient rows far more accurate than XNOR.
  sal = parts["salient_rows"]
  rel = jnp.sum(jnp.square(w - w_hat)[sal]) / jnp.sum(jnp.square(w)[sal])
  assert float(rel) < 0.25


def test_ste_gradient_is_the_clipped_identity():
  x = jnp.asarray([-2.0, -0.5, 0.0, 0.3, 0.9, 1.5])
  g = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  grad = jax.grad(lambda v: jnp.sum(bc.ste_sign(v, jnp.float32(1.0)) * g))(x)
  np.testing.assert_array_equal(np.asarray(grad), [0.0, 2.0, 3.0, 4.0, 5.0, 0.0])
  np.testing.assert_array_equal(np.asarray(bc.ste_sign(x, jnp.float32(1.0))), [-1, -1, 1, 1, 1, 1])
