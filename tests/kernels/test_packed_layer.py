"""The one-launch layer kernel (interpret mode on CPU) against float64 numpy, its int8
(popcount) variant against its XLA twin and the exact result, and the Triton lowering of
the packed kernels, checked without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.export import packing
from sab_jax.kernels import packed_layer, packed_matmul


def _planes(rng, k, n, k_res, group, res_group, n_lhs=2):
  """A structured-SAB-like layer: a sign plane with `n_lhs` row-scale sets over all inputs,
  and a gathered residual plane over `k_res` rows drawn from them."""
  signs = [rng.random((k, n)) < 0.5, rng.random((k_res, n)) < 0.5]
  planes = [
      {"bits": packing.pack_bits(signs[0]), "lhs_scale": rng.uniform(0.5, 1.5, (n_lhs, k)).astype(np.float32),
       "col_scale": rng.uniform(0.1, 1.0, (k // group, n_lhs, n)).astype(np.float32)},
      {"bits": packing.pack_bits(signs[1]), "lhs_scale": rng.uniform(0.5, 1.5, (1, k_res)).astype(np.float32),
       "col_scale": rng.uniform(0.1, 1.0, (k_res // res_group, 1, n)).astype(np.float32),
       "rows": rng.integers(0, k, k_res).astype(np.int32)},
  ]
  return planes, signs, [group, res_group]


def _reference(x, planes, signs, group_sizes):
  y = 0
  for p, s, gs in zip(planes, signs, group_sizes):
    xp = x[:, p["rows"]] if "rows" in p else x
    w = np.where(s, 1.0, -1.0)
    for l in range(p["lhs_scale"].shape[0]):
      xl = xp.astype(np.float64) * p["lhs_scale"][l]
      for g in range(p["col_scale"].shape[0]):
        r = slice(g * gs, (g + 1) * gs)
        y = y + (xl[:, r] @ w[r]) * p["col_scale"][g, l]
  return y


CASES = [  # M, K, N, residual rows, group, residual group, block_n, k_splits, vector, reduce
    (1, 1024, 200, 128, 512, 64, 64, 3, True, "sum"),      # splits that pad both planes, N % block_n != 0
    (3, 1024, 128, 128, 512, 64, 128, 2, True, "atomic"),
    (6, 512, 96, 64, 256, 32, 32, 4, False, "sum"),        # dot on 16-row-padded tiles
    (16, 512, 64, 64, 512, 64, 64, 1, False, "atomic"),
    (2, 256, 48, 32, 128, 32, 16, 8, True, "sum"),         # more splits than chunks
]


@pytest.mark.parametrize("m,k,n,k_res,group,res_group,block_n,k_splits,vector,reduce", CASES)
def test_layer_kernel_matches_float64(m, k, n, k_res, group, res_group, block_n, k_splits, vector, reduce):
  rng = np.random.default_rng(k + n + m)
  planes, signs, sizes = _planes(rng, k, n, k_res, group, res_group)
  x = rng.standard_normal((m, k)).astype(np.float32)
  layout, arrays = packed_layer.prepare(planes, sizes, n, block_n=block_n, k_splits=k_splits)
  arrays = [{key: jnp.asarray(v) for key, v in a.items()} for a in arrays]
  want = _reference(x, planes, signs, sizes)
  for gather_in_kernel in ((True, False) if vector else (False,)):
    y = packed_layer.layer_matmul(jnp.asarray(x), arrays, layout, vector=vector, reduce=reduce, interpret=True,
                                  dtype=jnp.float32, gather_in_kernel=gather_in_kernel)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_unscaled_plane_in_order_needs_no_gather_and_bit_order_is_the_exports():
  """An XNOR plane whose K the splits divide is read in order without row scales; input
  37 is bit 5 of word 1, so x = e_37 returns row 37 of the signs."""
  rng = np.random.default_rng(0)
  k, n = 256, 64
  signs = rng.random((k, n)) < 0.5
  plane = {"bits": packing.pack_bits(signs), "lhs_scale": np.ones((1, k), np.float32),
           "col_scale": np.ones((1, 1, n), np.float32)}
  layout, arrays = packed_layer.prepare([plane], [k], n, block_n=64, k_splits=2)
  assert not layout.planes[0].gathered and not layout.planes[0].scaled and set(arrays[0]) == {"bits", "col_scale"}
  x = np.zeros((1, k), np.float32)
  x[0, 37] = 1.0
  y = packed_layer.layer_matmul(jnp.asarray(x), [{key: jnp.asarray(v) for key, v in arrays[0].items()}], layout,
                                interpret=True, dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(y)[0], np.where(signs[37], 1.0, -1.0))


def test_bad_layouts_and_arguments_are_refused():
  rng = np.random.default_rng(1)
  planes, _, sizes = _planes(rng, 512, 64, 64, 256, 32)
  with pytest.raises(ValueError, match="one group size per plane"):
    packed_layer.prepare(planes, sizes[:1], 64)
  with pytest.raises(ValueError, match="plane shapes disagree"):
    packed_layer.prepare(planes, [128, 32], 64)
  with pytest.raises(ValueError, match="multiple of 32"):
    packed_layer.prepare(planes, [256, 48], 64)
  layout, arrays = packed_layer.prepare(planes, sizes, 64)
  arrays = [{key: jnp.asarray(v) for key, v in a.items()} for a in arrays]
  with pytest.raises(ValueError, match="M <= 4"):
    packed_layer.layer_matmul(jnp.zeros((5, 512)), arrays, layout, vector=True, interpret=True)
  with pytest.raises(ValueError, match="reduce"):
    packed_layer.layer_matmul(jnp.zeros((1, 512)), arrays, layout, reduce="tree", interpret=True)
  gathered = layout.__class__(layout.planes[1:], 64, layout.block_n, layout.k_splits)
  narrow = int(np.asarray(arrays[1]["rows"]).max())  # one column short of what the gathered plane reads
  for vector in (True, False):  # the gather in the kernel or in XLA: refused either way
    with pytest.raises(ValueError, match=f"x has {narrow} inputs"):
      packed_layer.layer_matmul(jnp.zeros((1, narrow)), arrays[1:], gathered, vector=vector, interpret=True)
    packed_layer.layer_matmul(jnp.zeros((1, narrow + 1)), arrays[1:], gathered, vector=vector, interpret=True)
  with pytest.raises(ValueError, match="x has 256 inputs"):
    packed_layer.layer_matmul(jnp.zeros((1, 256)), arrays[:1], layout.__class__(layout.planes[:1], 64, 128, 4),
                              interpret=True)


def _one_lhs_layer(rng, k=1024, n=200, k_res=128, block_n=64, k_splits=3):
  planes, signs, sizes = _planes(rng, k, n, k_res, 512, 64, n_lhs=1)
  layout, arrays = packed_layer.prepare(planes, sizes, n, block_n=block_n, k_splits=k_splits)
  return layout, [{key: jnp.asarray(v) for key, v in a.items()} for a in arrays], planes, signs, sizes


@pytest.mark.parametrize("m,reduce", [(1, "sum"), pytest.param(3, "atomic", marks=pytest.mark.slow)])
def test_int8_kernel_matches_its_xla_reference(m, reduce):
  """The popcount kernel computes exactly the quantized sum (integers, then float scales)."""
  rng = np.random.default_rng(m)
  layout, arrays, planes, signs, sizes = _one_lhs_layer(rng)
  x = jnp.asarray(rng.standard_normal((m, 1024)).astype(np.float32))
  ref = packed_layer.int8_reference(x, arrays, layout)
  for gather_in_kernel in (True, False):
    y = packed_layer.layer_matmul(x, arrays, layout, activations="int8", reduce=reduce, interpret=True,
                                  gather_in_kernel=gather_in_kernel)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))
  # and it is the bf16 result up to the activations' rounding: |error| <= Σ_chunks |α_c| · scale/2 · chunk
  exact = _reference(np.asarray(x), planes, signs, sizes)
  bound = 0
  for p, a in zip(layout.planes, arrays):
    v = np.asarray(x, np.float64)[:, np.asarray(a["rows"])] if p.gathered else np.asarray(x, np.float64)
    v = v * np.asarray(a["lhs_scale"])[0]
    half_step = np.abs(v).reshape(m, -1, p.chunk).max(-1) / 127 / 2               # [M, chunks]
    groups = np.arange(half_step.shape[1]) * p.chunk // p.group_size
    bound = bound + p.chunk * half_step @ np.abs(np.asarray(a["col_scale"], np.float64)[groups, 0])
  err = np.abs(np.asarray(ref, np.float64) - exact)
  assert (err <= bound[:, :200] + 1e-5).all() and err.max() > 0


def test_int8_is_exact_for_activations_on_the_int8_grid():
  """Integers in [-127, 127] with 127 in every chunk quantize to themselves."""
  rng = np.random.default_rng(5)
  k, n = 512, 64
  signs = rng.random((k, n)) < 0.5
  plane = {"bits": packing.pack_bits(signs), "lhs_scale": np.ones((1, k), np.float32),
           "col_scale": rng.uniform(0.1, 1.0, (1, 1, n)).astype(np.float32)}
  layout, arrays = packed_layer.prepare([plane], [k], n, block_n=32, k_splits=2)
  arrays = [{key: jnp.asarray(v) for key, v in a.items()} for a in arrays]
  x = rng.integers(-127, 128, (2, k)).astype(np.float32)
  x[:, ::128] = 127.0
  y = packed_layer.layer_matmul(jnp.asarray(x), arrays, layout, activations="int8", interpret=True)
  want = (x.astype(np.float64) @ np.where(signs, 1.0, -1.0)) * plane["col_scale"][0, 0]
  np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_int8_refusals():
  rng = np.random.default_rng(6)
  layout, arrays, *_ = _one_lhs_layer(rng)
  with pytest.raises(ValueError, match="M <= 4"):
    packed_layer.layer_matmul(jnp.zeros((5, 1024)), arrays, layout, activations="int8", interpret=True)
  with pytest.raises(ValueError, match="activations"):
    packed_layer.layer_matmul(jnp.zeros((1, 1024)), arrays, layout, activations="int4", interpret=True)
  planes, _, sizes = _planes(rng, 512, 64, 64, 256, 32, n_lhs=2)
  layout2, arrays2 = packed_layer.prepare(planes, sizes, 64)
  with pytest.raises(ValueError, match="one row-scale set"):
    packed_layer.layer_matmul(jnp.zeros((1, 512)), arrays2, layout2, activations="int8", interpret=True)


@pytest.mark.parametrize("m", [1, 16])
def test_both_kernels_lower_to_triton_for_cuda(m):
  """Lowering for CUDA runs the whole Pallas -> Triton IR path on this CPU machine: what
  fails here would fail on the GPU before Triton compiles anything."""
  rng = np.random.default_rng(2)
  k, n = 1024, 256
  planes, _, sizes = _planes(rng, k, n, 128, 512, 64)

  def triton_calls(f, *args):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call")

  x = jnp.zeros((m, k), jnp.bfloat16)
  for reduce in packed_layer.REDUCE:
    layout, arrays = packed_layer.prepare(planes, sizes, n, k_splits=3)
    arrays = [{key: jnp.asarray(v) for key, v in a.items()} for a in arrays]
    assert triton_calls(lambda x, a: packed_layer.layer_matmul(x, a, layout, reduce=reduce), x, arrays) == 1
  if m <= 4:  # the popcount kernel (decode only)
    layout, arrays, *_ = _one_lhs_layer(rng, k=k, n=n)
    assert triton_calls(lambda x, a: packed_layer.layer_matmul(x, a, layout, activations="int8"), x, arrays) == 1
  bits, col = jnp.asarray(planes[0]["bits"]), jnp.ones((2, 1, n), jnp.float32)
  assert triton_calls(lambda x, b, c: packed_matmul.plane_matmul(
      x[None], b, c, group_size=512, block_n=64, k_splits=8, vector=m <= 4), x, bits, col) == 1
