"""The manifest's format: provider specs, checksums, and read_manifest's refusals."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from export.export_fixture import CASES
from sab_jax.errors import DamagedExport, UserError
from sab_jax.export import manifest as manifest_lib


def test_manifest_round_trips_the_provider():
  for p in CASES.values():
    spec = json.loads(json.dumps(manifest_lib.provider_spec(p)))
    assert manifest_lib.provider_from_spec(spec) == p
    assert spec["class"] == type(p).__name__ and spec["repr"] == repr(p)


def test_checksum_covers_dtype_shape_and_every_bit():
  a = np.arange(12, dtype=np.uint32).reshape(3, 4)
  s = manifest_lib.array_checksum(a)
  assert s.startswith("sha256:") and s == manifest_lib.array_checksum(a.copy())
  assert s == manifest_lib.array_checksum(np.asfortranarray(a))  # values, not memory layout
  b = a.copy()
  b.reshape(-1).view(np.uint8)[17] ^= 1
  others = [b, a.reshape(4, 3), a.view(np.int32), a.view(np.float32)]
  assert len({s, *(manifest_lib.array_checksum(x) for x in others)}) == 1 + len(others)
  h = np.ones(5, ml_dtypes.bfloat16)
  assert manifest_lib.array_checksum(h) != manifest_lib.array_checksum(h.view(np.uint16))
  assert manifest_lib.array_checksum(np.zeros((0, 3), np.int8))


def _write(tmp_path, text):
  with open(tmp_path / manifest_lib.MANIFEST, "w") as f:
    f.write(text)
  return str(tmp_path)


def test_read_manifest_refusals_are_one_line(tmp_path):
  path = os.path.join(str(tmp_path), manifest_lib.MANIFEST)
  for text, error, match in (
      ('{"format_version": 2, "meth', DamagedExport, "is not valid JSON.*re-export"),
      ("[1, 2]", DamagedExport, "holds a JSON list, not an object"),
      ('{"format_version": 3}', UserError, "unknown format_version 3; this sab_jax reads format_version 2 "
                                           r"\(and 1\)"),
      ('{"format_version": 2, "method": "x", "provider": {"name": "xnor", "class": "Xnor", "fields": {}}, '
       '"model_config": null, "layers": [], "params": {"a": {"shape": [2], "dtype": 1}}}',
       DamagedExport, r"params\['a'\].dtype is 1, expected str"),
      ('{"format_version": 2, "method": "x", "provider": {"name": "xnor", "class": "Xnor", "fields": {}}, '
       '"model_config": null, "layers": [], "params": {}}', DamagedExport, "checksums is missing, expected dict"),
  ):
    _write(tmp_path, text)
    with pytest.raises(error, match=match) as e:
      manifest_lib.read_manifest(str(tmp_path))
    assert "\n" not in str(e.value) and str(e.value).startswith(path), str(e.value)
  os.remove(path)
  with pytest.raises(DamagedExport, match="is missing.*not a finished export"):
    manifest_lib.read_manifest(str(tmp_path))
