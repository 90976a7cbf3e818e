"""Reading an export back (layout: `sab_jax.export.manifest`), strictly.

`read` checks an export against a model template and returns the decoded parts of every
binarized layer and the values of every other param (what a packed inference model is
built from); `load` is `read` + each layout's dequantizer, into a copy of the template.

Every refusal is one line naming the export directory, what is wrong and the fix:
  * `sab_jax.errors.DamagedExport` when the files are not what the writer wrote: a missing
    or unparsable manifest, an orbax state that does not restore (the array that does not
    read is named: after a failed restore of the whole tree each array is restored alone),
    an array whose checksum differs from the manifest's (a flipped bit that still
    decompresses), arrays the manifest and the checkpoint do not agree on, parts that do
    not decode. The fix is to re-export.
  * `sab_jax.errors.UserError` when the export is sound but does not fit: a template of
    another model config or shape, an unknown format_version or provider.
Both derive from ValueError.

The checks run in groups, one function each, in this order: the manifest vs the
template's config (`_check_config`, before any array is read), the arrays vs their
checksums (`_check_checksums`; format_version 1 has none and skips it), the binarized
layers of the manifest vs the checkpoint vs the template (`_check_layers`), the other
params likewise (`_check_params`), the int8 params and their scales (`_check_int8`), and
the decoded parts (`_decode_layers`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sab_jax.errors import DamagedExport, UserError
from sab_jax.export import packing
from sab_jax.export.int8 import INT8_DTYPE, SCALE_DTYPE, dequantize_int8
from sab_jax.export.manifest import (MANIFEST, REEXPORT, STATE, array_checksum, differing_keys, flatten, jsonable,
                                     nest, provider_from_spec, read_manifest)
from sab_jax.models import paths
from sab_jax.quant.providers.base import Parts, dequantize

TREES = ("layers", "params", "int8_params", "int8_scales")
_FIX = ("the export and the template disagree: build the template from the manifest's model_config, "
        "or re-export the model")
_DAMAGED = f"the export is damaged: {REEXPORT}"


def decode_layer(stored: Mapping[str, Any], part_specs: Mapping[str, Mapping[str, Any]], provider: Any) -> Parts:
  """The typed parts of one binarized layer from its stored arrays (inverse of the writer's encoding).

  The one place the reader turns stored arrays into parts (`writer.export(verify=True)`
  decodes with it too).

  Args:
    stored: {part name: the array as stored}.
    part_specs: the layer's `parts` in the manifest (each part's `shape` and `compact_shape`).
    provider: the manifest's provider: its layout says how the parts were stored
      (`Parts.storage`) and `provider.from_arrays` types them.

  Returns:
    The provider's typed parts, exactly as it produced them (invariants checked).

  Raises:
    ValueError: for stored arrays that do not decode to the declared shapes or break the
      layout's invariants.
  """
  arrays = packing.decode_parts(stored, {k: tuple(ps["compact_shape"]) for k, ps in part_specs.items()},
                                {k: tuple(ps["shape"]) for k, ps in part_specs.items()}, provider.parts_class)
  for k, ps in part_specs.items():
    if str(arrays[k].dtype) != ps["dtype"]:
      raise ValueError(f"part {k!r} decodes to {arrays[k].dtype}, the manifest declares {ps['dtype']}")
  parts = provider.from_arrays(arrays)
  parts.check()
  return parts


# --- the orbax state ------------------------------------------------------------------------

def _cause(e: BaseException) -> str:
  """The gist of an orbax / tensorstore error: its first line, after the file it names."""
  lines = str(e).strip().splitlines()
  line = lines[0].rsplit('": ', 1)[-1] if lines else type(e).__name__
  return line if len(line) <= 160 else line[:157] + "..."


def _unreadable(directory: str, error: BaseException) -> DamagedExport:
  """Which array of a state that failed to restore is damaged: restores them one at a time."""
  state_dir = os.path.join(directory, STATE)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      leaves = flatten(ckpt.metadata(state_dir).item_metadata.tree)
  except Exception as e:  # any failure here means damaged metadata
    return DamagedExport(f"{directory}: the metadata of {STATE}/ cannot be read ({_cause(e)}); {_DAMAGED}")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
    for name, leaf in leaves.items():
      item = nest({name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)})
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      try:
        ckpt.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                            partial_restore=True))
      except Exception as e:  # the first array that does not restore alone is the damaged one
        return DamagedExport(f"{directory}: array {name!r} of {STATE}/ cannot be read ({_cause(e)}); {_DAMAGED}")
  return DamagedExport(f"{directory}: {STATE}/ cannot be restored ({_cause(error)}); {_DAMAGED}")


def _drop_closed_loop_noise(previous: Any, unraisable: Any) -> None:
  """An unraisable-exception hook: drops asyncio's "Event loop is closed", passes the rest on."""
  e = unraisable.exc_value
  if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
    previous(unraisable)


