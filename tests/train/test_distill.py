"""Quantization-aware distillation: the KD loss and the KD trainer (BinaryDense itself:
tests/quant/test_binary_dense.py; the STE: tests/quant/core/test_binarize_core.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import jax_events
from sab_jax import sharding
from sab_jax.calib import calibrate, sensitivity
from sab_jax.data import pipeline, tokenizer
from sab_jax.models import llava
from sab_jax.quant import providers, rules
from sab_jax.quant.providers.base import LayerStats
from sab_jax.train import distill, train

from experiments.configs import demo as demo_config


def _stats(rng, n_in):
  x = rng.standard_normal((256, n_in)).astype(np.float32) * rng.uniform(0.5, 2, n_in).astype(np.float32)
  h = jnp.asarray(2 / 256 * x.T @ x)
  return LayerStats(h, h * 1.5, 256, 256)


def test_kd_loss_is_the_kl_on_answer_positions():
  rng = np.random.default_rng(0)
  t = rng.standard_normal((2, 5, 7)).astype(np.float32)
  s = rng.standard_normal((2, 5, 7)).astype(np.float32)
  mask = np.zeros((2, 5), np.float32)
  mask[:, 3] = 1
  batch = {"loss_mask": jnp.asarray(mask), "input_ids": jnp.zeros((2, 5), jnp.int32)}
  assert float(distill.kd_loss(jnp.asarray(t), batch, jnp.asarray(t))) == pytest.approx(0.0, abs=1e-6)
  pt = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
  ps = np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)[:, 3].mean() * 4
  assert float(distill.kd_loss(jnp.asarray(s), batch, jnp.asarray(t), temperature=2.0)) == pytest.approx(kl, rel=1e-5)


def test_kd_loss_hidden_term_is_the_relative_error_on_answer_positions():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((2, 4, 5)).astype(np.float32))
  ht = rng.standard_normal((2, 4, 3)).astype(np.float32)
  hs = rng.standard_normal((2, 4, 3)).astype(np.float32)
  mask = np.array([[0, 1, 1, 0], [0, 0, 1, 0]], np.float32)
  batch = {"loss_mask": jnp.asarray(mask), "input_ids": jnp.zeros((2, 4), jnp.int32)}
  got = distill.kd_loss(logits, batch, logits, jnp.asarray(hs), jnp.asarray(ht), hidden_weight=2.0)
  m = mask[..., None]
  want = 2.0 * ((hs - ht) ** 2 * m).sum() / ((ht ** 2) * m).sum()
  assert float(got) == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="hidden states"):
    distill.kd_loss(logits, batch, logits, hidden_weight=1.0)


# --- the trainer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tiny_vqa):
  return tiny_vqa["train"]


def _data(source):
  return pipeline.make_dataset(source, tokenizer.WordTokenizer.for_synthetic_vqa(), num_image_tokens=16,
                               image_mean=pipeline.CLIP_MEAN, image_std=pipeline.CLIP_STD, batch_size=8,
                               max_prompt_len=32, max_answer_len=2, seed=1)


@pytest.fixture(scope="module")
def teacher_and_parts():
  teacher = llava.Model("demo", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  layers = {}
  for path in rules.select(teacher, rules.DECODER_ONLY):
    from sab_jax.models import paths
    k = paths.get(teacher, path).kernel[...]
    layers[path] = providers.Xnor()(k, _stats(rng, k.shape[0])).parts.map(np.asarray)
  return teacher, layers


def _config(steps, mesh=None):
  c = demo_config.get_config("smoke")
  c.unlock()
  c.distill.train.update(num_steps=steps, log_every=1, checkpoint_every=2, warmup_steps=1, lr=1e-3)
  if mesh:
    c.mesh = ml_collections.ConfigDict(mesh)
  return c


@pytest.fixture(scope="module")
def teacher_significance(source, teacher_and_parts):
  """The significance pass on the teacher's binarized layers (one calibration batch)."""
  teacher, layers = teacher_and_parts
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
  batches = calibrate.on_mesh([next(iter(_data(source)))], mesh, loss_mask=True)
  return sensitivity.measure(teacher, batches, sorted(layers), mesh)


