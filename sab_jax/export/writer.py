"""Writing the packed 1-bit export of a binarized model (layout: `sab_jax.export.manifest`).

`export` is the one place the sizes that results.json reports are computed (`_totals`).
Two bit counts come back from it:
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
  fixed padding weighs more (tests/export/test_writer.py checks the per-layer bound).
  `params_bytes` is the nbytes of every other array written (bf16 params, int8 params and
  their bf16 scales).
  `model_bytes` is different again: the size on disk of every file under DIR, i.e. the
  arrays after orbax's chunk compression (zstd; sign planes barely compress, constant or
  sparse arrays do) plus orbax metadata (`_METADATA` lists every array) and the manifest.
  On a tiny model the metadata dominates, and the OCDBT data files of two identical
  exports can differ by a few kB (tensorstore's write batching).

A single StandardCheckpointer (not a CheckpointManager) because an export is one immutable
artefact with no steps to keep or rotate; `export` refuses a non-empty directory unless
`overwrite=True`.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sab_jax import distributed
from sab_jax.export import packing, reader
from sab_jax.export.int8 import int8_axis, quantize_int8
from sab_jax.export.manifest import (FORMAT_VERSION, PARAM_DTYPE, STATE, array_checksum, flatten, jsonable, nest,
                                     provider_spec, write_manifest)
from sab_jax.models import paths
from sab_jax.quant.providers.base import Parts, dequantize
from sab_jax.quant import providers as providers_lib


def _binarized(x: Any) -> providers_lib.Binarized:
  b = getattr(x, "binarized", x)  # a calibrate.LayerResult or a Binarized
  if not isinstance(b, providers_lib.Binarized):
    raise TypeError(f"expected a Binarized or a LayerResult, got {type(x).__name__}")
  return b


def _is_abstract(x: Any) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def dir_bytes(directory: str) -> int:
  """Bytes of every file under `directory`: what an export (or a Hugging Face export) costs on disk."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _layer_arrays(parts: Parts) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
  """The arrays stored for one binarized layer and their manifest part specs.

  The one place the writer turns parts into stored arrays (`reader.decode_layer` is the
  inverse): sparse parts compacted to their meaningful entries, bool planes packed.
  """
  compact = packing.compact_parts(parts)
  stored = packing.packed_parts(compact)
  sparse, positions = set(packing.sparse_parts(parts)), set(packing.as_positions(parts))
  arrays = parts.arrays()
  specs = {
      k: {"dtype": str(arrays[k].dtype), "shape": list(arrays[k].shape),
          "layout": "positions" if k in positions else "sparse" if k in sparse else "dense",
          "compact_shape": list(compact[k].shape),
          "stored_dtype": str(stored[k].dtype), "stored_shape": list(stored[k].shape),
          "packed": stored[k].dtype == np.uint32}
      for k in arrays}
  return stored, specs


def _int8_selection(kept: Sequence[str], kernels: set[str], int8_params: Sequence[str]) -> set[str]:
  """The non-binarized params the `int8_params` regexes select; each regex must select one."""
  if isinstance(int8_params, str) or not all(isinstance(r, str) for r in int8_params):
    raise TypeError(f"int8_params must be a sequence of regex strings, got {int8_params!r}")
  selected = set()
  for rx in int8_params:
    hits = [p for p in kept if re.fullmatch(rx, p)]
    if not hits:
      binarized = [p for p in kernels if re.fullmatch(rx, p)]
      why = (f" (it matches binarized kernels {sorted(binarized)[:4]}, which are stored as parts)"
             if binarized else f"; param paths look like {kept[0]!r}" if kept else "")
      raise ValueError(f"int8_params regex {rx!r} matches no non-binarized param{why}")
    selected.update(hits)
  return selected


def _totals(layer_bits: Sequence[Mapping[str, Any]], params_bytes: int) -> dict[str, Any]:
  """The sizes results.json reports (module doc), from each layer's `bits` in the manifest."""
  n_weights = sum(b["n_weights"] for b in layer_bits)
  binarized_bytes = sum(b["stored_bytes"] for b in layer_bits)
  stored_bits = sum(b["formula_stored_bits"] for b in layer_bits)
  nominal_sum = sum(b["nominal_bits"] * b["n_weights"] for b in layer_bits)
  return {
      "bits_per_weight": 8 * binarized_bytes / n_weights if n_weights else None,
      "formula_bits_per_weight": stored_bits / n_weights if n_weights else None,
      "nominal_bits": nominal_sum / n_weights if n_weights else None,
      "binarized_bytes": int(binarized_bytes),
      "params_bytes": int(params_bytes),
      "binarized_weights": int(n_weights),
  }


