"""BinaryDense, the trainable form of a binarized layer: built from PTQ parts it is the PTQ
layer, only latents and scales get gradients, masks never change, the STE latent gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sab_jax.quant import binary_dense, providers
from sab_jax.quant.providers.base import LayerStats
from sab_jax.train import distill
from quant.sensitivity_fixture import with_sensitivity

PROVIDERS = {"xnor": providers.Xnor(), "sab_structured": providers.Sab(structured=True),
             "arb_rc": providers.ArbRc(), "sab": providers.Sab(), "billm": providers.BiLLM(),
             "pbllm": providers.PbLlm()}


def _stats(rng, n_in, n_out):
  x = rng.standard_normal((256, n_in)).astype(np.float32) * rng.uniform(0.5, 2, n_in).astype(np.float32)
  h = jnp.asarray(2 / 256 * x.T @ x)
  return with_sensitivity(LayerStats(h, h * 1.5, 256, 256), n_out)


@pytest.mark.parametrize("name,shape", [
    pytest.param(name, shape, id=f"shape{i}-{name}", marks=() if (name, i) == ("sab", 0) else pytest.mark.slow)
    for i, shape in enumerate([(256, 96), (600, 64)]) for name in PROVIDERS])
def test_binary_dense_starts_as_the_ptq_layer(name, shape):
  rng = np.random.default_rng(shape[0])
  w = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)
  b = PROVIDERS[name](w, _stats(rng, *shape))
  parts = b.parts.map(np.asarray)
  layer = binary_dense.BinaryDense(parts)
  np.testing.assert_array_equal(np.asarray(layer.weight()), np.asarray(b.w_hat))
  back = layer.to_parts()
  assert type(back) is type(parts) and back.meta() == parts.meta() and set(back.arrays()) == set(parts.arrays())
  for k, v in parts.arrays().items():
    np.testing.assert_array_equal(back.arrays()[k], v, err_msg=k)


@pytest.mark.slow
def test_only_latents_and_scales_get_gradients_and_masks_never_change():
  rng = np.random.default_rng(0)
  shape = (256, 64)
  w = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)
  provider = providers.ArbRc()
  b = provider(w, _stats(rng, *shape))
  layer = binary_dense.BinaryDense(b.parts)
  x = jnp.asarray(rng.standard_normal((4, shape[0])).astype(np.float32))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, distill.TRAINABLE))(layer)
  kinds = {type(v) for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert kinds == {binary_dense.Latent, binary_dense.Scale}
  assert float(jnp.abs(grads["kernel"][...]).sum()) > 0
  masks = [np.asarray(layer.salient_rows[...]), np.asarray(layer.group_hi[...])]
  opt = nnx.Optimizer(layer, __import__("optax").adam(1e-2), wrt=distill.TRAINABLE)
  opt.update(layer, grads)
  np.testing.assert_array_equal(np.asarray(layer.salient_rows[...]), masks[0])
  np.testing.assert_array_equal(np.asarray(layer.group_hi[...]), masks[1])


def test_latent_gradient_of_an_xnor_layer():
  """d/dW Σ (x Ŵ)·g with Ŵ = sign(W)·α_out: (xᵀ g)·α_out inside the clip, 0 outside."""
  rng = np.random.default_rng(1)
  n_in, n_out = 64, 32
  w = jnp.asarray(rng.standard_normal((n_in, n_out)).astype(np.float32))
  b = providers.Xnor()(w, _stats(rng, n_in, w.shape[1]))
  layer = binary_dense.BinaryDense(b.parts, clip=0.5)
  layer.kernel[...] = w  # latent wider than the clip in places
  x = jnp.asarray(rng.standard_normal((3, n_in)).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((3, n_out)).astype(np.float32))
  grads = nnx.grad(lambda m: jnp.sum(m(x) * g), argnums=nnx.DiffState(0, binary_dense.Latent))(layer)
  a = np.asarray(layer.alpha_out[...])
  inside = np.abs(np.asarray(w)) <= 0.5 * a.max()
  want = (np.asarray(x).T @ np.asarray(g)) * a[None, :] * inside
  np.testing.assert_allclose(np.asarray(grads["kernel"][...]), want, rtol=1e-5, atol=1e-6)
  assert 0 < inside.mean() < 1


# --- significance-stepped weights -------------------------------------------------------------

def _significant_layer(power, shape=(128, 48), seed=3):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)
  stats = _stats(rng, *shape)
  b = providers.Sab(structured=True)(w, stats)
  return b, binary_dense.BinaryDense(b.parts, significance=stats.sensitivity, significance_power=power), stats


def test_significance_map_is_the_measured_loss_weight_and_step_0_is_the_ptq_layer():
  b, layer, stats = _significant_layer(0.5)
  np.testing.assert_allclose(np.asarray(layer.significance_map()), np.asarray(stats.sensitivity.loss_weight()),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(layer.weight()), np.asarray(b.w_hat))
  for k, v in b.parts.arrays().items():
    np.testing.assert_array_equal(np.asarray(layer.to_parts().arrays()[k]), np.asarray(v), err_msg=k)
  m = np.asarray(binary_dense.step_multiplier(layer.significance_map(), 0.5))
  assert m.mean() == pytest.approx(1.0, rel=1e-5)  # the layer's average step is the learning rate's
  assert 4 < m.max() / m.min() <= binary_dense.MAX_STEP_RATIO ** 2 * (1 + 1e-5)  # the map tells weights apart
  s = np.asarray(layer.significance_map())
  assert np.corrcoef(np.log(s).ravel(), np.log(m).ravel())[0, 1] > 0.9


@pytest.mark.parametrize("power", [0.5, -0.5])
def test_adam_moves_each_latent_weight_by_its_significance_step(power):
  """One Adam step moves every latent entry by ≈ lr (|m̂/√v̂| = 1 on step 1); with the
  significance step, weight (j,k) moves lr·m[j,k], as the map asks, the other way with power < 0."""
  _, layer, _ = _significant_layer(power)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((16, layer.in_features)).astype(np.float32))
  before = np.asarray(layer.latent())
  m = np.asarray(binary_dense.step_multiplier(layer.significance_map(), power))
  grads = nnx.grad(lambda l: jnp.sum(l(x) ** 2), argnums=nnx.DiffState(0, binary_dense.Latent))(layer)
  g = np.asarray(grads["kernel"][...])
  opt = nnx.Optimizer(layer, __import__("optax").adam(1e-3, eps=1e-20), wrt=binary_dense.Latent)
  opt.update(layer, grads)
  moved = np.abs(np.asarray(layer.latent()) - before)
  live = np.abs(g) > 1e-12  # entries inside the straight-through window
  assert live.mean() > 0.5
  np.testing.assert_allclose(moved[live], 1e-3 * m[live], rtol=1e-3)


def test_a_significance_step_needs_the_map():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
  b = providers.Xnor()(w, _stats(rng, 64, 32))
  with pytest.raises(ValueError, match="significance"):
    binary_dense.BinaryDense(b.parts, significance_power=1.0)
