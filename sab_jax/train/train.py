"""Training loop: one flat function in banner sections (big_vision's train.py shape).

Trains the full-precision LVLM on answer tokens (the embedded workload's teacher), or a
student against a teacher (`distill`). Sharded over the mesh it is given with logical-axis
rules; parameters and optimiser state are initialised into their shardings, batches are
assembled from each process's shard. The step (`train_step`) is a module-level function
so that benchmarks time exactly what training runs.
Resume order: this workdir's latest checkpoint > the model as passed in (random or
loaded by the caller). A resumed run continues the same data order and ends where an
uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sab_jax import errors, sharding as sharding_lib
from sab_jax.models import paths
from sab_jax.train import checkpointing

if TYPE_CHECKING:  # configs are ConfigDicts, but the GPU image has no ml-collections
  import ml_collections


def answer_cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy over answer positions (`loss_mask`)."""
  targets = jnp.roll(batch["input_ids"], -1, axis=1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = batch["loss_mask"]
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def zero_init(model: nnx.Module, pattern: str) -> list[str]:
  """Zeroes the kernels of Dense layers whose path fully matches `pattern`; returns their paths.

  Zeroing each residual branch's output projection makes every block start as the
  identity (SkipInit/Fixup, arXiv 2002.10444): a randomly initialised ViT otherwise
  mixes the 16 patch features into near copies of each other, and the LVLM sits on the
  answer prior for thousands of steps before it learns to look at the image.
  """
  hit = []
  for path, dense in paths.dense_layers(model):
    if re.fullmatch(pattern, path):
      dense.kernel[...] = jnp.zeros_like(dense.kernel[...])
      hit.append(path)
  if pattern and not hit:
    raise errors.UserError(f"config.train.zero_init={pattern!r} matches no Dense layer")
  return hit


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay, global-norm clipping.

  `cfg.nonfinite == "skip"` (optional; default "stop"): a step whose gradients are not
  finite leaves the parameters unchanged (optax.apply_if_finite, at most 10 in a row)
  instead of stopping the run at the next log step.
  """
  if not 0 <= cfg.warmup_steps < cfg.num_steps:
    raise errors.UserError(f"warmup_steps={cfg.warmup_steps} must be in [0, num_steps={cfg.num_steps}): lower "
                     f"config.train.warmup_steps (config.distill.train.warmup_steps when distilling)")
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.num_steps,
                                                end_value=cfg.lr * cfg.final_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))
  policy = getattr(cfg, "nonfinite", "stop")
  if policy not in ("stop", "skip"):
    raise errors.UserError(f"config.train.nonfinite={policy!r}: use 'stop' or 'skip'")
  return optax.apply_if_finite(tx, max_consecutive_errors=10) if policy == "skip" else tx


def _device_batch(batch: dict[str, np.ndarray], mesh, keys) -> dict[str, jax.Array]:
  """Global arrays from this process's part of the batch, split over the data axes."""
  return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, batch[k].ndim), batch[k])
          for k in keys}


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, teacher: nnx.Module | None,
               batch: dict[str, jax.Array], *, loss_fn: Callable, wrt: Any = nnx.Param,
               shardings: tuple[Any, Any] | None = None) -> jax.Array:
  """One forward, backward and optimiser update of `model` in place; returns the loss.

  Without a teacher: `loss_fn(logits, batch)`. With one (distillation): the teacher runs
  on the same inputs, gradient-free, and `loss_fn(logits, batch, teacher_logits, hidden,
  teacher_hidden)` sees both models' logits and final hidden states (`forward`). Only the
  variables matching `wrt` are differentiated and updated. With `shardings` (the model's
  and the optimiser's state shardings, as `train` placed them) the updated state keeps
  them: left to XLA, some come back laid out otherwise (a binarized layer's replicated
  scales split over fsdp), and the next step is compiled a second time for the new inputs.
  Not jitted: `make_train_step` is, and the benchmarks time that same function.
  """
  inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
  if teacher is not None:
    t_logits, t_aux = jax.lax.stop_gradient(teacher.forward(*inputs))

  def loss_of(m):
    if teacher is None:
      return loss_fn(m(*inputs), batch)
    logits, aux = m.forward(*inputs)
    return loss_fn(logits, batch, t_logits, aux["hidden"], t_aux["hidden"])

  loss, grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, wrt))(model)
  optimizer.update(model, grads)
  if shardings is not None:
    model_shardings, opt_shardings = shardings
    nnx.update(model, jax.lax.with_sharding_constraint(nnx.state(model), model_shardings))
    nnx.update(optimizer, jax.lax.with_sharding_constraint(nnx.state(optimizer, nnx.OptState), opt_shardings))
  return loss