def _restore(directory: str) -> dict[str, dict[str, np.ndarray]]:
  """{tree: {dotted path: numpy array}} of the export's state; DamagedExport if it does not restore.

  When orbax's restore fails, the tensorstore reads still in flight complete later into the
  asyncio loop orbax has closed, and each prints a "RuntimeError: Event loop is closed"
  traceback through `sys.unraisablehook`, for as long as they take. So the restore runs
  with a hook that drops those (and only those): removed again after a restore that
  succeeds, kept for the rest of the process after one that fails.
  """
  state_dir = os.path.join(directory, STATE)
  if not os.path.isdir(state_dir):
    raise DamagedExport(f"{directory}: {STATE}/ is missing, although {MANIFEST} is there; {_DAMAGED}")
  previous = hook = sys.unraisablehook
  if getattr(previous, "func", None) is not _drop_closed_loop_noise:  # not yet kept from an earlier failure
    sys.unraisablehook = hook = functools.partial(_drop_closed_loop_noise, previous)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(state_dir)
  except Exception as e:  # orbax / tensorstore raise many types for damaged files
    raise _unreadable(directory, e) from None
  if sys.unraisablehook is hook and hook is not previous:
    sys.unraisablehook = previous
  unknown = sorted(set(state) - set(TREES))
  if unknown:
    raise UserError(f"{directory}: the checkpoint holds unknown trees {unknown}; load it with the sab_jax "
                    f"version that wrote it")
  return {t: {p: np.asarray(a) for p, a in flatten(state[t]).items()} for t in TREES if t in state}


# --- the checks, one group each -------------------------------------------------------------

