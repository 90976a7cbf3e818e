"""Significance map: float64 numpy reference, Hoyer extremes, partition bookkeeping."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.quant.core import significance_core as sc


def _hessian(r, n_in, tokens, scale):
  x = r.normal(size=(tokens, n_in)) * scale
  x = x @ (np.eye(n_in) + 0.3 * r.normal(size=(n_in, n_in)))
  return 2.0 / tokens * x.T @ x


def _reference(w, ht, hv, p, q):
  """Straight float64 transcription of the module docstring."""
  def sal(h):
    h = h + np.diag((np.diag(h) == 0).astype(float))
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    s = w ** 2 / np.diag(np.linalg.inv(h))[:, None] ** 2
    return s / s.sum()
  st, sv = sal(ht), sal(hv)
  l1, l2 = st + sv, np.sqrt(st ** 2 + sv ** 2)
  rho = (math.sqrt(2) - l1 / l2) / (math.sqrt(2) - 1)
  tot = st + sv
  k = math.ceil(p * w.size)
  order = np.argsort(-tot.ravel())[:k]
  salient = np.zeros(w.size, bool)
  salient[order] = True
  salient = salient.reshape(w.shape)
  gap = np.abs(st - sv) / tot
  tau = np.quantile(gap.ravel()[order], q)
  single = salient & (gap >= tau) & (gap > 0)
  r = tot[single].sum() / tot.sum()
  lam = r * rho + (1 - r) * (1 - rho)
  return dict(s_text=st, s_vis=sv, rho=rho, lam=lam, salient=salient, r=r,
              text_only=single & (st > sv), vis_only=single & (sv > st), cross=salient & ~single)


def test_matches_float64_reference():
  """Every field equals a float64 numpy transcription on a tiny layer."""
  r = np.random.default_rng(0)
  n_in, n_out = 6, 5
  w = r.normal(size=(n_in, n_out))
  ht = _hessian(r, n_in, 50, r.lognormal(0, 1, n_in))
  hv = _hessian(r, n_in, 40, r.lognormal(0, 1, n_in))
  ref = _reference(w, ht, hv, 0.2, 0.5)
  got = sc.significance_map(jnp.asarray(w, jnp.float32), jnp.asarray(ht, jnp.float32),
                            jnp.asarray(hv, jnp.float32), has_text=True, has_vis=True,
                            salient_top_p=0.2, diff_quantile=0.5)
  for key in ("s_text", "s_vis", "rho", "lam"):
    np.testing.assert_allclose(np.asarray(getattr(got, key)), ref[key], rtol=2e-4, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(float(got.r), ref["r"], rtol=2e-4)
  for key in ("salient", "text_only", "vis_only", "cross"):
    np.testing.assert_array_equal(np.asarray(getattr(got, key)), ref[key], err_msg=key)
  assert 0 < float(got.r) < 1 and ref["cross"].any() and (ref["text_only"] | ref["vis_only"]).any()


def test_hoyer_extremes():
  """ρ(a, 0) = 1, ρ(a, a) = 0, ρ(0, 0) = 0, no underflow for tiny scores."""
  a = jnp.array([1.0, 1e-30, 2.0, 0.0, 3.0])
  b = jnp.array([0.0, 0.0, 2.0, 0.0, 1.0])
  rho = sc.hoyer_rho(a, b)
  np.testing.assert_allclose(rho[:4], [1.0, 1.0, 0.0, 0.0], atol=1e-6)
  expect = (math.sqrt(2) - 4 / math.sqrt(10)) / (math.sqrt(2) - 1)
  np.testing.assert_allclose(rho[4], expect, rtol=1e-5)


def test_one_modality_gives_rho_one_and_constant_lambda():
  """S_vis = 0 (no image tokens): ρ = 1, all salient weights single-modality, Λ ≡ r."""
  r = np.random.default_rng(1)
  w = jnp.asarray(r.normal(size=(8, 12)), jnp.float32)
  ht = jnp.asarray(_hessian(r, 8, 64, 1.0), jnp.float32)
  sig = sc.significance_map(w, ht, jnp.zeros((8, 8)), has_text=True, has_vis=False,
                            salient_top_p=0.1)
  np.testing.assert_allclose(sig.rho, 1.0, atol=1e-6)
  np.testing.assert_array_equal(sig.s_vis, 0.0)
  np.testing.assert_array_equal(sig.text_only, sig.salient)
  assert not bool(sig.cross.any()) and not bool(sig.vis_only.any())
  np.testing.assert_allclose(sig.lam, float(sig.r), rtol=1e-6)
  np.testing.assert_allclose(float(sig.r), float(jnp.sum(jnp.where(sig.salient, sig.s_text, 0))), rtol=1e-5)


def test_equal_modalities_give_rho_zero():
  """H_text = H_vis: ρ = 0 everywhere, every salient weight cross-modal, r = 0, Λ ≡ 1."""
  r = np.random.default_rng(2)
  w = jnp.asarray(r.normal(size=(8, 12)), jnp.float32)
  h = jnp.asarray(_hessian(r, 8, 64, 1.0), jnp.float32)
  sig = sc.significance_map(w, h, h, has_text=True, has_vis=True, salient_top_p=0.1)
  np.testing.assert_allclose(sig.rho, 0.0, atol=1e-3)
  np.testing.assert_array_equal(sig.cross, sig.salient)
  assert float(sig.r) == 0.0
  np.testing.assert_allclose(sig.lam, 1.0, atol=1e-3)


@pytest.mark.parametrize("p", [0.05, pytest.param(0.3, marks=pytest.mark.slow)])
def test_partition_is_a_partition(p):
  """ceil(p·N) salient weights, split exactly into text-only / vision-only / cross."""
  r = np.random.default_rng(3)
  w = jnp.asarray(r.normal(size=(16, 20)), jnp.float32)
  ht = jnp.asarray(_hessian(r, 16, 64, r.lognormal(0, 1, 16)), jnp.float32)
  hv = jnp.asarray(_hessian(r, 16, 64, r.lognormal(0, 1, 16)), jnp.float32)
  sig = sc.significance_map(w, ht, hv, has_text=True, has_vis=True, salient_top_p=p)
  assert int(sig.salient.sum()) == math.ceil(p * w.size)
  parts = sig.text_only.astype(int) + sig.vis_only.astype(int) + sig.cross.astype(int)
  np.testing.assert_array_equal(parts, sig.salient.astype(int))
  assert float(jnp.min(sig.lam)) >= min(float(sig.r), 1 - float(sig.r)) - 1e-6
  np.testing.assert_allclose(float(jnp.sum(sig.s_text)), 1.0, rtol=1e-5)


def test_top_k_mask_is_exact_with_ties():
  """Exactly k entries, all >= every unselected one; ties broken by index."""
  x = jnp.array([0.0, 3.0, 1.0, 3.0, 3.0, 2.0, 0.0])
  np.testing.assert_array_equal(sc.top_k_mask(x, 2), [0, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(sc.top_k_mask(x, 5), [0, 1, 1, 1, 1, 1, 0])
  r = np.random.default_rng(4).exponential(size=(30, 40)).astype(np.float32)
  m = np.asarray(sc.top_k_mask(jnp.asarray(r), 77))
  assert m.sum() == 77 and r[m].min() > r[~m].max()
