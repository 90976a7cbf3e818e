"""Packed 1-bit export of a binarized model, and loading it back.

Layout of an export directory:

  DIR/manifest.json   format_version, method, provider (name, class, dataclass fields,
                      repr), config, model_config, per binarized layer its path, kernel
                      shape, parts (dtype and shape before and after packing, layout) and
                      bit accounting, the non-binarized parameters' shapes, and the totals
                      that `export` returns. Written last: a directory without it is not an
                      export.
  DIR/state/          one orbax checkpoint (`ocp.StandardCheckpointer`, OCDBT) of the tree
                        {"layers": {<dotted layer path as nested dicts>: {part: array}},
                         "params": {<dotted param path as nested dicts>: bf16 array}}
                      `layers` holds the ENCODED parts of every binarized Dense layer
                      (`packing.encode_parts`: bool planes as uint32 words packed along the
                      input dimension, sparse parts as vectors of their meaningful entries,
                      scales bf16, PB-LLM values int8), `params` every other `nnx.Param` of the
                      model in bfloat16. The binarized kernels themselves are not stored.

A single StandardCheckpointer (not a CheckpointManager) because an export is one immutable
artefact with no steps to keep or rotate; `export` refuses a non-empty directory unless
`overwrite=True`.

Two bit counts come back from `export`:
  * `bits_per_weight`: 8 × (nbytes of the arrays written for the binarized layers) /
    (their number of weights). It is what the packed arrays really hold: it includes the
    padding of packed planes to whole 32-bit words along the input dimension (zero when
    `in` is a multiple of 32), < 32 padding bits per compacted sparse vector, and the
    salient-row flags as an `in`-bit bitmap.
  * `formula_bits_per_weight`: `Binarized.stored_bits` (`quant.core.bits_core`) over the
    same weights: the count by formula, with no padding and the cheaper of a bitmap and an
    index list for salient-row positions.
  Bytes never undercount the formula. Measured: +0.00% (XNOR) to +0.11% (structured SAB) on
  a 256×256 layer, +0.0% to +0.6% on the 32/64-wide layers of the test model, where the
  fixed padding weighs more (tests/export/test_checkpoint.py checks the per-layer bound).
  `model_bytes` is different again: the size on disk of every file under DIR, i.e. the
  arrays after orbax's chunk compression (zstd; sign planes barely compress, constant or
  sparse arrays do) plus orbax metadata (`_METADATA` lists every array) and the manifest.
  On a tiny model the metadata dominates, and the OCDBT data files of two identical
  exports can differ by a few kB (tensorstore's write batching).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sab_jax.export import packing
from sab_jax.quant import providers as providers_lib
from sab_jax.quant import rules

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state"
PARAM_DTYPE = ml_dtypes.bfloat16


# --- small helpers --------------------------------------------------------------------------

def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *head, last = path.split(".")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = v
  return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Every nnx.Param of the model by dotted path."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Param)}


def _jsonable(x: Any) -> Any:
  """Plain JSON data (dataclasses, ConfigDicts, tuples, numpy scalars converted); raises TypeError."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    x = dataclasses.asdict(x)
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f"cannot store {type(x).__name__} {x!r} in the JSON manifest")


def _dir_bytes(directory: str) -> int:
  total = 0
  for root, _, files in os.walk(directory):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def provider_spec(provider: Any) -> dict[str, Any]:
  """How the manifest names a provider: METHODS key, class name, dataclass fields, repr.

  Raises ValueError for a provider that `METHODS[name](**fields)` would not rebuild.
  """
  name = getattr(provider, "name", None)
  cls = providers_lib.METHODS.get(name)
  if cls is None or type(provider) is not cls or not dataclasses.is_dataclass(provider):
    raise ValueError(f"provider {provider!r} is not one of sab_jax.quant.providers.METHODS "
                     f"({sorted(providers_lib.METHODS)}); only those can be exported and loaded back")
  fields = _jsonable({f.name: getattr(provider, f.name) for f in dataclasses.fields(provider)})
  if cls(**json.loads(json.dumps(fields))) != provider:
    raise ValueError(f"provider {provider!r} does not survive a JSON round trip of its fields {fields}")
  return {"name": name, "class": cls.__name__, "fields": fields, "repr": repr(provider)}


