"""The packed 1-bit Pallas kernel (interpret mode on CPU) against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.export import packing
from sab_jax.kernels import packed_matmul


def _reference(x, signs, col, group_size):
  """Σ_l Σ_g col[g, l] ⊙ (x[l, :, g] @ ±1) in float64."""
  w = np.where(signs, 1.0, -1.0)
  n_lhs, _, k = x.shape
  y = 0
  for l in range(n_lhs):
    for g in range(k // group_size):
      rows = slice(g * group_size, (g + 1) * group_size)
      y = y + (x[l][:, rows].astype(np.float64) @ w[rows]) * col[g, l].astype(np.float64)
  return y


CASES = [  # L, M, K, N, group_size, chunk, block_n, k_splits, vector
    (1, 1, 256, 96, 256, 128, 64, 1, True),     # XNOR-like, N not a multiple of block_n
    (2, 3, 1024, 200, 512, 128, 64, 3, True),   # two LHS, two groups, K splits that do not divide
    (2, 16, 384, 128, 128, 128, 128, 4, False),  # dot path, one group per chunk
    (1, 5, 192, 40, 64, 32, 32, 2, False),      # M padded to 16, small chunk
    (1, 2, 64, 33, 32, 32, 64, 8, True),        # more splits than chunks
]


@pytest.mark.parametrize("n_lhs,m,k,n,group_size,chunk,block_n,k_splits,vector", CASES)
def test_kernel_matches_float64(n_lhs, m, k, n, group_size, chunk, block_n, k_splits, vector):
  rng = np.random.default_rng(k + n)
  x = rng.standard_normal((n_lhs, m, k)).astype(np.float32)
  signs = rng.random((k, n)) < 0.5
  col = rng.uniform(0.1, 1.0, (k // group_size, n_lhs, n)).astype(np.float32)
  y = packed_matmul.plane_matmul(jnp.asarray(x), jnp.asarray(packing.pack_bits(signs)), jnp.asarray(col),
                                 group_size=group_size, chunk=chunk, block_n=block_n, k_splits=k_splits,
                                 vector=vector, interpret=True)
  want = _reference(x, signs, col, group_size)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-5 * np.abs(want).max())
  ref = packed_matmul.plane_matmul_reference(jnp.asarray(x), jnp.asarray(packing.pack_bits(signs)),
                                             jnp.asarray(col), group_size=group_size)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_a_flipped_bit_changes_exactly_one_column():
  """Bit order: bit i of word w is input row 32·w + i (the export's layout)."""
  rng = np.random.default_rng(0)
  k, n = 128, 64
  signs = rng.random((k, n)) < 0.5
  x = np.zeros((1, 1, k), np.float32)
  x[0, 0, 37] = 1.0  # reads only row 37 = bit 5 of word 1
  col = np.ones((1, 1, n), np.float32)
  y = np.asarray(packed_matmul.plane_matmul(jnp.asarray(x), jnp.asarray(packing.pack_bits(signs)), jnp.asarray(col),
                                            group_size=k, block_n=64, interpret=True, vector=True))
  np.testing.assert_array_equal(y[0], np.where(signs[37], 1.0, -1.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=100), "multiple"),
    (dict(group_size=128, chunk=48), "multiple of 32"),
    (dict(group_size=128, vector=True, m=5), "M <= 4"),
])
def test_bad_arguments_are_refused(kwargs, match):
  m = kwargs.pop("m", 1)
  x = jnp.zeros((1, m, 256), jnp.float32)
  bits = jnp.zeros((8, 64), jnp.uint32)
  col = jnp.ones((256 // 128, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match=match):
    packed_matmul.plane_matmul(x, bits, col, interpret=True, **kwargs)


def test_tiling_splits_k_and_keeps_block_sizes():
  assert packed_matmul.tiling(11008, 32) == (64, 8)
  assert packed_matmul.tiling(4096, 86) == (128, 8)
  assert packed_matmul.tiling(128, 2) == (128, 2)
