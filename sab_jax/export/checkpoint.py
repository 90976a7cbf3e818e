"""Packed 1-bit export of a binarized model, and reading / loading it back.

`export` writes it; `read` checks it against a model template and returns the decoded
parts of every binarized layer and the values of every other param (what a packed
inference model is built from); `load` is `read` + each provider's dequantizer, into a
copy of the template.

Layout of an export directory:

  DIR/manifest.json   format_version, method, provider (name, class, dataclass fields,
                      repr), config, model_config, per binarized layer its path, kernel
                      shape, parts (dtype and shape before and after packing, layout) and
                      bit accounting, the non-binarized parameters' shapes and stored dtypes
                      (bf16, or int8 with their scale part), the int8_params regexes, and the totals
                      that `export` returns. Written last: a directory without it is not an
                      export.
  DIR/state/          one orbax checkpoint (`ocp.StandardCheckpointer`, OCDBT) of the tree
                        {"layers": {<dotted layer path as nested dicts>: {part: array}},
                         "params": {<dotted param path as nested dicts>: bf16 array},
                         "int8_params": {<dotted param path ...>: int8 array},   (if any)
                         "int8_scales": {<dotted param path ...>: bf16 array}}   (if any)
                      `layers` holds the ENCODED parts of every binarized Dense layer
                      (`packing.encode_parts`: bool planes as uint32 words packed along the
                      input dimension, sparse parts as vectors of their meaningful entries,
                      scales bf16, PB-LLM values int8), `params` every other `nnx.Param` of the
                      model in bfloat16, except those `export(int8_params=...)` selects,
                      which go to `int8_params` / `int8_scales` (below). The binarized
                      kernels themselves are not stored.

int8 params (`export(int8_params=[regex, ...])`, for embeddings and the head): symmetric
absmax with one bf16 scale per row. A Dense kernel `[in, out]` (e.g. `lm_head.kernel`,
`[embed, vocab]`) gets one scale per OUTPUT channel (absmax over axis 0, scales `[1, out]`),
so each logit has its own scale; every other param one per row of its last axis (absmax
over the last axis: a `[vocab, embed]` table gets one scale per vocabulary row, `[vocab,
1]`; a vector one scale). `scale = bf16(absmax / 127)` (nearest), `q = clip(rint(x /
scale), -127, 127)`, value = `float32(q) · float32(scale)`. Error per entry ≤ absmax/254 ·
(1 + 2⁻⁸): the bf16 rounding of the scale is what the 2⁻⁸ pays for (no bf16 scale can
guarantee absmax/254 exactly). They are kept out of `params` so that a reader that
predates int8 params refuses the export (missing params) instead of loading int8 codes
as values. The manifest records each such param with dtype "int8" and its scale part.

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
  `params_bytes` is the nbytes of every other array written (bf16 params, int8 params and
  their bf16 scales).
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
import re
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sab_jax import distributed
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


def _is_abstract(x: Any) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


# --- int8 params ----------------------------------------------------------------------------

INT8_DTYPE = np.int8
_INT8_MAX = 127
_INT8_CHUNK = 4096  # rows quantized at a time: bounds the float32 temporaries of big tables


def int8_axis(path: str, shape: Sequence[int], kernels: set[str]) -> int:
  """The axis an int8 param's absmax runs over: 0 for a Dense kernel `[in, out]` in
  `kernels` (one scale per output channel), else the last axis (one scale per row)."""
  return 0 if path in kernels and len(shape) == 2 else len(shape) - 1


def quantize_int8(x: Any, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric absmax int8 with bf16 scales over `axis`: (int8 `x.shape`, bf16 scales of
  `x.shape` with `axis` set to 1). Raises ValueError for non-finite values."""
  x = np.asarray(x)
  if x.ndim == 0:
    raise ValueError("int8 params need at least one dimension")
  q = np.empty(x.shape, INT8_DTYPE)
  scale_shape = list(x.shape)
  scale_shape[axis] = 1
  scale = np.empty(scale_shape, PARAM_DTYPE)
  # Views with the reduced axis last; chunks of their leading axis bound the temporaries.
  xt, qt, st = (np.moveaxis(a, axis, -1) for a in (x, q, scale))
  if x.ndim == 1:
    xt, qt, st = xt[None], qt[None], st[None]
  for i in range(0, xt.shape[0], _INT8_CHUNK):
    xc = np.asarray(xt[i:i + _INT8_CHUNK], np.float32)
    if not np.all(np.isfinite(xc)):
      raise ValueError("int8 params must be finite")
    s = (np.max(np.abs(xc), axis=-1, keepdims=True) / _INT8_MAX).astype(PARAM_DTYPE)
    s32 = s.astype(np.float32)
    qc = np.rint(xc / np.where(s32 > 0, s32, 1.0))
    qt[i:i + _INT8_CHUNK] = np.clip(qc, -_INT8_MAX, _INT8_MAX).astype(INT8_DTYPE)
    st[i:i + _INT8_CHUNK] = s
  return q, scale


