"""Bit packing along the input dimension, and the sparse layout of binarized parts."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sab_jax.export import packing
from sab_jax.quant.providers import PbLlmParts, SalientSplitParts


@pytest.mark.parametrize("n_in", [1, 7, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("n_out", [1, 3, 16])
def test_round_trip_and_size_for_any_rows(n_in, n_out):
  b = np.random.default_rng(n_in * 100 + n_out).random((n_in, n_out)) < 0.5
  words = packing.pack_bits(b)
  assert words.dtype == np.uint32 and words.shape == (-(-n_in // 32), n_out)
  assert words.nbytes == -(-n_in // 32) * n_out * 4
  back = packing.unpack_bits(words, n_in)
  assert back.dtype == np.bool_
  np.testing.assert_array_equal(back, b)
  # Padding rows are zero bits.
  pad = n_in % 32
  if pad:
    assert np.all(words[-1] >> np.uint32(pad) == 0)


def test_bit_order_is_input_row_within_word():
  b = np.zeros((70, 2), bool)
  b[0, 0] = b[33, 0] = b[31, 1] = b[69, 1] = True
  words = packing.pack_bits(b)
  np.testing.assert_array_equal(words, np.array([[1, 1 << 31], [2, 0], [0, 1 << 5]], np.uint32))


def test_one_dimensional_and_jax_unpacking():
  flags = np.random.default_rng(0).random(45) < 0.3
  words = packing.pack_bits(flags)
  assert words.shape == (2,)
  np.testing.assert_array_equal(packing.unpack_bits(words, 45), flags)
  plane = np.random.default_rng(1).random((40, 5)) < 0.5
  out = jax.jit(packing.unpack_bits, static_argnums=1)(jnp.asarray(packing.pack_bits(plane)), 40)
  assert isinstance(out, jax.Array) and out.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(out), plane)


def test_bad_inputs_are_refused():
  with pytest.raises(TypeError, match="bool"):
    packing.pack_bits(np.zeros((4, 4), np.int8))
  with pytest.raises(ValueError, match="words per column"):
    packing.unpack_bits(np.zeros((2, 3), np.uint32), 70)


def test_packed_parts_pack_only_bools():
  r = np.random.default_rng(0)
  parts = {"signs": r.random((40, 8)) < 0.5, "salient_rows": r.random(40) < 0.2,
           "alpha_out": r.normal(size=(2, 8)).astype(ml_dtypes.bfloat16),
           "int_values": r.integers(-127, 128, (40, 8)).astype(np.int8)}
  packed = packing.packed_parts(parts)
  assert packed["signs"].dtype == np.uint32 and packed["signs"].shape == (2, 8)
  assert packed["salient_rows"].dtype == np.uint32 and packed["salient_rows"].shape == (2,)
  assert packed["alpha_out"].dtype == ml_dtypes.bfloat16 and packed["int_values"].dtype == np.int8
  back = packing.unpacked_parts(packed, {k: v.shape for k, v in parts.items()})
  for k, v in parts.items():
    assert back[k].dtype == v.dtype
    np.testing.assert_array_equal(back[k], v)
  with pytest.raises(ValueError, match="cannot hold"):
    packing.unpacked_parts(packed, dict({k: v.shape for k, v in parts.items()}, signs=(70, 8)))
  with pytest.raises(ValueError, match="declared shape"):
    packing.unpacked_parts(packed, dict({k: v.shape for k, v in parts.items()}, alpha_out=(3, 8)))
  with pytest.raises(ValueError, match="differ"):
    packing.unpacked_parts(packed, {"signs": (40, 8)})


def _salient_split_parts(n_in=70, n_out=6, structured=False, seed=0):
  r = np.random.default_rng(seed)
  sal = r.random(n_in) < 0.2
  group = 32
  g, c = -(-n_in // group), 3 if structured else 4
  a_in = r.normal(size=(n_in, 2)).astype(ml_dtypes.bfloat16)
  if structured:
    a_in[~sal, 1] = 1.0
  return SalientSplitParts(
      signs=r.random((n_in, n_out)) < 0.5, residual_signs=(r.random((n_in, n_out)) < 0.5) & sal[:, None],
      salient_rows=sal, alpha_out=r.normal(size=(g, c, n_out)).astype(ml_dtypes.bfloat16), alpha_in=a_in,
      group_hi=None if structured else (r.random((n_in, n_out)) < 0.5) & ~sal[:, None], group=group, mode="rc")


def _pbllm_parts(shape, fraction, seed):
  r = np.random.default_rng(seed)
  mask = r.random(shape) < fraction
  b = -(-shape[0] // 128)
  return PbLlmParts(salient_mask=mask, int_values=np.where(mask, r.integers(-127, 128, shape), 0).astype(np.int8),
                    int_scale=np.ones((b, shape[1]), ml_dtypes.bfloat16), signs=(r.random(shape) < 0.5) & ~mask,
                    alpha_out=np.ones((b, shape[1]), ml_dtypes.bfloat16))


def _shapes(parts):
  return {k: v.shape for k, v in parts.arrays().items()}


@pytest.mark.parametrize("structured", [False, True])
def test_sparse_layout_round_trip_and_size(structured):
  parts = _salient_split_parts(structured=structured)
  parts.check()
  n_in, n_out = parts.shape
  n_sal = int(parts.salient_rows.sum())
  compact = packing.compact_parts(parts)
  assert compact["residual_signs"].shape == (n_sal * n_out,)
  if structured:
    assert compact["alpha_in"].shape == (n_in + n_sal,)
  else:
    assert compact["group_hi"].shape == ((n_in - n_sal) * n_out,)
    assert compact["alpha_in"].shape == (n_in, 2)
  stored = packing.encode_parts(parts)
  back = packing.decode_parts(stored, {k: v.shape for k, v in compact.items()}, _shapes(parts), SalientSplitParts)
  assert set(back) == set(parts.arrays())
  for k, v in parts.arrays().items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)


def test_sparse_order_is_input_order_within_each_output_column():
  sal = np.array([False, True, False, True])
  res = np.zeros((4, 2), bool)
  res[1, 0], res[3, 1] = True, True
  parts = SalientSplitParts(signs=np.zeros((4, 2), bool), residual_signs=res, salient_rows=sal,
                            alpha_out=np.zeros((1, 3, 2), ml_dtypes.bfloat16), group=4)
  compact = packing.compact_parts(parts)
  np.testing.assert_array_equal(compact["residual_signs"], [True, False, False, True])


def test_pbllm_layout():
  parts = _pbllm_parts((50, 4), 0.1, 3)
  compact = packing.compact_parts(parts)
  mask = parts.salient_mask
  assert compact["int_values"].shape == (mask.sum(),) and compact["signs"].shape == ((~mask).sum(),)
  back = packing.expand_parts(compact, _shapes(parts), PbLlmParts)
  for k, v in parts.arrays().items():
    np.testing.assert_array_equal(back[k], v)


def test_sparse_layout_refuses_what_it_cannot_rebuild():
  parts = _salient_split_parts()
  bad = dataclasses.replace(parts, residual_signs=parts.residual_signs | ~parts.salient_rows[:, None])
  with pytest.raises(ValueError, match="outside the entries"):
    packing.compact_parts(bad)
  compact = packing.compact_parts(parts)
  compact["residual_signs"] = compact["residual_signs"][:-1]
  with pytest.raises(ValueError, match="selection marks"):
    packing.expand_parts(compact, _shapes(parts), SalientSplitParts)


@pytest.mark.parametrize("shape, dtype", [((128, 384), np.uint16), ((300, 300), np.int32)])
def test_sparse_salient_mask_is_stored_as_positions(shape, dtype):
  """At 0.5% salient weights PB-LLM's mask costs 16 (or 32) bits per salient weight as a
  position list instead of 1 bit per weight as a plane, and decodes to the same mask."""
  parts = _pbllm_parts(shape, 0.005, 4)
  mask = parts.salient_mask
  assert packing.as_positions(parts) == ["salient_mask"]
  stored = packing.encode_parts(parts)
  assert stored["salient_mask"].dtype == dtype and stored["salient_mask"].shape == (mask.sum(),)
  assert stored["salient_mask"].nbytes * 8 <= mask.sum() * 32 and 4 * 8 * stored["salient_mask"].nbytes < mask.size
  compact_shapes = {k: v.shape for k, v in packing.compact_parts(parts).items()}
  back = packing.decode_parts(stored, compact_shapes, _shapes(parts), PbLlmParts)
  for k, v in parts.arrays().items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype
  bad = dict(stored, salient_mask=stored["salient_mask"][::-1].copy())  # unsorted: a damaged file
  with pytest.raises(ValueError, match="sorted list"):
    packing.decode_parts(bad, compact_shapes, _shapes(parts), PbLlmParts)
