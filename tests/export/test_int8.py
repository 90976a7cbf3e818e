"""int8 params: absmax quantization with bf16 scales, within the documented bound."""

import numpy as np
import pytest

from export.export_fixture import int8_bound
from sab_jax.export import int8


def test_int8_quantizer_edge_cases():
  r = np.random.default_rng(0)
  # Rows spanning decades of magnitude, a zero row, a vector (one scale), bf16 input.
  x = (r.normal(size=(50, 300)) * np.logspace(-6, 3, 50)[:, None]).astype(np.float32)
  x[7] = 0
  for a, axis in ((x, 1), (x, 0), (x[3], 0), (x.astype(int8.SCALE_DTYPE), 1)):
    q, s = int8.quantize_int8(a, axis)
    want = list(a.shape)
    want[axis] = 1
    assert q.dtype == np.int8 and s.dtype == int8.SCALE_DTYPE and list(s.shape) == want
    back = int8.dequantize_int8(q, s)
    a64 = np.asarray(a, np.float64)
    absmax = np.max(np.abs(a64), axis=axis, keepdims=True)
    assert np.all(np.abs(back - a64) <= int8_bound(absmax))
    assert np.all(np.abs(back - a64) <= np.asarray(s, np.float64) / 2 + 1e-6 * absmax)  # nothing clipped further
  assert not int8.quantize_int8(x, 1)[0][7].any()
  x[2, 5] = np.nan
  with pytest.raises(ValueError, match="finite"):
    int8.quantize_int8(x, 1)


def test_int8_axis_is_per_output_channel_for_dense_kernels():
  kernels = {"lm_head.kernel"}
  assert int8.int8_axis("lm_head.kernel", (32, 64), kernels) == 0
  assert int8.int8_axis("language_model.embed_tokens.embedding", (64, 32), kernels) == 1
  assert int8.int8_axis("language_model.norm.scale", (32,), kernels) == 0