def provider_from_spec(spec: Mapping[str, Any]) -> Any:
  """Rebuilds the provider of a manifest: `METHODS[name](**fields)` (no eval)."""
  name, cls_name = spec.get("name"), spec.get("class")
  cls = providers_lib.METHODS.get(name)
  if cls is None:
    raise ValueError(f"the manifest names provider {name!r}, which is not in sab_jax.quant.providers.METHODS "
                     f"({sorted(providers_lib.METHODS)}); load it with the sab_jax version that wrote it")
  if cls.__name__ != cls_name:
    raise ValueError(f"the manifest names provider {name!r} of class {cls_name!r}, but METHODS[{name!r}] is "
                     f"{cls.__name__}; load it with the sab_jax version that wrote it")
  try:
    return cls(**spec.get("fields", {}))
  except TypeError as e:
    raise ValueError(f"the manifest's fields {spec.get('fields')} do not build {cls_name}: {e}; "
                     f"load it with the sab_jax version that wrote it") from e


def _binarized(x: Any) -> providers_lib.Binarized:
  b = getattr(x, "binarized", x)  # a calibrate.LayerResult or a Binarized
  if not isinstance(b, providers_lib.Binarized):
    raise TypeError(f"expected a Binarized or a LayerResult, got {type(x).__name__}")
  return b


# --- export ---------------------------------------------------------------------------------

def export(model: nnx.Module, layers: Mapping[str, Any], method: str, provider: Any, directory: str, *,
           config: Mapping[str, Any] | None = None, overwrite: bool = False, verify: bool = True
           ) -> dict[str, Any]:
  """Writes the packed export of a binarized model to `directory` (layout: module doc).

  Args:
    model: the model; its `nnx.Param`s other than the binarized kernels are stored in bf16
      (the binarized kernels' current values are not read: their parts are stored).
    layers: {dotted Dense path: Binarized or calibrate.LayerResult}, as `binarize_model`
      returns.
    method: the method's name in results.json (e.g. "sab", "sab_kd").
    provider: the provider that produced `layers` (one of `providers.METHODS`); `load`
      dequantizes with it.
    directory: where to write; must be absent or empty unless `overwrite`.
    config: JSON-able run configuration (dict or ConfigDict) recorded in the manifest.
    overwrite: delete an existing non-empty `directory` first.
    verify: decode every layer back from the arrays to be written and check that the
      provider's dequantizer rebuilds `w_hat` bitwise (raises RuntimeError otherwise).

  Returns:
    {"bits_per_weight", "formula_bits_per_weight", "nominal_bits", "model_bytes",
     "binarized_bytes", "params_bytes", "binarized_weights", "directory"}: see the module
    doc for the two bit counts and model_bytes.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise ValueError(f"{directory} is not empty; pass overwrite=True or choose another directory")
    shutil.rmtree(directory)
  spec = provider_spec(provider)
  dense = dict(rules.dense_layers(model))
  params = _params(model)

  layer_tree, manifest_layers = {}, []
  binarized_bytes = n_weights = stored_bits = 0
  nominal_sum = 0.0
  for path, item in layers.items():
    b = _binarized(item)
    if path not in dense:
      raise ValueError(f"layer {path!r} is not a Dense layer of the model (Dense layers look like "
                       f"{next(iter(dense), None)!r})")
    shape = tuple(dense[path].kernel[...].shape)
    if tuple(b.w_hat.shape) != shape:
      raise ValueError(f"layer {path!r}: binarized shape {tuple(b.w_hat.shape)} differs from the "
                       f"model's kernel {shape}")
    parts = {k: np.asarray(jax.device_get(v)) for k, v in b.parts.items()}
    compact = packing.compact_parts(parts)
    stored = packing.packed_parts(compact)
    if verify:
      decoded = packing.decode_parts(stored, {k: v.shape for k, v in compact.items()},
                                     {k: v.shape for k, v in parts.items()})
      w = provider.dequantize({k: jnp.asarray(v) for k, v in decoded.items()}, shape[0])
      if not np.array_equal(np.asarray(w), np.asarray(b.w_hat)):
        raise RuntimeError(f"layer {path!r}: the stored parts do not rebuild w_hat exactly")
    sparse = set(packing.sparse_parts(parts))
    nbytes = sum(v.nbytes for v in stored.values())
    n = int(np.prod(shape))
    part_specs = {
        k: {"dtype": str(parts[k].dtype), "shape": list(parts[k].shape),
            "layout": "sparse" if k in sparse else "dense", "compact_shape": list(compact[k].shape),
            "stored_dtype": str(stored[k].dtype), "stored_shape": list(stored[k].shape),
            "packed": stored[k].dtype == np.uint32}
        for k in parts}
    manifest_layers.append({
        "path": path, "shape": list(shape), "parts": part_specs,
        "bits": {"stored_bytes": int(nbytes), "bits_per_weight": 8 * nbytes / n,
                 "formula_stored_bits": int(b.stored_bits), "formula_bits_per_weight": b.stored_bits / n,
                 "nominal_bits": float(b.nominal_bits), "n_weights": n}})
    layer_tree[path] = stored
    binarized_bytes += nbytes
    n_weights += n
    stored_bits += int(b.stored_bits)
    nominal_sum += float(b.nominal_bits) * n

  kernels = {f"{p}.kernel" for p in layers}
  flat_params = {p: np.asarray(jax.device_get(v.get_value())).astype(PARAM_DTYPE)
                 for p, v in params.items() if p not in kernels}
  params_bytes = sum(v.nbytes for v in flat_params.values())

  state = {}
  if layer_tree:
    state["layers"] = _nest({f"{p}.{k}": v for p, parts in layer_tree.items() for k, v in parts.items()})
  if flat_params:
    state["params"] = _nest(flat_params)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, STATE), state)

  totals = {
      "bits_per_weight": 8 * binarized_bytes / n_weights if n_weights else None,
      "formula_bits_per_weight": stored_bits / n_weights if n_weights else None,
      "nominal_bits": nominal_sum / n_weights if n_weights else None,
      "binarized_bytes": int(binarized_bytes),
      "params_bytes": int(params_bytes),
      "binarized_weights": int(n_weights),
  }
  manifest = {
      "format_version": FORMAT_VERSION,
      "method": method,
      "provider": spec,
      "config": _jsonable(config) if config is not None else None,
      "model_config": _jsonable(model.cfg) if hasattr(model, "cfg") else None,
      "layers": manifest_layers,
      "params": {p: {"shape": list(v.shape), "dtype": str(v.dtype),
                     "source_dtype": str(params[p].get_value().dtype)} for p, v in flat_params.items()},
      "totals": totals,
  }
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  return dict(totals, model_bytes=_dir_bytes(directory), directory=directory)


# --- load -----------------------------------------------------------------------------------

def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of an export; raises ValueError for a missing one or an unknown format_version."""
  path = os.path.join(os.path.abspath(directory), MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: {directory} is not a finished export (rerun the export stage)")
  with open(path) as f:
    manifest = json.load(f)
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{path}: unknown format_version {version!r}; this sab_jax reads format_version "
                     f"{FORMAT_VERSION}: re-export the model with this version or load it with the one "
                     f"that wrote it")
  return manifest