def _set_difference_error(what: str, expected: set[str], found: set[str], error: type[Exception],
                          fix: str) -> None:
  missing, extra = sorted(expected - found), sorted(found - expected)
  if missing or extra:
    raise error(f"{what}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"extra {extra[:8]}{' ...' if len(extra) > 8 else ''}; {fix}")


def _check_config(directory: str, manifest: Mapping[str, Any], template: nnx.Module) -> None:
  """The manifest's model_config vs the template's (when both have one)."""
  template_cfg = jsonable(template.cfg) if hasattr(template, "cfg") else None
  if manifest.get("model_config") is not None and template_cfg is not None \
      and manifest["model_config"] != template_cfg:
    _, _, diff = differing_keys(manifest["model_config"], template_cfg)
    raise UserError(f"{directory}: the template's config differs from the exported model's in {diff}; {_FIX}")


def _check_checksums(directory: str, manifest: Mapping[str, Any], state: Mapping[str, Mapping[str, Any]]) -> None:
  """Every stored array vs its checksum in the manifest (format_version >= 2)."""
  if manifest["format_version"] < 2:
    return
  sums = manifest["checksums"]
  arrays = {f"{t}.{p}": a for t, flat in state.items() for p, a in flat.items()}
  _set_difference_error(f"{directory}: arrays with a checksum in {MANIFEST} vs arrays in the checkpoint",
                        set(sums), set(arrays), DamagedExport, _DAMAGED)
  for name, a in arrays.items():
    if array_checksum(a) != sums[name]:
      raise DamagedExport(f"{directory}: array {name!r} ({a.dtype}{list(a.shape)}) does not match its checksum "
                          f"in {MANIFEST}; {_DAMAGED}")


def _check_layers(directory: str, manifest: Mapping[str, Any], stored_layers: Mapping[str, np.ndarray],
                  template: nnx.Module) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """Binarized layers: manifest vs checkpoint vs template; returns (specs, stored arrays) by layer."""
  dense = dict(paths.dense_layers(template))
  params = paths.params(template)
  specs = {l["path"]: l for l in manifest["layers"]}
  if len(specs) != len(manifest["layers"]):
    raise DamagedExport(f"{directory}: the manifest lists a layer twice; {REEXPORT}")
  expected = {f"{p}.{k}" for p, l in specs.items() for k in l["parts"]}
  stored_layers = dict(stored_layers)
  for p, l in specs.items():  # zero-size parts are declared, not saved (the writer)
    for k, ps in l["parts"].items():
      if 0 in ps["stored_shape"] and f"{p}.{k}" not in stored_layers:
        stored_layers[f"{p}.{k}"] = np.zeros(ps["stored_shape"], jnp.dtype(ps["stored_dtype"]))
  _set_difference_error(f"{directory}: binarized layer parts of the manifest vs the checkpoint", expected,
                        set(stored_layers), DamagedExport, _DAMAGED)
  not_dense = sorted(set(specs) - set(dense))
  if not_dense:
    raise UserError(f"{directory}: layers {not_dense} of the export are not Dense layers of the template; {_FIX}")
  stored: dict[str, dict[str, np.ndarray]] = {}
  for path, spec in specs.items():
    kernel_shape = tuple(params[f"{path}.kernel"].get_value().shape)
    if tuple(spec["shape"]) != kernel_shape:
      raise UserError(f"{directory}: layer {path!r} has shape {tuple(spec['shape'])} in the manifest but "
                      f"{kernel_shape} in the template; {_FIX}")
    stored[path] = {}
    for k, ps in spec["parts"].items():
      a = stored_layers[f"{path}.{k}"]
      if tuple(a.shape) != tuple(ps["stored_shape"]) or str(a.dtype) != ps["stored_dtype"]:
        raise DamagedExport(f"{directory}: part {k!r} of layer {path!r} is stored as {a.dtype}{list(a.shape)} "
                            f"but the manifest declares {ps['stored_dtype']}{ps['stored_shape']}; {_DAMAGED}")
      stored[path][k] = a
  return specs, stored


def _check_params(directory: str, manifest: Mapping[str, Any], state: Mapping[str, Mapping[str, np.ndarray]],
                  template: nnx.Module) -> dict[str, np.ndarray]:
  """Non-binarized params: manifest vs checkpoint vs template; returns {path: stored array} (bf16 or int8)."""
  stored_bf16, stored_int8 = state.get("params", {}), state.get("int8_params", {})
  params = paths.params(template)
  kernels = {f"{l['path']}.kernel" for l in manifest["layers"]}
  both = sorted(set(stored_bf16) & set(stored_int8))
  if both:
    raise DamagedExport(f"{directory}: params {both[:8]} are stored both in bf16 and in int8; {_DAMAGED}")
  stored = {**stored_bf16, **stored_int8}
  _set_difference_error(f"{directory}: non-binarized params of the checkpoint vs the template",
                        set(params) - kernels, set(stored), UserError, _FIX)
  _set_difference_error(f"{directory}: non-binarized params of the manifest vs the checkpoint",
                        set(manifest["params"]), set(stored), DamagedExport, _DAMAGED)
  for p, a in stored.items():
    declared = tuple(manifest["params"][p]["shape"])
    if tuple(a.shape) != declared:
      raise DamagedExport(f"{directory}: param {p!r} is stored with shape {tuple(a.shape)} but the manifest "
                          f"declares {declared}; {_DAMAGED}")
    want = tuple(params[p].get_value().shape)
    if tuple(a.shape) != want:
      raise UserError(f"{directory}: param {p!r} has shape {tuple(a.shape)} in the export but {want} in the "
                      f"template; {_FIX}")
  return dict(sorted(stored.items()))


def _check_int8(directory: str, manifest: Mapping[str, Any], state: Mapping[str, Mapping[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
  """int8 params: manifest vs checkpoint, codes vs scales; returns {path: scale array}."""
  stored_int8, stored_scales = state.get("int8_params", {}), state.get("int8_scales", {})
  declared = {p for p, s in manifest["params"].items() if s["dtype"] == str(np.dtype(INT8_DTYPE))}
  _set_difference_error(f"{directory}: int8 params of the manifest vs the checkpoint", declared,
                        set(stored_int8), DamagedExport, _DAMAGED)
  _set_difference_error(f"{directory}: int8 params vs their scales in the checkpoint", set(stored_int8),
                        set(stored_scales), DamagedExport, _DAMAGED)
  for p, a in stored_int8.items():
    scale = stored_scales[p]
    ss = manifest["params"][p].get("scale") or {}
    axis = ss.get("axis") if isinstance(ss, dict) else None
    want_scale = None
    if isinstance(axis, int) and 0 <= axis < a.ndim:
      want_scale = list(a.shape)
      want_scale[axis] = 1
    if (a.dtype != INT8_DTYPE or want_scale is None or list(scale.shape) != want_scale
        or list(ss.get("shape", [])) != want_scale or str(scale.dtype) != ss.get("dtype")
        or scale.dtype != SCALE_DTYPE):
      raise DamagedExport(f"{directory}: int8 param {p!r} is stored as {a.dtype}{list(a.shape)} with scales "
                          f"{scale.dtype}{list(scale.shape)}, the manifest declares scales {ss}; {_DAMAGED}")
  return dict(stored_scales)


def _decode_one(directory: str, path: str, spec: Mapping[str, Any], stored: Mapping[str, np.ndarray],
                provider: Any) -> Parts:
  try:
    return decode_layer(stored, spec["parts"], provider)
  except ValueError as e:
    raise DamagedExport(f"{directory}: layer {path!r} does not decode: {e}; the export is damaged or its "
                        f"manifest was edited: {REEXPORT}") from None


class LazyLayers(Mapping):
  """Typed parts by layer, each decoded when asked for (bool planes unpacked take ~1 byte a
  weight per plane: a 7B model's would not fit next to everything else); `pop` also drops
  the layer's stored arrays. Every check but the decoding itself has run already."""

  def __init__(self, directory: str, specs: Mapping[str, Any], stored: dict[str, dict[str, np.ndarray]],
               provider: Any):
    self._directory, self._specs, self._stored, self._provider = directory, dict(specs), stored, provider

  def __getitem__(self, path: str) -> Parts:
    return _decode_one(self._directory, path, self._specs[path], self._stored[path], self._provider)

  def __contains__(self, path: object) -> bool:  # Mapping's would decode the layer to find out
    return path in self._specs

  def __iter__(self):
    return iter(self._specs)

  def __len__(self) -> int:
    return len(self._specs)

  def pop(self, path: str) -> Parts:
    parts = self[path]
    del self._specs[path], self._stored[path]
    return parts


# --- read / load ----------------------------------------------------------------------------

def read(directory: str, model_template: nnx.Module, *, lazy: bool = False
         ) -> tuple[dict[str, Any], Mapping[str, Parts], dict[str, np.ndarray]]:
  """Reads and checks an export against a template.

  Only the template's structure and shapes are used (it may be abstract, e.g. from
  `nnx.eval_shape`) and it is not modified. Build it from the same model config, e.g.
  `families.config_from_dict(manifest["model_config"])`.

  Args:
    directory: the export directory.
    model_template: a model of the exported structure.
    lazy: `layers` decodes each layer when it is read (`LazyLayers`; a damaged layer then
      raises there), not all of them here.

  Returns:
    (manifest, layers, params). `layers`: {dotted Dense path: typed parts}, each binarized
    layer's parts decoded exactly as the provider produced them (bool planes unpacked,
    sparse parts expanded with their fill values); `parts.dequantize()` rebuilds its kernel.
    `params`: {dotted param path: numpy float array} for every non-binarized `nnx.Param`:
    the stored bf16 array, or for an int8 param `float32(q) · float32(scale)` (float32).
    Casting to the template's dtype is the caller's business.

  Raises:
    DamagedExport: for damaged or edited files (module doc), naming the file or array.
    UserError: for an unknown format_version or provider, a model_config that differs
      from the template's, or layers / params whose paths or shapes the template does
      not share.
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  provider = provider_from_spec(manifest["provider"])  # refuse an unknown provider before reading arrays
  _check_config(directory, manifest, model_template)
  state = _restore(directory)
  _check_checksums(directory, manifest, state)
  specs, stored_layers = _check_layers(directory, manifest, state.get("layers", {}), model_template)
  stored_params = _check_params(directory, manifest, state, model_template)
  scales = _check_int8(directory, manifest, state)
  del state
  layers = LazyLayers(directory, specs, stored_layers, provider)
  if not lazy:
    layers = {path: layers.pop(path) for path in list(layers)}  # the stored arrays go as the parts come
  params = {p: dequantize_int8(a, scales[p]) if p in scales else a for p, a in stored_params.items()}
  return manifest, layers, params


def load(directory: str, model_template: nnx.Module) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores an export into a copy of `model_template`.

  Each binarized kernel is set to its parts' `dequantize()` (the layout of the provider the
  manifest names), cast to the template's kernel dtype; every other Param to its stored
  bf16 value (int8 params: `float32(q) · float32(scale)`) cast to the template's dtype.

  Args:
    directory: the export directory.
    model_template: gives the structure (build it from the same model config, e.g.
      `families.config_from_dict(manifest["model_config"])`) and the param dtype and sharding.

  Returns:
    (model, manifest).

  Raises:
    DamagedExport, UserError: as `read` (it does every check), and UserError for parts
      that dequantize to another shape than the template's kernel.
  """
  directory = os.path.abspath(directory)
  manifest, parts_by_layer, param_values = read(directory, model_template)

  model = nnx.clone(model_template)
  params = paths.params(model)
  values: dict[str, Any] = {}
  for path, parts in parts_by_layer.items():
    kernel = params[f"{path}.kernel"].get_value()
    w = dequantize(parts)
    if tuple(w.shape) != tuple(kernel.shape):
      raise UserError(f"{directory}: layer {path!r} dequantizes to {tuple(w.shape)}, the template's kernel is "
                      f"{tuple(kernel.shape)}; {_FIX}")
    values[f"{path}.kernel"] = w
  values.update(param_values)

  for p, v in values.items():
    var = params[p]
    old = var.get_value()
    new = jnp.asarray(v).astype(old.dtype)
    var.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new)
  return model, manifest
