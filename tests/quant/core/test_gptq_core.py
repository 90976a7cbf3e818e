"""GPTQ loop: exact block form of the column sweep, and compensation that pays off."""

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.quant.core import binarize_core as bc
from sab_jax.quant.core import gptq_core as gc


def _correlated_x(seed, tokens, n_in):
  r = np.random.default_rng(seed)
  base = r.normal(size=(tokens, 4))
  mix = r.normal(size=(4, n_in))
  return (base @ mix + 0.2 * r.normal(size=(tokens, n_in))).astype(np.float32)


def _xnor_block(w, d, valid):
  """XNOR over the block's real rows (padding rows excluded from the mean)."""
  alpha = jnp.sum(jnp.abs(w), axis=0) / jnp.sum(valid)
  return jnp.where(valid[:, None], bc.sign(w) * alpha, 0.0), ()


def test_upper_factor_of_damped_inverse():
  """UᵀU = (H + 0.01·mean(diag H)·I)⁻¹ and U is upper triangular."""
  x = _correlated_x(0, 200, 12)
  h = 2 / 200 * x.T @ x
  u = np.asarray(gc.hessian_inverse_cholesky(jnp.asarray(h)), np.float64)
  damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(12)
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-3, atol=1e-4 * np.abs(np.linalg.inv(damped)).max())
  np.testing.assert_array_equal(np.tril(u, -1), 0.0)


@pytest.mark.parametrize("n_in,block", [(48, 16), pytest.param(40, 16, marks=pytest.mark.slow)])
def test_block_form_equals_column_sweep(n_in, block):
  """The triangular-solve block update equals GPTQ's column-by-column sweep (float64)."""
  x = _correlated_x(1, 300, n_in).astype(np.float64)
  w = np.random.default_rng(2).normal(size=(n_in, 10))
  h = 2 / 300 * x.T @ x
  u = np.asarray(gc.hessian_inverse_cholesky(jnp.asarray(h, jnp.float32)), np.float64)
  got, _, _ = gc.gptq_quantize(jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32), _xnor_block,
                            block_size=block)
  # Reference: quantize each block from the current weights, then sweep its columns.
  cur, out = w.copy(), np.zeros_like(w)
  for r0 in range(0, n_in, block):
    r1 = min(r0 + block, n_in)
    blk = cur[r0:r1]
    q = np.sign(np.where(blk == 0, 1, blk)) * np.abs(blk).mean(0)
    out[r0:r1] = q
    for i in range(r0, r1):
      err = (cur[i] - q[i - r0]) / u[i, i]
      cur[i + 1:] -= np.outer(u[i, i + 1:], err)
  np.testing.assert_allclose(np.asarray(got), out, rtol=2e-3, atol=2e-3 * np.abs(out).max())


def test_compensation_lowers_output_error():
  """On strongly correlated inputs ‖XW − XŴ‖ is much lower with compensation."""
  n_in, n_out = 64, 32
  x = _correlated_x(3, 512, n_in)
  w = np.random.default_rng(4).normal(size=(n_in, n_out)).astype(np.float32)
  h = jnp.asarray(2 / 512 * x.T @ x)
  u = gc.hessian_inverse_cholesky(h)
  kw = dict(block_size=16)
  with_c, _, _ = gc.gptq_quantize(jnp.asarray(w), u, _xnor_block, compensate=True, **kw)
  without, _, _ = gc.gptq_quantize(jnp.asarray(w), u, _xnor_block, compensate=False, **kw)
  e_with = np.linalg.norm(x @ (w - np.asarray(with_c)))
  e_without = np.linalg.norm(x @ (w - np.asarray(without)))
  assert e_with < 0.7 * e_without
  np.testing.assert_allclose(float(gc.output_error(jnp.asarray(w), with_c, h)),
                             2 / 512 * e_with ** 2, rtol=1e-3)


def test_identity_quantizer_and_diagonal_hessian():
  """q = w leaves W unchanged; a diagonal H makes compensation a no-op."""
  r = np.random.default_rng(5)
  w = jnp.asarray(r.normal(size=(40, 8)), jnp.float32)
  h = jnp.diag(jnp.asarray(r.uniform(0.5, 2.0, 40), jnp.float32))
  u = gc.hessian_inverse_cholesky(h)
  same, _, _ = gc.gptq_quantize(w, u, lambda w, d, v: (w, ()), block_size=16)
  np.testing.assert_allclose(same, w, rtol=1e-6)
  a, _, _ = gc.gptq_quantize(w, u, _xnor_block, block_size=16, compensate=True)
  b, _, _ = gc.gptq_quantize(w, u, _xnor_block, block_size=16, compensate=False)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_zero_hessian_is_identity():
  """No calibration data: U = I/√1.01, finite."""
  u = gc.hessian_inverse_cholesky(jnp.zeros((5, 5)))
  np.testing.assert_allclose(u, np.eye(5) / np.sqrt(1.01), rtol=1e-6)


def test_group_state_is_computed_on_compensated_weights():
  """A one-block group whose state holds the block's XNOR scale equals the plain loop."""
  n_in = 48
  x = _correlated_x(6, 300, n_in)
  w = jnp.asarray(np.random.default_rng(7).normal(size=(n_in, 8)), jnp.float32)
  u = gc.hessian_inverse_cholesky(jnp.asarray(2 / 300 * x.T @ x))

  def prepare(w_grp, d, valid):
    return jnp.sum(jnp.abs(w_grp), axis=0) / jnp.sum(valid)

  def block(w_blk, d, valid, *, state, offset):
    del offset
    return jnp.where(valid[:, None], bc.sign(w_blk) * state, 0.0), ()

  plain, _, _ = gc.gptq_quantize(w, u, _xnor_block, block_size=16)
  grouped, _, states = gc.gptq_quantize(w, u, block, block_size=16, group_size=16,
                                        prepare_group=prepare)
  np.testing.assert_allclose(grouped, plain, rtol=1e-5, atol=1e-6)
  assert states.shape == (3, 8)
  # Larger groups share the scale: only 2 distinct |Ŵ| rows per output among 48.
  g32, _, states = gc.gptq_quantize(w, u, block, block_size=16, group_size=32,
                                    prepare_group=prepare)
  assert states.shape == (2, 8)
  np.testing.assert_allclose(jnp.abs(g32[:32]), jnp.broadcast_to(states[0], (32, 8)), rtol=1e-6)
