"""Orbax checkpoints of a training run: parameters, optimiser state, data-iterator state.

Resume order (first that exists wins): this workdir's latest checkpoint > a given
initial model (e.g. the shipped teacher) > random initialisation. A checkpoint that
fails to restore is reported and the previous one is tried, never silently skipped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx, traverse_util


def manager(directory: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("params", "opt_state", "data_iter"))


@jax.jit
def _all_finite(tree) -> jax.Array:
  """One program and one device-to-host read for the whole tree (not two tiny ops per leaf)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.bool_(True)]))


def save(mngr: ocp.CheckpointManager, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
         data_state: Callable[[], dict[str, Any]] | None, *, force: bool = False) -> bool:
  """Saves if the manager's policy says so (or `force`); never saves non-finite parameters."""
  if not (force or mngr.should_save(step)):
    return False
  params = nnx.state(model, nnx.Param)
  if not bool(_all_finite(params)):
    raise FloatingPointError(f"refusing to save step {step}: parameters are not finite")
  items = {"params": ocp.args.StandardSave(params)}
  items["opt_state"] = ocp.args.StandardSave(nnx.state(optimizer, nnx.OptState) if optimizer is not None else {})
  items["data_iter"] = ocp.args.JsonSave(data_state() if data_state else {})
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(mngr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer | None
                   ) -> tuple[int, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into `model`/`optimizer` in place.

  Returns (step, data-iterator state), or None when there is nothing to resume.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    params = nnx.state(model, nnx.Param)
    opt = nnx.state(optimizer, nnx.OptState) if optimizer is not None else {}
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt),
          data_iter=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged step; we name it and fall back
      logging.error("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    step, mngr.directory, type(e).__name__, e)
      print(f"WARNING: checkpoint step {step} is corrupt ({type(e).__name__}); falling back to an older one")
      continue
    nnx.update(model, out["params"])
    if optimizer is not None:
      nnx.update(optimizer, out["opt_state"])
    return step, dict(out["data_iter"] or {})
  return None


def save_params(path: str, model: nnx.Module, meta: dict[str, Any]) -> None:
  """A parameters-only checkpoint plus `meta.json` (model config, tokenizer, provenance)."""
  path = os.path.abspath(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "params"), nnx.state(model, nnx.Param), force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:  # one writer: the processes' metas differ (timings)
    with open(os.path.join(path, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)


def load_params(path: str, model: nnx.Module, *, partial: bool = False) -> dict[str, Any]:
  """Restores a `save_params` checkpoint into `model` (shapes must agree); returns its meta.

  With `partial`, parameters the checkpoint lacks keep their current values (a warm start
  of a model that has grown parameters); their paths are in `meta["not_in_checkpoint"]`.
  """
  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, "meta.json")):
    raise FileNotFoundError(f"{path} is not a parameters checkpoint (no meta.json): train one with "
                            f"--config.teacher.retrain=True or point config.teacher.init at one")
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  target = nnx.state(model, nnx.Param)
  missing: list[str] = []
  if partial:  # read what is stored, then copy it over the model's own values
    restored, missing = _restore_present(os.path.join(path, "params"), target)
  else:
    try:
      restored = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    except ValueError as e:
      raise ValueError(f"{path} does not match the model built from the config ({e}); check config.model "
                       f"against {os.path.join(path, 'meta.json')}") from e
  nnx.update(model, restored)
  return {**meta, "not_in_checkpoint": missing} if partial else meta


def _restore_present(path: str, target: nnx.State) -> tuple[nnx.State, list[str]]:
  """`target` with every parameter the checkpoint at `path` holds replaced by the stored
  value (shapes must agree), and the names of the parameters it does not hold."""
  stored = {".".join(map(str, k[:-1] if k[-1] == "value" else k)): v for k, v in
            traverse_util.flatten_dict(ocp.StandardCheckpointer().restore(path)).items()}
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(target))
  missing = []
  unused = set(stored) - {".".join(map(str, k)) for k in flat}
  if unused:
    raise ValueError(f"{path} holds parameters the model lacks: {sorted(unused)}; check config.model")
  for key, value in flat.items():
    name = ".".join(map(str, key))
    if name not in stored:
      missing.append(name)
    elif tuple(stored[name].shape) != tuple(value.shape):
      raise ValueError(f"{path}: {name} is stored with shape {tuple(stored[name].shape)}, the model has "
                       f"{tuple(value.shape)}; check config.model")
    else:
      flat[key] = jax.numpy.asarray(stored[name], value.dtype)
  nnx.replace_by_pure_dict(target, traverse_util.unflatten_dict(flat))
  return target, missing
