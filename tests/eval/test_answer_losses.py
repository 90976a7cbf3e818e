"""The teacher-forced answer losses every evaluation records, against float64 numpy."""

import jax
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


def test_evaluation_compiles_each_program_once_per_model():
  """A model from host arrays (as `serve.packed.from_export` builds it) and a teacher restored on
  a device: with nnx.jit's default graph updates the model's state came back committed after
  the first batch, and the next batch lowered and compiled greedy decoding and the loss pass a
  second time (twice per evaluated model in every pipeline)."""
  from jax_events import LOWERED, recorded
  from sab_jax.data import pipeline, synthetic_vqa
  from sab_jax.data import tokenizer as tokenizer_lib

  model, teacher = llava.Model("test", rngs=nnx.Rngs(0)), llava.Model("test", rngs=nnx.Rngs(1))
  nnx.update(teacher, jax.device_put(nnx.state(teacher), jax.devices()[0]))  # committed, as one restored by orbax
  tok = tokenizer_lib.WordTokenizer.for_synthetic_vqa()
  records = list(synthetic_vqa.generate_split("test", 9))
  batches = pipeline.make_dataset(  # 3 batches of 3, a shape no other test evaluates
      records, tok, num_image_tokens=model.cfg.num_image_tokens, image_mean=pipeline.CLIP_MEAN,
      image_std=pipeline.CLIP_STD, batch_size=3, max_prompt_len=model.cfg.num_image_tokens + 21, max_answer_len=2,
      shuffle=False, num_epochs=1, drop_remainder=False, image_size=model.cfg.vision.image_size, shard_index=0,
      shard_count=1)
  with recorded(LOWERED) as lowered:
    table = vqa.evaluate(model, batches, tok, question_types=synthetic_vqa.QUESTION_TYPES, teacher=teacher)
  assert table["count"] == 9 and np.isfinite(table["kl_from_teacher"])
  assert lowered.count("jit(greedy_generate)") == 1 and lowered.count("jit(_answer_loss_rows)") == 1, lowered
