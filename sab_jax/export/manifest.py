"""The format of an export directory: its layout, its manifest, and how it names providers.

`writer.export` writes an export, `reader.read` / `reader.load` check and read it back;
both go through this module for the names, the manifest file and the array checksums.

Layout of an export directory:

  DIR/manifest.json   format_version, method, provider (name, class, dataclass fields,
                      repr), config, model_config, per binarized layer its path, kernel
                      shape, parts (dtype and shape before and after packing, layout) and
                      bit accounting, the non-binarized parameters' shapes and stored dtypes
                      (bf16, or int8 with their scale part), the int8_params regexes, the
                      totals that `export` returns, and `checksums`: one per array of
                      DIR/state (below). Written last: a directory without it is not an
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
                      which go to `int8_params` / `int8_scales` (`sab_jax.export.int8`). The
                      binarized kernels themselves are not stored.

Checksums (format_version 2): `manifest["checksums"]` maps each array's dotted path in the
state tree (e.g. `layers.language_model.layers.0.self_attn.k_proj.signs`, the name orbax
gives it too) to `array_checksum`: sha256 over its dtype and shape and its C-order bytes.
orbax compresses chunks with zstd but checks nothing: most flipped bits in a data file
decompress into other values, so the reader verifies every array against its checksum.

Versions: format_version 1 is format_version 2 without `checksums`. The reader still
reads it (`READABLE_VERSIONS`), without verifying the arrays; re-exporting adds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from sab_jax.errors import DamagedExport, UserError
from sab_jax.quant import providers as providers_lib

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no checksums
MANIFEST = "manifest.json"
STATE = "state"
PARAM_DTYPE = ml_dtypes.bfloat16
REEXPORT = "re-export the model"


# --- trees and paths ------------------------------------------------------------------------

def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *head, last = path.split(".")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = v
  return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Inverse of `nest`: nested Mappings -> {dotted path: leaf}."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """Two nested configs flattened, and the sorted dotted paths where they differ (or one lacks a key)."""
  fa, fb = flatten(a), flatten(b)
  return fa, fb, sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def jsonable(x: Any) -> Any:
  """Plain JSON data (dataclasses, ConfigDicts, tuples, numpy scalars converted); raises TypeError."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    x = dataclasses.asdict(x)
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f"cannot store {type(x).__name__} {x!r} in the JSON manifest")


def array_checksum(a: Any) -> str:
  """'sha256:<hex>' of an array's dtype, shape and C-order bytes (what the manifest records).

  Args:
    a: a numpy (or numpy-convertible) array, any dtype numpy or ml_dtypes knows.

  Returns:
    The checksum string; two arrays share it iff dtype, shape and every byte agree.
  """
  a = np.ascontiguousarray(a)
  h = hashlib.sha256(f"{a.dtype}{list(a.shape)}".encode())
  h.update(a.reshape(-1).view(np.uint8))
  return f"sha256:{h.hexdigest()}"


# --- providers ------------------------------------------------------------------------------

def provider_spec(provider: Any) -> dict[str, Any]:
  """How the manifest names a provider: METHODS key, class name, dataclass fields, repr.

  Args:
    provider: one of `sab_jax.quant.providers.METHODS`' classes, instantiated.

  Returns:
    {"name", "class", "fields", "repr"}; `provider_from_spec` rebuilds the provider from it.

  Raises:
    ValueError: for a provider that `METHODS[name](**fields)` would not rebuild.
  """
  name = getattr(provider, "name", None)
  cls = providers_lib.METHODS.get(name)
  if cls is None or type(provider) is not cls or not dataclasses.is_dataclass(provider):
    raise ValueError(f"provider {provider!r} is not one of sab_jax.quant.providers.METHODS "
                     f"({sorted(providers_lib.METHODS)}); only those can be exported and loaded back")
  fields = jsonable({f.name: getattr(provider, f.name) for f in dataclasses.fields(provider)})
  if cls(**json.loads(json.dumps(fields))) != provider:
    raise ValueError(f"provider {provider!r} does not survive a JSON round trip of its fields {fields}")
  return {"name": name, "class": cls.__name__, "fields": fields, "repr": repr(provider)}