def export(model: nnx.Module, layers: Mapping[str, Any], method: str, provider: Any, directory: str, *,
           config: Mapping[str, Any] | None = None, overwrite: bool = False, verify: bool = True,
           int8_params: Sequence[str] = ()) -> dict[str, Any]:
  r"""Writes the packed export of a binarized model to `directory` (layout: `manifest`).

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
    verify: decode every layer back from the arrays to be written (`reader.decode_layer`)
      and check that the provider's dequantizer rebuilds `w_hat` bitwise (raises
      RuntimeError otherwise; ValueError for an abstract `w_hat`, which has nothing to
      compare with).
    int8_params: regexes, each fully matched (`re.fullmatch`) against the dotted paths of
      the non-binarized params (e.g. `language_model\.embed_tokens\.embedding`,
      `lm_head\.kernel`): those are stored int8 with bf16 scales (`sab_jax.export.int8`)
      instead of bf16. A regex that matches none of them is an error.

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
  dense = dict(paths.dense_layers(model))
  params = paths.params(model)
  kernels = {f"{p}.kernel" for p in layers}
  int8_params = tuple(int8_params) if not isinstance(int8_params, str) else int8_params
  kept = [p for p in params if p not in kernels]
  int8_set = _int8_selection(kept, kernels, int8_params)
  dense_kernels = {f"{p}.kernel" for p in dense}

  layer_tree, manifest_layers = {}, []
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
    if not isinstance(b.parts, provider.parts_class):
      raise ValueError(f"layer {path!r}: parts {type(b.parts).__name__} are not {provider!r}'s "
                       f"{provider.parts_class.__name__}")
    stored, part_specs = _layer_arrays(b.parts.map(distributed.host_value))
    if verify:
      w = dequantize(reader.decode_layer(stored, part_specs, provider))
      if not np.array_equal(np.asarray(w), np.asarray(b.w_hat)):
        raise RuntimeError(f"layer {path!r}: the stored parts do not rebuild w_hat exactly")
    nbytes = sum(v.nbytes for v in stored.values())
    n = int(np.prod(shape))
    manifest_layers.append({
        "path": path, "shape": list(shape), "parts": part_specs,
        "bits": {"stored_bytes": int(nbytes), "bits_per_weight": 8 * nbytes / n,
                 "formula_stored_bits": int(b.stored_bits), "formula_bits_per_weight": b.stored_bits / n,
                 "nominal_bits": float(b.nominal_bits), "n_weights": n}})
    layer_tree[path] = stored
    del b, item, stored  # a lazy `layers` then holds one layer's parts at a time

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
    # orbax saves no zero-size array (a layer with no salient rows has an empty residual plane):
    # the manifest's stored_shape declares it, and the reader rebuilds it
    state["layers"] = nest({f"{p}.{k}": v for p, parts in layer_tree.items() for k, v in parts.items() if v.size})
  if flat_params:
    state["params"] = nest(flat_params)
  if int8_values:
    state["int8_params"] = nest(int8_values)
    state["int8_scales"] = nest(int8_scales)
  checksums = {name: array_checksum(a) for name, a in flatten(state).items()}
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, STATE), state)

  totals = _totals([l["bits"] for l in manifest_layers], params_bytes)
  manifest = {
      "format_version": FORMAT_VERSION,
      "method": method,
      "provider": spec,
      "config": jsonable(config) if config is not None else None,
      "model_config": jsonable(model.cfg) if hasattr(model, "cfg") else None,
      "layers": manifest_layers,
      "params": param_specs,
      "int8_params": list(int8_params),
      "totals": totals,
      "checksums": checksums,
  }
  if jax.process_index() == 0:
    write_manifest(directory, manifest)
  distributed.barrier(f"export {directory}: written")
  return dict(totals, model_bytes=dir_bytes(directory), directory=directory)
