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
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from flax import nnx, traverse_util


# Orbax saves a replicated array "replica-parallel": each replica writes 1/n of it, cut out
# on device by a slicing program. For a large array that spreads the writing over the
# devices (or hosts); for a small one it is n device-to-host copies and n tiny programs
# instead of one copy. A model's norms, biases, scales and optimiser counters are small:
# on 8 CPU devices the smoke run's 18 saves spent 11 s in those copies (2.5 s whole).
# So a replica's share must be at least this big to be written apart; the bytes on disk
# are the same either way.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's pytree handler, with small arrays written whole (MIN_REPLICA_SLICE_BYTES)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                                 array_metadata_store=array_metadata_store.Store())),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      *((t, ocp.type_handlers.ScalarHandler()) for t in (int, float, np.number)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _pytree_restore(target) -> ocp.args.PyTreeRestore:
  """Restores into `target`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def manager(directory: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in ("params", "opt_state"):
    registry.add(item, ocp.args.PyTreeSave, _pytree_handler())
    registry.add(item, ocp.args.PyTreeRestore)
  registry.add("data_iter", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  registry.add("data_iter", ocp.args.JsonRestore)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, handler_registry=registry)


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
  items = {"params": ocp.args.PyTreeSave(params)}
  if optimizer is not None:  # (orbax refuses an empty tree)
    items["opt_state"] = ocp.args.PyTreeSave(nnx.state(optimizer, nnx.OptState))
  items["data_iter"] = ocp.args.JsonSave(data_state() if data_state else {})
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(mngr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer | None
                   ) -> tuple[int, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into `model`/`optimizer` in place.

  Returns (step, data-iterator state), or None when there is nothing to resume.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    items = {"params": _pytree_restore(nnx.state(model, nnx.Param)), "data_iter": ocp.args.JsonRestore()}
    if optimizer is not None:
      items["opt_state"] = _pytree_restore(nnx.state(optimizer, nnx.OptState))
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**items))
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
  with ocp.Checkpointer(_pytree_handler()) as ckpt:
    ckpt.save(os.path.join(path, "params"), args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)), force=True)
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