def provider_from_spec(spec: Mapping[str, Any]) -> Any:
  """Rebuilds the provider of a manifest: `METHODS[name](**fields)` (no eval).

  Args:
    spec: `manifest["provider"]`, as `provider_spec` wrote it.

  Returns:
    The provider instance.

  Raises:
    UserError: for a provider this sab_jax does not have (another version wrote it).
  """
  name, cls_name = spec.get("name"), spec.get("class")
  cls = providers_lib.METHODS.get(name)
  if cls is None:
    raise UserError(f"the manifest names provider {name!r}, which is not in sab_jax.quant.providers.METHODS "
                    f"({sorted(providers_lib.METHODS)}); load it with the sab_jax version that wrote it")
  if cls.__name__ != cls_name:
    raise UserError(f"the manifest names provider {name!r} of class {cls_name!r}, but METHODS[{name!r}] is "
                    f"{cls.__name__}; load it with the sab_jax version that wrote it")
  try:
    return cls(**spec.get("fields", {}))
  except TypeError as e:
    raise UserError(f"the manifest's fields {spec.get('fields')} do not build {cls_name}: {e}; "
                    f"load it with the sab_jax version that wrote it") from e


# --- the manifest file ----------------------------------------------------------------------

def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """Writes DIR/manifest.json atomically (a temporary file renamed), so a reader never sees half of it."""
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of an export, its fields' types checked.

  Args:
    directory: the export directory.

  Returns:
    The manifest as written (`FORMAT_VERSION`, or an older one of `READABLE_VERSIONS`).

  Raises:
    DamagedExport: for a missing manifest, one that is not UTF-8 JSON, or one whose fields
      the reader needs are missing or of the wrong type.
    UserError: for a format_version this sab_jax does not read.
  """
  path = os.path.join(os.path.abspath(directory), MANIFEST)
  if not os.path.isfile(path):
    raise DamagedExport(f"{path} is missing: {directory} is not a finished export (rerun the export stage)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    cause = str(e).splitlines()[0][:120]
    raise DamagedExport(f"{path} is not valid JSON ({type(e).__name__}: {cause}): the export is damaged; "
                        f"{REEXPORT}") from None
  if not isinstance(manifest, dict):
    raise DamagedExport(f"{path} holds a JSON {type(manifest).__name__}, not an object: the export is "
                        f"damaged; {REEXPORT}")
  version = manifest.get("format_version")
  if version not in READABLE_VERSIONS:
    raise UserError(f"{path}: unknown format_version {version!r}; this sab_jax reads format_version "
                    f"{FORMAT_VERSION} (and {', '.join(str(v) for v in READABLE_VERSIONS if v != FORMAT_VERSION)}): "
                    f"re-export the model with this version or load it with the one that wrote it")
  _check_fields(path, manifest)
  return manifest


_INTS = "a list of integers"
_TOP_FIELDS = {"method": str, "provider": dict, "model_config": (dict, type(None)), "layers": list,
               "params": dict}
_PROVIDER_FIELDS = {"name": str, "class": str, "fields": dict}
_LAYER_FIELDS = {"path": str, "shape": _INTS, "parts": dict}
_PART_FIELDS = {"dtype": str, "shape": _INTS, "compact_shape": _INTS, "stored_dtype": str, "stored_shape": _INTS}
_PARAM_FIELDS = {"shape": _INTS, "dtype": str}


def _check_fields(path: str, manifest: dict[str, Any]) -> None:
  """Raises DamagedExport unless every field the reader indexes is there with its type."""

  def check(obj: Any, fields: Mapping[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
      raise DamagedExport(f"{path}: {where} is a {type(obj).__name__}, not an object: the manifest is damaged "
                          f"or was edited; {REEXPORT}")
    for k, kind in fields.items():
      v = obj.get(k)
      ok = (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            if kind is _INTS else isinstance(v, kind))
      if not ok:
        got = "missing" if k not in obj else f"{json.dumps(v)[:40]}"
        want = kind if kind is _INTS else " or ".join(
            t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise DamagedExport(f"{path}: {where}{'.' if where else ''}{k} is {got}, expected {want}: the manifest "
                            f"is damaged or was edited; {REEXPORT}")

  check(manifest, _TOP_FIELDS, "")
  check(manifest["provider"], _PROVIDER_FIELDS, "provider")
  for i, layer in enumerate(manifest["layers"]):
    check(layer, _LAYER_FIELDS, f"layers[{i}]")
    for k, part in layer["parts"].items():
      check(part, _PART_FIELDS, f"layers[{i}].parts.{k}")
  for p, spec in manifest["params"].items():
    check(spec, _PARAM_FIELDS, f"params[{p!r}]")
  if manifest["format_version"] >= 2:
    check(manifest, {"checksums": dict}, "")
    bad = sorted(k for k, v in manifest["checksums"].items() if not isinstance(v, str))
    if bad:
      raise DamagedExport(f"{path}: checksums of {bad[:4]} are not strings: the manifest is damaged or was "
                          f"edited; {REEXPORT}")
