"""Bit counts against hand counts on a 20×6 layer with blocks of 8 (8, 8, 4 rows)."""

import math

import pytest

from sab_jax.quant.core import bits_core as bits


def test_block_rows():
  assert bits.block_rows(20, 8) == [8, 8, 4]
  assert bits.block_rows(4096, 512) == [512] * 8


def test_positions_take_the_cheaper():
  assert bits.positions_bits(1, 8) == 3   # index list: 1 × 3 bits
  assert bits.positions_bits(5, 8) == 8   # bitmap: 8 bits beat 15
  assert bits.positions_bits(0, 8) == 0


def test_xnor():
  """120 signs + 6 scales × 16 = 216."""
  c = bits.xnor_bits(20, 6)
  assert (c.nominal_bits, c.stored_bits) == (1.0, 216)
  assert c.bits_per_weight == pytest.approx(1.8)


def test_pbllm():
  """12 salient of 120: 108 signs + 96 int8 + min(120, 12·7 = 84) positions + 3·2·6·16 = 576."""
  c = bits.pbllm_bits(20, 6, n_salient=12, salient_bits=8, n_blocks=3)
  assert c.stored_bits == 108 + 96 + 84 + 576
  assert c.nominal_bits == pytest.approx(0.9 + 0.8)


# One salient row per block. Common: 120 signs + 3·6 residual + positions 3 + 3 + 2.
_COMMON = 120 + 18 + 8


@pytest.mark.parametrize("mode,split,extra", [
    # bitmap (20−3)·6 = 102, alpha_out 3·4·6·16 = 1152, alpha_in 2·20·16 = 640
    ("rc", True, 102 + 1152 + 640),
    # no bitmap, alpha_out 3·3·6·16 = 864, alpha_in (20 + 3)·16 = 368
    ("rc", False, 864 + 368),
    # bitmap 102, alpha_out 1152, mu 1152
    ("mean_offset", True, 102 + 1152 + 1152),
])
def test_salient_split(mode, split, extra):
  c = bits.salient_split_bits(20, 6, block_rows=[8, 8, 4], salient_per_block=[1, 1, 1],
                              mode=mode, split=split)
  assert c.stored_bits == _COMMON + extra
  assert c.nominal_bits == pytest.approx(1 + 3 / 20)


@pytest.mark.parametrize("split,extra", [
    # bitmap 20·6 = 120, alpha_out 3·6·6·16 = 1728, alpha_in (2·20 + 2·3)·16 = 736
    (True, 120 + 1728 + 736),
    # bitmap on the salient rows 3·6 = 18, alpha_out 3·5·6·16 = 1440, alpha_in (20 + 3 + 2·3)·16 = 464
    (False, 18 + 1440 + 464),
])
def test_salient_groups(split, extra):
  c = bits.salient_split_bits(20, 6, block_rows=[8, 8, 4], salient_per_block=[1, 1, 1],
                              mode="rc", split=split, salient_groups=True)
  assert c.stored_bits == _COMMON + extra
  assert c.nominal_bits == pytest.approx(1 + 3 / 20)


@pytest.mark.parametrize("n_in,n_out", [(4096, 11008), (11008, 4096)])
def test_structured_sab_stores_at_most_1_2_bits(n_in, n_out):
  """The default structured SAB layout (512-input blocks, 41 salient rows) on 7B shapes."""
  rows = bits.block_rows(n_in, 512)
  c = bits.salient_split_bits(n_in, n_out, block_rows=rows, salient_per_block=[41] * len(rows),
                              mode="rc", split=False)
  assert c.bits_per_weight <= 1.2
  assert c.nominal_bits == pytest.approx(1 + 41 * len(rows) / n_in)
  # ... while the non-structured layout stores > 2.5 bits.
  rows = bits.block_rows(n_in, 128)
  c = bits.salient_split_bits(n_in, n_out, block_rows=rows, salient_per_block=[10] * len(rows),
                              mode="rc", split=True)
  assert c.bits_per_weight > 2.5 and math.isclose(c.nominal_bits, 1 + 10 / 128)
