"""The training loop: exact resume after an interruption, mesh-independence, NaN handling."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from sab_jax import sharding
from sab_jax.data import pipeline, tokenizer
from sab_jax.models import llava
from sab_jax.train import checkpointing, train
import ml_collections

from experiments.configs import demo as demo_config


@pytest.fixture(scope="module")
def source(tiny_vqa):
  return tiny_vqa["train"]


def _config(steps=6, mesh=None):
  c = demo_config.get_config("smoke")
  c.unlock()
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every, c.train.warmup_steps = steps, 1, 2, 2
  if mesh:
    c.mesh = ml_collections.ConfigDict(mesh)
  return c


def _data(source, batch_size=8):
  return pipeline.make_dataset(source, tokenizer.WordTokenizer.for_synthetic_vqa(), num_image_tokens=16,
                               image_mean=pipeline.CLIP_MEAN, image_std=pipeline.CLIP_STD, batch_size=batch_size,
                               max_prompt_len=32, max_answer_len=2, seed=1)


def _model():
  return llava.Model("demo", rngs=nnx.Rngs(0))


def _train(cfg, workdir, model, data, **kw):
  """train.train as the teacher stage calls it: the train settings, the mesh and the rules."""
  return train.train(cfg.train, workdir, model, data, mesh=sharding.make_mesh(dict(cfg.mesh)),
                     rules=cfg.logical_axis_rules, **kw)


class _Interrupt(Exception):
  pass


class _StopAfter:
  """Wraps a grain dataset; its iterator raises after `n` batches (a crash mid-run)."""

  def __init__(self, ds, n):
    self.ds, self.n = ds, n

  def __iter__(self):
    it, n = iter(self.ds), self.n

    class It:
      def __next__(self):
        nonlocal n
        if n == 0:
          raise _Interrupt()
        n -= 1
        return next(it)

      get_state, set_state = it.get_state, it.set_state

    return It()


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, source):
  cfg = _config()
  full, hist_full = _train(cfg, str(tmp_path / "a"), _model(), _data(source), name="t")
  with pytest.raises(_Interrupt):
    _train(cfg, str(tmp_path / "b"), _model(), _StopAfter(_data(source), 5), name="t")
  assert 4 in checkpointing.manager(str(tmp_path / "b" / "checkpoints" / "t"), save_every=2, keep=2).all_steps()
  resumed, hist_resumed = _train(cfg, str(tmp_path / "b"), _model(), _data(source), name="t")
  assert [s for s, _ in hist_resumed] == [5, 6]  # resumed at step 4, not from scratch
  np.testing.assert_allclose(hist_resumed[-1][1], hist_full[-1][1], rtol=1e-5)
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_loss_trajectory_is_independent_of_the_mesh(tmp_path, source):
  assert jax.device_count() == 8
  _, data_parallel = _train(_config(4, {"data": 8, "fsdp": 1, "model": 1}), str(tmp_path / "a"), _model(),
                            _data(source), name="t")
  _, mixed = _train(_config(4, {"data": 2, "fsdp": 2, "model": 2}), str(tmp_path / "b"), _model(),
                    _data(source), name="t")
  np.testing.assert_allclose([l for _, l in data_parallel], [l for _, l in mixed], rtol=2e-4)
  assert data_parallel[-1][1] < data_parallel[0][1]  # it does learn


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, source):
  cfg = _config(4)
  _train(cfg, str(tmp_path), _model(), _data(source), name="t")
  ckpt = tmp_path / "checkpoints" / "t"
  for root, _, files in os.walk(ckpt / "4"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  mngr = checkpointing.manager(str(ckpt), save_every=2, keep=2)
  model = _model()
  opt = nnx.Optimizer(model, train.make_optimizer(cfg.train), wrt=nnx.Param)
  step, _ = checkpointing.restore_latest(mngr, model, opt)
  assert step == 2


def test_nonfinite_loss_stops_with_the_step(tmp_path, source):
  cfg = _config(3)
  cfg.train.lr = float("nan")
  with pytest.raises(FloatingPointError, match="step 1"):
    _train(cfg, str(tmp_path), _model(), _data(source), name="t")


def test_warm_start_keeps_stored_params_and_inits_new_ones(tmp_path):
  """A checkpoint of the model without image coordinates warm-starts the model with them:
  every stored parameter is copied, the coordinate embedding keeps its init; a checkpoint
  with parameters the model lacks, or other shapes, is refused."""
  small = llava.Llava(llava.config_from_dict({"variant": "demo", "image_coordinates": False}), rngs=nnx.Rngs(1))
  checkpointing.save_params(str(tmp_path / "small"), small, {"note": "test"})
  grown = llava.Llava(llava.config_from_dict({"variant": "demo"}), rngs=nnx.Rngs(2))
  init = np.asarray(grown.image_coordinate_embedding[...])
  meta = checkpointing.load_params(str(tmp_path / "small"), grown, partial=True)
  assert meta["not_in_checkpoint"] == ["image_coordinate_embedding"] and meta["note"] == "test"
  np.testing.assert_array_equal(np.asarray(grown.image_coordinate_embedding[...]), init)
  s, g = nnx.state(small, nnx.Param), nnx.state(grown, nnx.Param)
  for path, leaf in jax.tree_util.tree_leaves_with_path(s):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.tree_util.tree_reduce(
        lambda a, b: b, [x for p, x in jax.tree_util.tree_leaves_with_path(g) if p == path])))
  with pytest.raises(ValueError):  # strict loading still refuses the missing parameter
    checkpointing.load_params(str(tmp_path / "small"), _fresh(image_coordinates=True))
  checkpointing.save_params(str(tmp_path / "grown"), grown, {})
  with pytest.raises(ValueError, match="image_coordinate_embedding"):
    checkpointing.load_params(str(tmp_path / "grown"), _fresh(image_coordinates=False), partial=True)
  with pytest.raises(ValueError, match="shape"):
    checkpointing.load_params(str(tmp_path / "small"), _fresh(text={"intermediate_size": 256}), partial=True)


def _fresh(**fields):
  return llava.Llava(llava.config_from_dict({"variant": "demo", **fields}), rngs=nnx.Rngs(3))