def _distil(tmp, source, teacher_and_parts, steps, mesh=None, devices=None, significance=None, power=0.0):
  teacher, layers = teacher_and_parts
  student = distill.build_student(teacher, layers, significance=significance, significance_power=power)
  cfg = _config(steps, mesh)
  m = sharding.make_mesh(dict(cfg.mesh), devices=devices)
  loss_fn = functools.partial(distill.kd_loss, ce_weight=0.1, hidden_weight=0.5)  # every term on
  return train.train(cfg.distill.train, str(tmp), student, _data(source), mesh=m, rules=cfg.logical_axis_rules,
                     loss_fn=loss_fn, name="kd", teacher=teacher, wrt=distill.TRAINABLE)


def _on_device_0(model):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(jax.tree.map(np.asarray, state), jax.devices()[0]))


@pytest.mark.slow
def test_distillation_on_8_devices_matches_1_device(tmp_path, source, teacher_and_parts, teacher_significance):
  """With the significance step on (the student carries the map; its latents are m ⊙ u)."""
  assert jax.device_count() == 8
  sig = {"significance": teacher_significance, "power": 0.5}
  student, one = _distil(tmp_path / "a", source, teacher_and_parts, 4, {"data": 1, "fsdp": 1, "model": 1},
                         devices=jax.devices()[:1], **sig)
  with jax_events.recorded(jax_events.LOWERED) as lowered:
    _, eight = _distil(tmp_path / "b", source, teacher_and_parts, 4, {"data": 4, "fsdp": 1, "model": 2}, **sig)
  np.testing.assert_allclose([l for _, l in eight], [l for _, l in one], rtol=2e-4)
  # One program for the 4 steps: the updated state keeps its layout (XLA would split the
  # binarized layers' replicated scales over the mesh, and step 2 would be compiled again).
  assert lowered.count("jit(<unnamed function>)") == 1, lowered
  # The student moves towards the teacher: its KD loss on the first training batch falls
  # (per-step losses are on different batches, too noisy over 4 steps to compare).
  teacher, layers = (_on_device_0(teacher_and_parts[0]), teacher_and_parts[1])
  batch = {k: jnp.asarray(v) for k, v in next(iter(_data(source))).items() if k != "answer" and k != "answers"}
  inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
  t_logits, t_aux = teacher.forward(*inputs)

  def kd(model):
    logits, aux = model.forward(*inputs)
    return float(distill.kd_loss(logits, batch, t_logits, aux["hidden"], t_aux["hidden"], ce_weight=0.1,
                                 hidden_weight=0.5))

  assert kd(_on_device_0(student)) < kd(distill.build_student(teacher, layers))
  # frozen parameters are the teacher's, untouched
  teacher = teacher_and_parts[0]
  np.testing.assert_array_equal(np.asarray(student.language_model.embed_tokens.embedding[...]),
                                np.asarray(teacher.language_model.embed_tokens.embedding[...]))


def test_the_permuted_significance_puts_the_same_values_on_other_weights():
  from quant.sensitivity_fixture import with_sensitivity
  rng = np.random.default_rng(2)
  sens = {f"l{i}": with_sensitivity(_stats(rng, 24), 16, seed=i).sensitivity for i in range(2)}
  shuffled = distill.permuted(sens, seed=0)
  assert distill.permuted(sens, seed=0).keys() == sens.keys()
  for p in sens:
    a, b = np.asarray(sens[p].loss_weight()), np.asarray(shuffled[p].loss_weight())
    np.testing.assert_allclose(np.sort(a.ravel()), np.sort(b.ravel()), rtol=1e-6)  # the same values
    assert not np.allclose(a, b)  # on other weights
    np.testing.assert_array_equal(np.asarray(shuffled[p].loss_weight()),
                                  np.asarray(distill.permuted(sens, seed=0)[p].loss_weight()))  # seeded
