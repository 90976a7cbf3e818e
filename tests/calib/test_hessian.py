"""Modality Hessians: 8 simulated devices give the float64 numpy answer."""

import jax
import numpy as np
import pytest

from sab_jax import sharding
from sab_jax.calib import hessian


@pytest.mark.parametrize("mesh_axes", [{"data": 8}, {"data": 2, "fsdp": 2, "model": 2}, {"data": 1, "model": 8}])
def test_sharded_hessian_equals_float64_reference(mesh_axes):
  rng = np.random.default_rng(0)
  b, t, d = 16, 12, 24
  mix = rng.normal(size=(d, d))
  x = (rng.normal(size=(b, t, d)) @ mix).astype(np.float32)  # correlated features
  vis = np.zeros((b, t), np.float32)
  vis[:, 1:6] = 1
  text = np.ones((b, t), np.float32) - vis
  text[::3, -2:] = 0  # some padding: in neither modality
  mesh = sharding.make_mesh(mesh_axes)
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
  acc = hessian.Accumulator()
  for half in (slice(0, 8), slice(8, 16)):  # two calibration batches
    acc.add(put(x[half]), put(text[half]), put(vis[half]), mesh)
  stats = acc.stats()

  x64 = x.reshape(-1, d).astype(np.float64)
  t64, v64 = text.reshape(-1).astype(bool), vis.reshape(-1).astype(bool)
  ref_t = 2.0 / t64.sum() * x64[t64].T @ x64[t64]
  ref_v = 2.0 / v64.sum() * x64[v64].T @ x64[v64]
  assert (stats.n_text, stats.n_vis) == (t64.sum(), v64.sum())
  np.testing.assert_allclose(np.asarray(stats.h_text), ref_t, rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(stats.h_vis), ref_v, rtol=2e-5, atol=1e-4)
  both = np.concatenate([x64[t64], x64[v64]])
  np.testing.assert_allclose(np.asarray(stats.h), 2.0 / len(both) * both.T @ both, rtol=2e-5, atol=1e-4)


def test_no_tokens_is_an_error():
  with pytest.raises(ValueError, match="calibration"):
    hessian.Accumulator().stats()
