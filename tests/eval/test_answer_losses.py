"""The teacher-forced answer losses every evaluation records, against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sab_jax.eval import vqa
from sab_jax.models import llava


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_answer_ce_and_kl_per_row_match_numpy():
  model, teacher = llava.Model("test", rngs=nnx.Rngs(0)), llava.Model("test", rngs=nnx.Rngs(1))
  cfg = model.cfg
  r = np.random.default_rng(0)
  b, n_img = 4, cfg.num_image_tokens
  ids = np.concatenate([np.ones((b, 1)), np.full((b, n_img), cfg.image_token_id),
                        r.integers(5, cfg.text.vocab_size, (b, 6))], axis=1).astype(np.int32)
  mask = np.ones(ids.shape, np.int32)
  loss_mask = np.zeros(ids.shape, np.float32)
  loss_mask[:, -4:-1] = 1.0
  loss_mask[0, -2] = 0.0  # rows need not have the same number of answer tokens
  pixels = r.normal(size=(b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  args = [jnp.asarray(a) for a in (ids, pixels, mask, loss_mask)]
  rows = np.asarray(vqa._answer_loss_rows(model, teacher, *args), np.float64)

  logp = _log_softmax(np.asarray(model(*args[:3]), np.float64))
  t_logp = _log_softmax(np.asarray(teacher(*args[:3]), np.float64))
  targets = np.roll(ids, -1, axis=1)
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  kl = (np.exp(t_logp) * (t_logp - logp)).sum(-1)
  np.testing.assert_allclose(rows[:, 0], (ce * loss_mask).sum(1), rtol=1e-4)
  np.testing.assert_allclose(rows[:, 1], (kl * loss_mask).sum(1), rtol=1e-3)
  np.testing.assert_array_equal(rows[:, 2], loss_mask.sum(1))
  same = np.asarray(vqa._answer_loss_rows(model, model, *args))
  assert np.abs(same[:, 1]).max() < 1e-5  # KL(p ‖ p) = 0
  none = np.asarray(vqa._answer_loss_rows(model, None, *args))
  np.testing.assert_allclose(none[:, 0], rows[:, 0], rtol=1e-6)
  assert not none[:, 1].any()
