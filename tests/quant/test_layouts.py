"""Every provider's typed layout agrees with itself everywhere it is read.

For each method (and each layout variant): the parts' invariants hold, and the same Ŵ
comes out of `dequantize`, of the exporter's encode -> decode -> `provider.from_arrays`,
of the packed model's `PackedDense` (dequant mode; the kernels too where the layout has
planes) and of `BinaryDense` at step 0, whose `to_parts` gives the parts back. Adding a
method means adding it to `VARIANTS`: a method missing here fails `test_every_method_is_covered`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.export import packing
from sab_jax.quant import METHODS, binary_dense, providers
from sab_jax.quant.providers import base
from sab_jax.serve import packed
from quant.sensitivity_fixture import with_sensitivity

VARIANTS = {
    "xnor": providers.Xnor(),
    "pbllm": providers.PbLlm(),
    "pbllm_4bit": providers.PbLlm(salient_bits=4, salient_fraction=0.02),
    "billm": providers.BiLLM(),
    "arb_rc": providers.ArbRc(),
    "arb_rc_one_group": providers.ArbRc(salient_groups=False),  # the layout before two salient groups
    "arb_rc_structured": providers.ArbRc(structured=True, scale_block=256),
    "sab": providers.Sab(),
    "sab_structured": providers.Sab(structured=True, scale_block=256),
}
SHAPES = [pytest.param((300, 72), marks=pytest.mark.slow), (64, 40)]  # a partial last block; a layer narrower than a block


def _binarized(provider, shape, seed=0):
  rng = np.random.default_rng(seed)
  x_t = rng.standard_normal((400, shape[0])).astype(np.float32) * rng.lognormal(0, 1, shape[0]).astype(np.float32)
  x_v = rng.standard_normal((300, shape[0])).astype(np.float32)
  w = jnp.asarray(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0]))
  stats = base.LayerStats(jnp.asarray(2 / 400 * x_t.T @ x_t), jnp.asarray(2 / 300 * x_v.T @ x_v), 400, 300)
  return provider(w, with_sensitivity(stats, shape[1], seed))


def test_every_method_is_covered():
  assert {type(p) for p in VARIANTS.values()} == set(METHODS.values())


# Fast: on the narrow shape, a layout with bit planes and a residual (structured SAB), one
# with a mean offset and no planes (BiLLM), one with integer salient values (PB-LLM), one
# with both group bitmaps and four alpha_in slots (ARB-RC's salient groups).
FAST = {"sab_structured", "billm", "pbllm", "arb_rc"}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_one_layout_everywhere(name, shape):
  provider = VARIANTS[name]
  b = _binarized(provider, shape)
  parts = b.parts.map(np.asarray)
  parts.check()
  w_hat = np.asarray(b.w_hat)
  np.testing.assert_array_equal(np.asarray(base.dequantize(parts)), w_hat)

  # the exporter's storage: encode -> decode -> typed parts
  compact = packing.compact_parts(parts)
  stored = packing.encode_parts(parts)
  arrays = packing.decode_parts(stored, {k: v.shape for k, v in compact.items()},
                                {k: v.shape for k, v in parts.arrays().items()}, type(parts))
  back = provider.from_arrays(arrays)
  back.check()
  assert back.meta() == parts.meta()
  np.testing.assert_array_equal(np.asarray(base.dequantize(back)), w_hat)

  # the packed model's layer (the kernels where the layout has planes)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, shape[0])).astype(np.float32))
  ref = np.asarray(jnp.dot(x, b.w_hat))
  layer = packed.PackedDense(back, bias=None, dtype=jnp.float32, mode="dequant")
  np.testing.assert_array_equal(np.asarray(layer(x)), ref)
  if parts.planes() is not None:
    fast = packed.PackedDense(back, bias=None, dtype=jnp.float32, mode="kernel")
    assert np.abs(np.asarray(fast(x)) - ref).max() <= 1e-5 * np.abs(ref).max()

  # the quantization-aware layer: step 0 is the PTQ layer, and it writes the same parts back
  qat = binary_dense.BinaryDense(back)
  np.testing.assert_array_equal(np.asarray(qat.weight()), w_hat)
  again = qat.to_parts()
  assert type(again) is type(parts) and again.meta() == parts.meta()
  assert set(again.arrays()) == set(parts.arrays())
  for k, v in parts.arrays().items():
    np.testing.assert_array_equal(np.asarray(again.arrays()[k]), v, err_msg=k)


def test_check_names_the_broken_invariant():
  parts = _binarized(providers.Sab(structured=True, scale_block=256), (300, 72)).parts.map(np.asarray)
  with pytest.raises(ValueError, match="alpha_out"):
    dataclasses.replace(parts, alpha_out=parts.alpha_out[:1]).check()
  with pytest.raises(ValueError, match="salient_rows"):
    dataclasses.replace(parts, salient_rows=parts.salient_rows.astype(np.int8)).check()
  with pytest.raises(ValueError, match="group_hi"):  # a group bitmap where the layout (read off alpha_out) has none
    dataclasses.replace(parts, group_hi=np.zeros(parts.shape, bool)).check()
  with pytest.raises(ValueError, match="alpha_out components"):  # no layout has 7 scale components
    dataclasses.replace(parts, alpha_out=np.zeros(parts.alpha_out.shape[:1] + (7,) + parts.alpha_out.shape[2:],
                                                  parts.alpha_out.dtype)).check()
  with pytest.raises(ValueError, match="residual_signs"):  # which rows are salient: residual planes only there
    dataclasses.replace(parts, residual_signs=parts.residual_signs | ~parts.salient_rows[:, None]).check()