def _set_difference_error(what: str, expected: set[str], found: set[str], fix: str) -> None:
  missing, extra = sorted(expected - found), sorted(found - expected)
  if missing or extra:
    raise ValueError(f"{what}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                     f"extra {extra[:8]}{' ...' if len(extra) > 8 else ''}; {fix}")


def load(directory: str, model_template: nnx.Module) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores an export into a copy of `model_template`; returns (model, manifest).

  The template gives the structure (build it from the same model config, e.g.
  `llava.config_from_dict(manifest["model_config"])`) and the param dtype and sharding.
  Each binarized kernel is set to `provider.dequantize(parts, in)` with the provider the
  manifest names, cast to the template's kernel dtype; every other Param to its stored
  bf16 value cast to the template's dtype.

  Raises ValueError (naming the problem and the fix) for an unknown format_version, a
  model_config that differs from the template's, a layer or param that the manifest,
  the checkpoint and the template do not all agree on, or a stored / declared shape that
  disagrees with the manifest or the template.
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  provider = provider_from_spec(manifest["provider"])
  fix = ("the export and the template disagree: build the template from the manifest's model_config, "
         "or re-export the model")

  template_cfg = _jsonable(model_template.cfg) if hasattr(model_template, "cfg") else None
  if manifest.get("model_config") is not None and template_cfg is not None \
      and manifest["model_config"] != template_cfg:
    mc, tc = _flatten(manifest["model_config"]), _flatten(template_cfg)
    diff = sorted(k for k in set(mc) | set(tc) if mc.get(k) != tc.get(k))
    raise ValueError(f"{directory}: the template's config differs from the exported model's in {diff}; {fix}")

  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.join(directory, STATE))
  stored_layers = _flatten(state.get("layers", {}))
  stored_params = _flatten(state.get("params", {}))

  model = nnx.clone(model_template)
  dense = dict(rules.dense_layers(model))
  params = _params(model)
  layer_specs = {l["path"]: l for l in manifest["layers"]}
  if len(layer_specs) != len(manifest["layers"]):
    raise ValueError(f"{directory}: the manifest lists a layer twice; re-export the model")

  # Layers: manifest vs checkpoint vs template.
  expected = {f"{p}.{k}" for p, l in layer_specs.items() for k in l["parts"]}
  _set_difference_error(f"{directory}: binarized layer parts of the manifest vs the checkpoint", expected,
                        set(stored_layers), "the export is damaged: re-export the model")
  not_dense = sorted(set(layer_specs) - set(dense))
  if not_dense:
    raise ValueError(f"{directory}: layers {not_dense} of the export are not Dense layers of the template; {fix}")
  kernels = {f"{p}.kernel" for p in layer_specs}
  _set_difference_error(f"{directory}: non-binarized params of the checkpoint vs the template",
                        set(params) - kernels, set(stored_params), fix)
  _set_difference_error(f"{directory}: non-binarized params of the manifest vs the checkpoint",
                        set(manifest.get("params", {})), set(stored_params),
                        "the export is damaged: re-export the model")

  values: dict[str, jax.Array] = {}
  for path, spec in layer_specs.items():
    kernel = params[f"{path}.kernel"].get_value()
    if tuple(spec["shape"]) != tuple(kernel.shape):
      raise ValueError(f"{directory}: layer {path!r} has shape {tuple(spec['shape'])} in the manifest but "
                       f"{tuple(kernel.shape)} in the template; {fix}")
    stored = {}
    for k, ps in spec["parts"].items():
      a = np.asarray(stored_layers[f"{path}.{k}"])
      if tuple(a.shape) != tuple(ps["stored_shape"]) or str(a.dtype) != ps["stored_dtype"]:
        raise ValueError(f"{directory}: part {k!r} of layer {path!r} is stored as {a.dtype}{list(a.shape)} "
                         f"but the manifest declares {ps['stored_dtype']}{ps['stored_shape']}; the export is "
                         f"damaged: re-export the model")
      stored[k] = a
    try:
      parts = packing.decode_parts(stored, {k: tuple(ps["compact_shape"]) for k, ps in spec["parts"].items()},
                                   {k: tuple(ps["shape"]) for k, ps in spec["parts"].items()})
    except ValueError as e:
      raise ValueError(f"{directory}: layer {path!r} does not decode: {e}; the export is damaged or its "
                       f"manifest was edited: re-export the model") from e
    for k, ps in spec["parts"].items():
      if str(parts[k].dtype) != ps["dtype"]:
        raise ValueError(f"{directory}: part {k!r} of layer {path!r} decodes to {parts[k].dtype}, the manifest "
                         f"declares {ps['dtype']}; re-export the model")
    w = provider.dequantize({k: jnp.asarray(v) for k, v in parts.items()}, kernel.shape[0])
    if tuple(w.shape) != tuple(kernel.shape):
      raise ValueError(f"{directory}: layer {path!r} dequantizes to {tuple(w.shape)}, the template's kernel is "
                       f"{tuple(kernel.shape)}; {fix}")
    values[f"{path}.kernel"] = w

  for p, a in stored_params.items():
    a = np.asarray(a)
    want = tuple(params[p].get_value().shape)
    declared = tuple(manifest["params"][p]["shape"])
    if tuple(a.shape) != declared:
      raise ValueError(f"{directory}: param {p!r} is stored with shape {tuple(a.shape)} but the manifest "
                       f"declares {declared}; the export is damaged: re-export the model")
    if tuple(a.shape) != want:
      raise ValueError(f"{directory}: param {p!r} has shape {tuple(a.shape)} in the export but {want} in the "
                       f"template; {fix}")
    values[p] = a

  for p, v in values.items():
    var = params[p]
    old = var.get_value()
    new = jnp.asarray(v).astype(old.dtype)
    var.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new)
  return model, manifest