def dequantize_int8(q: Any, scale: Any) -> np.ndarray:
  """`float32(q) · float32(scale)` (scale broadcasts over the reduced axis)."""
  return np.asarray(q).astype(np.float32) * np.asarray(scale).astype(np.float32)


# --- export ---------------------------------------------------------------------------------

def export(model: nnx.Module, layers: Mapping[str, Any], method: str, provider: Any, directory: str, *,
           config: Mapping[str, Any] | None = None, overwrite: bool = False, verify: bool = True,
           int8_params: Sequence[str] = ()) -> dict[str, Any]:
  r"""Writes the packed export of a binarized model to `directory` (layout: module doc).

  Args:
    model: the model; its `nnx.Param`s other than the binarized kernels are stored in bf16
      (the binarized kernels' current values are not read: their parts are stored). The
      binarized kernels may be abstract (`jax.ShapeDtypeStruct`, e.g. a model built with
      `nnx.eval_shape`): only their shapes are used. Every other Param needs a value.
    layers: {dotted Dense path: Binarized or calibrate.LayerResult}, as `binarize_model`
      returns. Any Mapping: it is iterated once, layer by layer, and only the encoded
      (packed) parts are kept, so a lazy Mapping that builds each Binarized on access
      bounds memory to one layer's unpacked parts. `Binarized.w_hat` may be a
      `jax.ShapeDtypeStruct` (only its shape is read) when `verify=False`.
    method: the method's name in results.json (e.g. "sab", "sab_kd").
    provider: the provider that produced `layers` (one of `providers.METHODS`); `load`
      dequantizes with it.
    directory: where to write; must be absent or empty unless `overwrite`.
    config: JSON-able run configuration (dict or ConfigDict) recorded in the manifest.
    overwrite: delete an existing non-empty `directory` first.
    verify: decode every layer back from the arrays to be written and check that the
      provider's dequantizer rebuilds `w_hat` bitwise (raises RuntimeError otherwise;
      ValueError for an abstract `w_hat`, which has nothing to compare with).
    int8_params: regexes, each fully matched (`re.fullmatch`) against the dotted paths of
      the non-binarized params (e.g. `language_model\.embed_tokens\.embedding`,
      `lm_head\.kernel`): those are stored int8 with bf16 scales (module doc) instead of
      bf16. A regex that matches none of them is an error.

  Returns:
    {"bits_per_weight", "formula_bits_per_weight", "nominal_bits", "model_bytes",
     "binarized_bytes", "params_bytes", "binarized_weights", "directory"}: see the module
    doc for the two bit counts, params_bytes and model_bytes.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise ValueError(f"{directory} is not empty; pass overwrite=True or choose another directory")
    if jax.process_index() == 0:  # with several processes: one deletes, all save, one writes the manifest
      shutil.rmtree(directory)
  distributed.barrier(f"export {directory}: cleared")
  spec = provider_spec(provider)
  dense = dict(rules.dense_layers(model))
  params = _params(model)
  kernels = {f"{p}.kernel" for p in layers}
  if isinstance(int8_params, str) or not all(isinstance(r, str) for r in int8_params):
    raise TypeError(f"int8_params must be a sequence of regex strings, got {int8_params!r}")
  int8_params = tuple(int8_params)
  kept = [p for p in params if p not in kernels]
  int8_set = set()
  for rx in int8_params:
    hits = [p for p in kept if re.fullmatch(rx, p)]
    if not hits:
      binarized = [p for p in kernels if re.fullmatch(rx, p)]
      why = (f" (it matches binarized kernels {sorted(binarized)[:4]}, which are stored as parts)"
             if binarized else f"; param paths look like {kept[0]!r}" if kept else "")
      raise ValueError(f"int8_params regex {rx!r} matches no non-binarized param{why}")
    int8_set.update(hits)
  dense_kernels = {f"{p}.kernel" for p in dense}

  layer_tree, manifest_layers = {}, []
  binarized_bytes = n_weights = stored_bits = 0
  nominal_sum = 0.0
  for path, item in layers.items():
    b = _binarized(item)
    if path not in dense:
      raise ValueError(f"layer {path!r} is not a Dense layer of the model (Dense layers look like "
                       f"{next(iter(dense), None)!r})")
    shape = tuple(params[f"{path}.kernel"].get_value().shape)  # abstract kernels have a shape too
    if tuple(b.w_hat.shape) != shape:
      raise ValueError(f"layer {path!r}: binarized shape {tuple(b.w_hat.shape)} differs from the "
                       f"model's kernel {shape}")
    if verify and _is_abstract(b.w_hat):
      raise ValueError(f"layer {path!r}: w_hat is abstract ({b.w_hat}), so verify=True has nothing to "
                       f"compare the decoded parts with; pass verify=False")
    parts = {k: distributed.host_value(v) for k, v in b.parts.items()}
    compact = packing.compact_parts(parts)
    stored = packing.packed_parts(compact)
    if verify:
      decoded = packing.decode_parts(stored, {k: v.shape for k, v in compact.items()},
                                     {k: v.shape for k, v in parts.items()})
      w = provider.dequantize({k: jnp.asarray(v) for k, v in decoded.items()}, shape[0])
      if not np.array_equal(np.asarray(w), np.asarray(b.w_hat)):
        raise RuntimeError(f"layer {path!r}: the stored parts do not rebuild w_hat exactly")
    sparse, positions = set(packing.sparse_parts(parts)), set(packing.as_positions(parts))
    nbytes = sum(v.nbytes for v in stored.values())
    n = int(np.prod(shape))
    part_specs = {
        k: {"dtype": str(parts[k].dtype), "shape": list(parts[k].shape),
            "layout": "positions" if k in positions else "sparse" if k in sparse else "dense",
            "compact_shape": list(compact[k].shape),
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
    del b, item, parts, compact, stored  # a lazy `layers` then holds one layer's parts at a time

  flat_params, int8_values, int8_scales, param_specs = {}, {}, {}, {}
  for p in kept:
    v = params[p].get_value()
    if _is_abstract(v):
      raise ValueError(f"param {p!r} is abstract ({v}): only binarized kernels may be; give it a value")
    a = distributed.host_value(v)
    param_specs[p] = {"shape": list(a.shape), "source_dtype": str(a.dtype)}
    if p in int8_set:
      axis = int8_axis(p, a.shape, dense_kernels)
      try:
        q, scale = quantize_int8(a, axis)
      except ValueError as e:
        raise ValueError(f"param {p!r} cannot be stored in int8: {e}") from e
      int8_values[p], int8_scales[p] = q, scale
      param_specs[p].update(dtype=str(q.dtype), scale={"dtype": str(scale.dtype), "shape": list(scale.shape),
                                                       "axis": axis})
    else:
      flat_params[p] = a.astype(PARAM_DTYPE, copy=False)
      param_specs[p]["dtype"] = str(flat_params[p].dtype)
    del a, v
  params_bytes = (sum(v.nbytes for v in flat_params.values()) + sum(v.nbytes for v in int8_values.values())
                  + sum(v.nbytes for v in int8_scales.values()))

  state = {}
  if layer_tree:
    state["layers"] = _nest({f"{p}.{k}": v for p, parts in layer_tree.items() for k, v in parts.items()})
  if flat_params:
    state["params"] = _nest(flat_params)
  if int8_values:
    state["int8_params"] = _nest(int8_values)
    state["int8_scales"] = _nest(int8_scales)
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
      "params": param_specs,
      "int8_params": list(int8_params),
      "totals": totals,
  }
  if jax.process_index() == 0:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))
  distributed.barrier(f"export {directory}: written")
  return dict(totals, model_bytes=_dir_bytes(directory), directory=directory)


# --- read / load ----------------------------------------------------------------------------

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


def read(directory: str, model_template: nnx.Module
         ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Reads and checks an export against a template; returns (manifest, layers, params).

  `layers`: {dotted Dense path: {part name: numpy array}}, each binarized layer's parts
  decoded exactly as the provider produced them (`packing.decode_parts`: bool planes
  unpacked, sparse parts expanded with their fill values); `provider_from_spec(
  manifest["provider"]).dequantize(parts, in)` rebuilds its kernel.
  `params`: {dotted param path: numpy float array} for every non-binarized `nnx.Param`:
  the stored bf16 array, or for an int8 param `float32(q) · float32(scale)` (float32).
  Casting to the template's dtype is the caller's business.

  Only the template's structure and shapes are used (it may be abstract, e.g. from
  `nnx.eval_shape`) and it is not modified. Build it from the same model config, e.g.
  `llava.config_from_dict(manifest["model_config"])`.

  Raises ValueError (naming the problem and the fix) for a missing manifest, an unknown
  format_version or provider, a model_config that differs from the template's, a layer or
  param that the manifest, the checkpoint and the template do not all agree on, a stored
  / declared shape or dtype that disagrees with the manifest or the template, or parts
  that do not decode.
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  provider_from_spec(manifest["provider"])  # refuse an unknown provider before reading arrays
  fix = ("the export and the template disagree: build the template from the manifest's model_config, "
         "or re-export the model")
  damaged = "the export is damaged: re-export the model"

  template_cfg = _jsonable(model_template.cfg) if hasattr(model_template, "cfg") else None
  if manifest.get("model_config") is not None and template_cfg is not None \
      and manifest["model_config"] != template_cfg:
    mc, tc = _flatten(manifest["model_config"]), _flatten(template_cfg)
    diff = sorted(k for k in set(mc) | set(tc) if mc.get(k) != tc.get(k))
    raise ValueError(f"{directory}: the template's config differs from the exported model's in {diff}; {fix}")

  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.join(directory, STATE))
  unknown = sorted(set(state) - {"layers", "params", "int8_params", "int8_scales"})
  if unknown:
    raise ValueError(f"{directory}: the checkpoint holds unknown trees {unknown}; load it with the sab_jax "
                     f"version that wrote it")
  stored_layers = _flatten(state.get("layers", {}))
  stored_bf16 = _flatten(state.get("params", {}))
  stored_int8 = _flatten(state.get("int8_params", {}))
  stored_scales = _flatten(state.get("int8_scales", {}))
  del state

  dense = dict(rules.dense_layers(model_template))
  params = _params(model_template)
  layer_specs = {l["path"]: l for l in manifest["layers"]}
  if len(layer_specs) != len(manifest["layers"]):
    raise ValueError(f"{directory}: the manifest lists a layer twice; re-export the model")

  # Layers: manifest vs checkpoint vs template.
  expected = {f"{p}.{k}" for p, l in layer_specs.items() for k in l["parts"]}
  _set_difference_error(f"{directory}: binarized layer parts of the manifest vs the checkpoint", expected,
                        set(stored_layers), damaged)
  not_dense = sorted(set(layer_specs) - set(dense))
  if not_dense:
    raise ValueError(f"{directory}: layers {not_dense} of the export are not Dense layers of the template; {fix}")
  kernels = {f"{p}.kernel" for p in layer_specs}
  both = sorted(set(stored_bf16) & set(stored_int8))
  if both:
    raise ValueError(f"{directory}: params {both[:8]} are stored both in bf16 and in int8; {damaged}")
  stored_params = set(stored_bf16) | set(stored_int8)
  _set_difference_error(f"{directory}: non-binarized params of the checkpoint vs the template",
                        set(params) - kernels, stored_params, fix)
  _set_difference_error(f"{directory}: non-binarized params of the manifest vs the checkpoint",
                        set(manifest.get("params", {})), stored_params, damaged)
  int8_declared = {p for p, s in manifest["params"].items() if s.get("dtype") == str(np.dtype(INT8_DTYPE))}
  _set_difference_error(f"{directory}: int8 params of the manifest vs the checkpoint", int8_declared,
                        set(stored_int8), damaged)
  _set_difference_error(f"{directory}: int8 params vs their scales in the checkpoint", set(stored_int8),
                        set(stored_scales), damaged)

  out_layers: dict[str, dict[str, np.ndarray]] = {}
  for path, spec in layer_specs.items():
    kernel_shape = tuple(params[f"{path}.kernel"].get_value().shape)
    if tuple(spec["shape"]) != kernel_shape:
      raise ValueError(f"{directory}: layer {path!r} has shape {tuple(spec['shape'])} in the manifest but "
                       f"{kernel_shape} in the template; {fix}")
    stored = {}
    for k, ps in spec["parts"].items():
      a = np.asarray(stored_layers.pop(f"{path}.{k}"))
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
    out_layers[path] = parts

  out_params: dict[str, np.ndarray] = {}
  for p in sorted(stored_params):
    a = np.asarray(stored_int8[p] if p in stored_int8 else stored_bf16[p])
    want = tuple(params[p].get_value().shape)
    spec = manifest["params"][p]
    declared = tuple(spec["shape"])
    if tuple(a.shape) != declared:
      raise ValueError(f"{directory}: param {p!r} is stored with shape {tuple(a.shape)} but the manifest "
                       f"declares {declared}; the export is damaged: re-export the model")
    if tuple(a.shape) != want:
      raise ValueError(f"{directory}: param {p!r} has shape {tuple(a.shape)} in the export but {want} in the "
                       f"template; {fix}")
    if p in stored_int8:
      scale = np.asarray(stored_scales[p])
      ss = spec.get("scale") or {}
      axis = ss.get("axis")
      want_scale = None
      if isinstance(axis, int) and 0 <= axis < a.ndim:
        want_scale = list(a.shape)
        want_scale[axis] = 1
      if (a.dtype != INT8_DTYPE or want_scale is None or list(scale.shape) != want_scale
          or list(ss.get("shape", [])) != want_scale or str(scale.dtype) != ss.get("dtype")
          or scale.dtype != PARAM_DTYPE):
        raise ValueError(f"{directory}: int8 param {p!r} is stored as {a.dtype}{list(a.shape)} with scales "
                         f"{scale.dtype}{list(scale.shape)}, the manifest declares scales {ss}; {damaged}")
      a = dequantize_int8(a, scale)
    out_params[p] = a
  return manifest, out_layers, out_params


def load(directory: str, model_template: nnx.Module) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores an export into a copy of `model_template`; returns (model, manifest).

  The template gives the structure (build it from the same model config, e.g.
  `llava.config_from_dict(manifest["model_config"])`) and the param dtype and sharding.
  Each binarized kernel is set to `provider.dequantize(parts, in)` with the provider the
  manifest names, cast to the template's kernel dtype; every other Param to its stored
  bf16 value (int8 params: `float32(q) · float32(scale)`) cast to the template's dtype.

  Raises ValueError as `read` does (it does every check), and for parts that dequantize
  to another shape than the template's kernel.
  """
  directory = os.path.abspath(directory)
  manifest, parts_by_layer, param_values = read(directory, model_template)
  provider = provider_from_spec(manifest["provider"])
  fix = ("the export and the template disagree: build the template from the manifest's model_config, "
         "or re-export the model")

  model = nnx.clone(model_template)
  params = _params(model)
  values: dict[str, Any] = {}
  for path, parts in parts_by_layer.items():
    kernel = params[f"{path}.kernel"].get_value()
    w = provider.dequantize({k: jnp.asarray(v) for k, v in parts.items()}, kernel.shape[0])
    if tuple(w.shape) != tuple(kernel.shape):
      raise ValueError(f"{directory}: layer {path!r} dequantizes to {tuple(w.shape)}, the template's kernel is "
                       f"{tuple(kernel.shape)}; {fix}")
    values[f"{path}.kernel"] = w
  values.update(param_values)

  for p, v in values.items():
    var = params[p]
    old = var.get_value()
    new = jnp.asarray(v).astype(old.dtype)
    var.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new)
  return model, manifest
