"""The significance pass: per-token output gradients, their modality sums, per-question weights, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sab_jax import sharding
from sab_jax.calib import sensitivity
from sab_jax.models import llava, paths as module_paths
from sab_jax.quant import rules
from calib.calib_fixture import batches



def _batches(cfg, n=2):
  return batches(cfg, n=n, answers=True)


def _on(mesh, batches):
  put = lambda a: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, a.ndim), a)
  return [{k: put(v) for k, v in b.items()} for b in batches]


@pytest.fixture(scope="module")
def model():
  return llava.Model("test", rngs=nnx.Rngs(0))


def _decoder(model):
  return tuple(rules.select(model, rules.DECODER_ONLY))


@pytest.mark.slow
def test_output_gradients_rebuild_the_kernel_gradient(model):
  """Σ_t x_t ∂L/∂y_tᵀ is ∂L/∂W: the probes see the true per-token output gradients."""
  batch = {k: jnp.asarray(v) for k, v in _batches(model.cfg, n=1)[0].items()}
  key = jax.random.key(3)
  paths = _decoder(model)
  with module_paths.wrapped(model, paths, sensitivity.Probe):
    g, x = nnx.jit(sensitivity.output_gradients)(model, batch, key)

  def loss(m):
    logits = m(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    return sensitivity.sampled_answer_loss(logits, batch["loss_mask"], key)

  grads = nnx.grad(loss)(model)
  for p in paths:
    want = np.asarray(module_paths.get(grads, p).kernel[...], np.float64)
    got = np.einsum("btj,btk->jk", np.asarray(x[p], np.float64), np.asarray(g[p], np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def test_each_question_weighs_one_and_dead_modalities_are_exactly_zero(model):
  mesh = sharding.make_mesh({"data": 8})
  batches = _batches(model.cfg)
  sens = sensitivity.measure(model, _on(mesh, batches), _decoder(model), mesh, normalize="question")
  total = sum(float(jnp.sum(s.grad_text) + jnp.sum(s.grad_vis)) for s in sens.values())
  assert total == pytest.approx(sum(len(b["input_ids"]) for b in batches), rel=1e-4)
  last = len(model.language_model.layers) - 1
  for name in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj", "v_proj"):
    path = next(p for p in sens if p.startswith(f"language_model.layers.{last}.") and p.endswith(name))
    vis = float(jnp.sum(sens[path].grad_vis))
    # after the last layer an image position's own output reaches no answer; its keys and values do
    assert (vis > 0) if name in ("k_proj", "v_proj") else (vis == 0.0), (path, vis)
    assert float(jnp.sum(sens[path].grad_text)) > 0
  # the inputs' diagonal is 2/N Σ x² per modality, as the layer's Hessians
  first = sens["language_model.layers.0.mlp.down_proj"]
  assert np.all(np.asarray(first.diag_text) > 0) and np.all(np.asarray(first.diag_vis) > 0)


def test_same_result_on_1_and_8_devices():
  out = []
  for n in (1, 8):
    model = llava.Model("test", rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh({"data": n}, devices=jax.devices()[:n])
    model = sharding.place(model, mesh)
    out.append(sensitivity.measure(model, _on(mesh, _batches(model.cfg, n=1)), _decoder(model), mesh, samples=2,
                                   seed=5))
  for p in out[0]:
    for f in ("grad_text", "grad_vis", "diag_text", "diag_vis"):
      np.testing.assert_allclose(np.asarray(getattr(out[1][p], f)), np.asarray(getattr(out[0][p], f)),
                                 rtol=1e-4, atol=1e-9)


def test_unnormalised_sums_follow_the_loss_scale_and_bad_options_are_refused(model):
  mesh = sharding.make_mesh({"data": 8})
  batches = _on(mesh, _batches(model.cfg, n=1))
  paths = _decoder(model)
  raw = sensitivity.measure(model, batches, paths, mesh, normalize="none", seed=1)
  norm = sensitivity.measure(model, batches, paths, mesh, normalize="question", seed=1)
  p = paths[0]
  assert not np.allclose(np.asarray(raw[p].grad_text), np.asarray(norm[p].grad_text))
  np.testing.assert_allclose(np.asarray(raw[p].diag_text), np.asarray(norm[p].diag_text))
  with pytest.raises(ValueError, match="normalize"):
    sensitivity.measure(model, batches, paths, mesh, normalize="token")
  with pytest.raises(ValueError, match="samples"):
    sensitivity.measure(model, batches, paths, mesh, samples=0)