def make_train_step(loss_fn: Callable = answer_cross_entropy, wrt: Any = nnx.Param,
                    shardings: tuple[Any, Any] | None = None) -> Callable:
  """`train_step` for one loss, filter and state layout, jitted; (model, optimizer, teacher, batch) -> loss.

  The model's and optimiser's buffers are donated (updated in place, no second copy of
  the parameters and moments); a teacher passed in must not share them.
  """
  return nnx.jit(functools.partial(train_step, loss_fn=loss_fn, wrt=wrt, shardings=shardings),
                 donate_argnums=(0, 1))


def train(tc: ml_collections.ConfigDict, workdir: str, model: nnx.Module, data: Any, *, mesh: Any,
          rules: Any, loss_fn: Callable = answer_cross_entropy, name: str = "train",
          teacher: nnx.Module | None = None, wrt: Any = nnx.Param) -> tuple[nnx.Module, list[tuple[int, float]]]:
  """Trains `model` in place on `data` for `tc.num_steps` steps.

  Args:
    tc: the training settings (`config.train`, or `config.distill.train` when distilling):
      num_steps, the optimiser's (`make_optimizer`), log_every, checkpoint_every, keep_checkpoints.
    workdir: checkpoints go to `workdir/checkpoints/<name>`, TensorBoard to `workdir/tb/<name>`.
    model: the model to train (its current weights are the starting point).
    data: a `grain.IterDataset` of pipeline batches (repeating).
    mesh: the device mesh to train on (`sharding.make_mesh`).
    rules: logical-axis rules placing parameters and optimiser state on `mesh` (`config.logical_axis_rules`).
    loss_fn: as `train_step` takes it.
    name: the run's name under workdir.
    teacher: a frozen model run on the same batch, placed on the same mesh (distillation).
    wrt: which variables the optimiser updates (an nnx filter; default every Param).
  Returns:
    (the trained model, [(step, mean loss since the previous log)] for this run's steps).
  """
  keys = ("input_ids", "attention_mask", "loss_mask", "pixel_values")

  # --- shardings -----------------------------------------------------------------------
  rules = tuple(tuple(r) for r in rules)
  graphdef, state = nnx.split(model)
  model_shardings = sharding_lib.state_shardings(state, mesh, rules)
  model = nnx.merge(graphdef, jax.device_put(state, model_shardings))
  if teacher is not None:
    teacher = sharding_lib.place(teacher, mesh, rules)
  optimizer = nnx.Optimizer(model, make_optimizer(tc), wrt=wrt)
  opt_state = nnx.state(optimizer, nnx.OptState)  # moments follow their parameters; counters replicate
  opt_shardings = sharding_lib.state_shardings(opt_state, mesh, rules)
  nnx.update(optimizer, jax.device_put(opt_state, opt_shardings))

  # --- resume --------------------------------------------------------------------------
  ckpt_dir = os.path.join(workdir, "checkpoints", name)
  mngr = checkpointing.manager(ckpt_dir, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints)
  data_iter = iter(data)
  start = 0
  restored = checkpointing.restore_latest(mngr, model, optimizer)
  if restored is not None:
    start, data_state = restored
    if data_state:
      data_iter.set_state(data_state)
    print(f"[{name}] resuming from checkpoint step {start} in {ckpt_dir}", flush=True)
  step_fn = make_train_step(loss_fn, wrt, shardings=(model_shardings, opt_shardings))

  # --- loop ----------------------------------------------------------------------------
  writer = _summary_writer(os.path.join(workdir, "tb", name))
  t0, history, window = time.time(), [], []
  try:
    for step in range(start + 1, tc.num_steps + 1):
      batch = _device_batch(next(data_iter), mesh, keys)
      window.append(step_fn(model, optimizer, teacher, batch))
      if step % tc.log_every == 0 or step == tc.num_steps:
        losses = np.asarray(jax.device_get(window))
        window = []
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(f"[{name}] non-finite loss by step {step}; lower config.train.lr or check the "
                                   f"data. Checkpoints up to the last finite step are kept in {ckpt_dir}")
        history.append((step, float(losses.mean())))
        rate = (step - start) / (time.time() - t0)
        eta = (tc.num_steps - step) / max(rate, 1e-9)
        print(f"[{name}] step {step}/{tc.num_steps} loss {losses.mean():.4f} {rate:.2f} steps/s "
              f"ETA {eta / 60:.1f} min", flush=True)
        if writer is not None:
          writer.add_scalar("loss", float(losses.mean()), step)
          writer.add_scalar("steps_per_second", rate, step)
      checkpointing.save(mngr, step, model, optimizer, data_iter.get_state, force=step == tc.num_steps)
  finally:  # an interrupted run still completes the saves already under way
    mngr.wait_until_finished()
    if writer is not None:
      writer.close()
  return model, history


def _summary_writer(path: str):
  """TensorBoard event files via tensorboardX (no TensorFlow needed), from process 0 only."""
  if jax.process_index() != 0:
    return None
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # optional on GPU/TPU images; metrics still go to stdout
    logging.warning("tensorboardX not installed: no TensorBoard metrics")
    return None
  return SummaryWriter(path)
