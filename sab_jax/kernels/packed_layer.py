"""A whole binarized layer in one Pallas launch: every plane of `x @ Ŵ`, read from the bits.

`packed_matmul.plane_matmul` launches once per plane and leaves the row scaling, the x
permutation, the padding and the K-split reduction to XLA: about six launches per
structured-SAB layer, which at decode cost more than reading the bits (RESULTS.md). Here

  * what is static is laid out once, at load time (`prepare`): bits padded to the tiling,
    row scales (α_r) and column scales (α_c) padded to match;
  * the kernel reads x in its natural order, as `[M, K/32, 32]` (a free reshape; bit i of
    word w is input 32·w + i), applies the row scales itself and sums every plane of its
    (column tile, K split) into one partial. The multiply-add variant (M <= 4) unpacks
    a chunk to `[W, 32, BN]` in input order; the dot variant to `[32, W, BN]` and
    transposes its few x rows to match: each the cheaper on sm_90 by the SASS counts of
    `experiments/benchmarks/packed_kernel_sass.py`;
  * the K splits are reduced by one XLA sum (`reduce="sum"`) or by atomic adds into a
    zeroed output (`reduce="atomic"`).
At M <= 4 the kernel also gathers a gathered plane's x columns (the salient rows of the
structured layout) itself, so XLA keeps only the zeros or the final sum; the dot variant
(M > 4) leaves that gather to XLA.

`activations="int8"` (decode, M <= 4, planes with one row-scale set): the kernel
quantizes x ⊙ α_r per chunk to int8 (absmax scale) itself and each 32-input word of
signs meets the 8 bit planes of q by AND + popcount: 8 of each per 32 weights instead of
an unpack and a multiply-add per weight,
  Σ_k q_k·(2w_k - 1) = 2·Σ_b coef_b·popc(Q_b & W) - Σ_k q_k,  coef = 1, 2, ..., 64, -128
(two's complement). An approximation of the bf16 result (activations to 8 bits);
`int8_reference` computes the same quantized sum in XLA.

Plane p of a layer computes Σ_l Σ_g α_c[g, l] ⊙ ((x_p ⊙ α_r[l])_g @ B_g) with
x_p = x[:, rows] for a gathered plane (see `sab_jax.serve.packed.planes_for`).
`interpret=True` runs the kernel on CPU; the tests compare it with float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sab_jax.kernels.packed_matmul import MIN_ROWS, VECTOR_MAX_ROWS, WORD_BITS, tiling

REDUCE = ("sum", "atomic")
ACTIVATIONS = ("bf16", "int8")
INT8_BITS = 8
# Column tile for layers served with int8 activations: each program quantizes its x chunks
# itself, so wider tiles share that work; 128 issues ~40% fewer instructions than 64 on
# the 7B shapes by the SASS counts (experiments/benchmarks/packed_kernel_sass.py).
INT8_BLOCK_N = 128


@dataclasses.dataclass(frozen=True)
class PlaneLayout:
  """Static shape of one prepared plane."""
  n_lhs: int
  chunk: int             # inputs unpacked per step (32, 64 or 128; divides group_size)
  chunks_per_split: int
  group_size: int        # plane rows sharing one α_c row
  gathered: bool         # reads x[:, rows] (else x in order)
  scaled: bool           # has row scales (else all ones)
  x_width: int           # the x columns the plane reads: 1 + its largest row index


@dataclasses.dataclass(frozen=True)
class Layout:
  planes: tuple[PlaneLayout, ...]
  n_out: int
  block_n: int
  k_splits: int


def _chunk(group_size: int) -> int:
  for c in (128, 64, 32):
    if group_size % c == 0:
      return c
  raise ValueError(f"group_size {group_size} must be a multiple of 32")


def prepare(planes: Sequence[Mapping[str, np.ndarray]], group_sizes: Sequence[int], n_out: int, *,
            block_n: int | None = None, k_splits: int | None = None) -> tuple[Layout, list[dict[str, np.ndarray]]]:
  """Pads and lays out a layer's planes for `layer_matmul`; returns (layout, arrays).

  Args:
    planes: per plane, `bits` uint32 `[K_p/32, N]`, `lhs_scale` `[L, K_p]`, `col_scale`
      `[K_p/group_size, L, N]` and, for a gathered plane, `rows` `[K_p]` (the x index of
      each plane row; padding rows carry a zero row scale).
    group_sizes: per plane, rows sharing one `col_scale` row.
    n_out: N.
    block_n, k_splits: tiling (default: `packed_matmul.tiling`, K splits from plane 0).
  """
  if not planes or len(planes) != len(group_sizes):
    raise ValueError(f"need one group size per plane, got {len(group_sizes)} for {len(planes)} planes")
  chunks = [_chunk(g) for g in group_sizes]
  default_bn, default_splits = tiling(n_out, planes[0]["bits"].shape[0] * WORD_BITS // chunks[0])
  block_n = block_n or default_bn
  k_splits = k_splits or default_splits
  if block_n % 16 or k_splits < 1:
    raise ValueError(f"block_n ({block_n}) must be a multiple of 16 and k_splits ({k_splits}) positive")
  n_pad = -n_out % block_n
  layouts, arrays = [], []
  for p, gs, chunk in zip(planes, group_sizes, chunks):
    bits = np.asarray(p["bits"], np.uint32)
    lhs = np.asarray(p["lhs_scale"], np.float32)
    col = np.asarray(p["col_scale"])
    k = bits.shape[0] * WORD_BITS
    n_lhs = lhs.shape[0]
    if bits.shape[1] != n_out or lhs.shape[1] != k or gs % WORD_BITS or k % gs or col.shape != (k // gs, n_lhs, n_out):
      raise ValueError(f"plane shapes disagree: bits {bits.shape}, lhs_scale {lhs.shape}, col_scale {col.shape}, "
                       f"group_size {gs}, N {n_out}")
    per_split = math.ceil(k // chunk / k_splits)
    rows_padded = per_split * k_splits * chunk
    pad = rows_padded - k
    rows = p.get("rows")
    gathered = rows is not None or pad > 0
    scaled = pad > 0 or not np.all(lhs == 1.0)
    out = {"bits": np.pad(bits, ((0, pad // WORD_BITS), (0, n_pad))),
           "col_scale": np.pad(col, ((0, -(-rows_padded // gs) - col.shape[0]), (0, 0), (0, n_pad)))}
    if scaled:
      out["lhs_scale"] = np.pad(lhs, ((0, 0), (0, pad)))
    if gathered:
      rows = np.arange(k, dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
      out["rows"] = np.pad(rows, (0, pad))
    layouts.append(PlaneLayout(n_lhs=n_lhs, chunk=chunk, chunks_per_split=per_split, group_size=gs,
                               gathered=gathered, scaled=scaled,
                               x_width=int(out["rows"].max()) + 1 if gathered else k))
    arrays.append(out)
  return Layout(tuple(layouts), n_out, block_n, k_splits), arrays


def _signs(words: jax.Array) -> jax.Array:
  """uint32 `[W, BN]` -> bool `[W, 32, BN]`, True where the weight is +1 (input 32·w + i)."""
  shifts = jax.lax.broadcasted_iota(jnp.int32, (1, WORD_BITS, 1), 1).astype(jnp.uint32)
  return ((words[:, None, :] >> shifts) & jnp.uint32(1)) != 0


def _signs_bit_major(words: jax.Array) -> jax.Array:
  """uint32 `[W, BN]` -> bool `[32, W, BN]`: row i·W + w after a reshape is input 32·w + i."""
  shifts = jax.lax.broadcasted_iota(jnp.int32, (WORD_BITS, 1, 1), 0).astype(jnp.uint32)
  return ((words[None, :, :] >> shifts) & jnp.uint32(1)) != 0


def _bit_major(x: jax.Array) -> jax.Array:
  """`[R, W, 32]` in input order -> `[R, 32·W]` in the row order of `_signs_bit_major`."""
  r, w, _ = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(r, WORD_BITS * w)


def _kernel(*refs, layout: Layout, rows: int, vector: bool, reduce: str, dtype, gather_in_kernel: bool):
  *ins, o_ref = refs
  split = pl.program_id(1)
  bn = layout.block_n
  acc = [jnp.zeros((bn,), jnp.float32) for _ in range(rows)] if vector else jnp.zeros((rows, bn), jnp.float32)
  for p, read, x_ref, lhs_ref, b_ref, c_ref in _plane_refs(ins, layout, gather_in_kernel=gather_in_kernel):
    w = p.chunk // WORD_BITS

    def body(i, acc, p=p, read=read, x_ref=x_ref, lhs_ref=lhs_ref, b_ref=b_ref, c_ref=c_ref, w=w):
      words = b_ref[pl.ds(pl.multiple_of(i * w, w), w), :]
      g = ((split * p.chunks_per_split + i) * p.chunk) // p.group_size
      if vector:  # rows of x as [W, 32] tiles times one ±1 tile shared by every row and LHS
        plus = _signs(words)
        pm1 = jnp.where(plus, 1.0, -1.0)
        xs = [read(r, i) for r in range(rows)]
        acc = list(acc)
        for l in range(p.n_lhs):
          c = c_ref[g, l].astype(jnp.float32)
          lhs = lhs_ref[l, pl.ds(pl.multiple_of(i * w, w), w), :].astype(jnp.float32) if p.scaled else None
          for r in range(rows):
            xr = xs[r] * lhs if p.scaled else xs[r]
            acc[r] = acc[r] + jnp.sum(jnp.sum(xr[:, :, None] * pm1, axis=1), axis=0) * c
        return tuple(acc)
      # dot: the ±1 tile in (bit, word) row order, a reshape of leading axes only (the
      # input-order tile would need a layout change of the whole tile); the few x rows are
      # transposed to match instead
      sgn = jnp.where(_signs_bit_major(words), 1.0, -1.0).astype(dtype).reshape(p.chunk, bn)
      xc = _bit_major(x_ref[:, pl.ds(pl.multiple_of(i * w, w), w), :])
      for l in range(p.n_lhs):
        xl = xc
        if p.scaled:
          lhs = _bit_major(lhs_ref[pl.ds(l, 1), pl.ds(pl.multiple_of(i * w, w), w), :])
          xl = (xc.astype(jnp.float32) * lhs.astype(jnp.float32)).astype(dtype)
        acc = acc + jnp.dot(xl, sgn, preferred_element_type=jnp.float32) * c_ref[g, l].astype(jnp.float32)[None, :]
      return acc

    acc = jax.lax.fori_loop(0, p.chunks_per_split, body, tuple(acc) if vector else acc)
  if reduce == "sum":
    if vector:
      for r in range(rows):
        o_ref[0, r] = acc[r]
    else:
      o_ref[0] = acc
  elif vector:
    for r in range(rows):
      plgpu.atomic_add(o_ref, (pl.ds(r, 1), slice(None)), acc[r][None, :])
  else:
    plgpu.atomic_add(o_ref, (slice(None), slice(None)), acc)


def quantize(v: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """float `[..., R]` -> (int32 q `[..., R/chunk, chunk]` in [-127, 127], float32 scale
  `[..., R/chunk]`): per chunk, scale = absmax / 127 and q = floor(v / scale + 1/2).
  The kernel computes the same on each `[W, 32]` tile (floor, not round: Pallas lowers it)."""
  v = v.astype(jnp.float32).reshape(v.shape[:-1] + (-1, chunk))
  amax = jnp.max(jnp.abs(v), axis=-1)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.floor(v / scale[..., None] + 0.5), -127, 127).astype(jnp.int32)
  return q, scale


def _plane_input(x: jax.Array, a: Mapping[str, jax.Array], p: PlaneLayout) -> jax.Array:
  """What plane p multiplies: x (gathered) times its row scales, float32 `[M, rows]`."""
  xp = _plane_x(x, a, p).astype(jnp.float32)
  return xp * a["lhs_scale"][0][None, :] if p.scaled else xp


def _kernel_int8(*refs, layout: Layout, rows: int, reduce: str, gather_in_kernel: bool):
  """Per plane refs: x [M, words, 32], row scales [1, words, 32] (if scaled), bits, col.
  Each program quantizes its chunks of x itself (a few values; the same in every column
  tile) and meets each word of signs with the 8 bit planes of q by AND + popcount."""
  *ins, o_ref = refs
  split = pl.program_id(1)
  acc = [jnp.zeros((layout.block_n,), jnp.float32) for _ in range(rows)]
  b = jax.lax.broadcasted_iota(jnp.int32, (INT8_BITS, 1, 1), 0)
  coef = jnp.where(b == INT8_BITS - 1, -(1 << (INT8_BITS - 1)), jnp.left_shift(1, b))
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, 1, WORD_BITS), 2)
  for p, read, _, lhs_ref, b_ref, c_ref in _plane_refs(ins, layout, gather_in_kernel=gather_in_kernel):
    w = p.chunk // WORD_BITS

    def body(i, acc, p=p, read=read, lhs_ref=lhs_ref, b_ref=b_ref, c_ref=c_ref, w=w):
      span = pl.ds(pl.multiple_of(i * w, w), w)
      words = jax.lax.bitcast_convert_type(b_ref[span, :], jnp.int32)               # [W, BN]
      c = c_ref[((split * p.chunks_per_split + i) * p.chunk) // p.group_size, 0].astype(jnp.float32)
      acc = list(acc)
      for r in range(rows):
        v = read(r, i)                                                                # [W, 32]
        if p.scaled:
          v = v * lhs_ref[0, span, :].astype(jnp.float32)
        amax = jnp.max(jnp.max(jnp.abs(v), axis=1), axis=0)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        q = jnp.clip(jnp.floor(v / scale + 0.5), -127, 127).astype(jnp.int32)
        # bit plane b, word w: bit b of q (two's complement) of input 32·w + i at bit i
        planes = jnp.sum(((q[None, :, :] & 0xFF) >> b & 1) << lane, axis=2)            # [8, W]
        hits = jax.lax.population_count(planes[:, :, None] & words[None, :, :])      # int32: __nv_popc
        t = jnp.sum(jnp.sum(hits * coef, axis=0), axis=0).astype(jnp.float32)        # Σ_k q_k w_k, [BN]
        qsum = jnp.sum(jnp.sum(q, axis=1), axis=0).astype(jnp.float32)
        acc[r] = acc[r] + c * (scale * (2.0 * t - qsum))
      return tuple(acc)

    acc = jax.lax.fori_loop(0, p.chunks_per_split, body, tuple(acc))
  for r in range(rows):
    if reduce == "sum":
      o_ref[0, r] = acc[r]
    else:
      plgpu.atomic_add(o_ref, (pl.ds(r, 1), slice(None)), acc[r][None, :])


def int8_reference(x: jax.Array, arrays: Sequence[Mapping[str, jax.Array]], layout: Layout) -> jax.Array:
  """`activations="int8"` in XLA (float32 `[M, N]`): the same per-chunk quantization, the
  signs unpacked densely. For CPU, for M > 4, and as the kernel's oracle."""
  y = 0.0
  for p, a in zip(layout.planes, arrays):
    if p.n_lhs != 1:
      raise ValueError("int8 activations need planes with one row-scale set (planes_for(one_lhs=True))")
    q, scale = quantize(_plane_input(x, a, p), p.chunk)                          # [M, C, chunk], [M, C]
    k = a["bits"].shape[0] * WORD_BITS
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    signs = ((a["bits"][:, None, :] >> shifts[None, :, None]) & 1).reshape(k, -1)
    signs = jnp.where(signs != 0, 1.0, -1.0).reshape(k // p.chunk, p.chunk, -1)
    per_chunk = jnp.einsum("mck,ckn->mcn", q.astype(jnp.float32), signs) * scale[..., None]
    groups = jnp.arange(k // p.chunk) * p.chunk // p.group_size
    y = y + jnp.einsum("mcn,cn->mn", per_chunk, a["col_scale"][groups, 0].astype(jnp.float32))
  return y[:, :layout.n_out]


@functools.partial(jax.jit, static_argnames=("layout", "vector", "reduce", "interpret", "dtype", "num_warps",
                                             "num_stages", "activations", "gather_in_kernel"))
def layer_matmul(x: jax.Array, arrays: Sequence[Mapping[str, jax.Array]], layout: Layout, *,
                 vector: bool | None = None, reduce: str = "sum", interpret: bool = False, dtype=jnp.bfloat16,
                 num_warps: int | None = None, num_stages: int | None = None,
                 activations: str = "bf16", gather_in_kernel: bool | None = None) -> jax.Array:
  """`x [M, K] @ Ŵ` as float32 `[M, N]` for a layer laid out by `prepare`.

  Args:
    vector: multiply-add on the CUDA cores (default for M <= 4) instead of a dot on
      16-row-padded tiles.
    reduce: how the K splits' partials meet: "sum" (an XLA sum) or "atomic".
    dtype: x's dtype inside the kernel (bf16 on GPU; float32 keeps interpret mode exact).
    activations: "bf16" (x as `dtype`), or "int8": the bit-serial popcount kernel (M <= 4,
      one row-scale set per plane), equal to `int8_reference` up to float rounding.
    gather_in_kernel: a gathered plane's x columns picked by the kernel (one launch per
      layer; the default of the multiply-add variants) or by an XLA gather before it
      (the dot variant's only way). Which is faster on a GPU is open (RESULTS.md).
  """
  if reduce not in REDUCE:
    raise ValueError(f"reduce={reduce!r} not in {REDUCE}")
  if activations not in ACTIVATIONS:
    raise ValueError(f"activations={activations!r} not in {ACTIVATIONS}")
  if activations == "int8":
    return _layer_matmul_int8(x, arrays, layout, reduce=reduce, interpret=interpret, num_warps=num_warps,
                              num_stages=num_stages, gather_in_kernel=gather_in_kernel is not False)
  m = x.shape[0]
  vector = m <= VECTOR_MAX_ROWS if vector is None else vector
  if vector and m > VECTOR_MAX_ROWS:
    raise ValueError(f"vector=True is for M <= {VECTOR_MAX_ROWS} rows, got {m}")
  if gather_in_kernel and not vector:
    raise ValueError("gather_in_kernel is for the multiply-add variants (vector=True)")
  gather_in_kernel = vector if gather_in_kernel is None else gather_in_kernel
  rows = m if vector else max(MIN_ROWS, pl.next_power_of_2(m))
  operands, in_specs = _operands(x.astype(dtype), arrays, layout, rows, gather_in_kernel=gather_in_kernel)
  kernel = functools.partial(_kernel, layout=layout, rows=rows, vector=vector, reduce=reduce, dtype=dtype,
                             gather_in_kernel=gather_in_kernel)
  return _launch(kernel, operands, in_specs, layout, rows, m, reduce=reduce, interpret=interpret,
                 num_warps=num_warps, num_stages=num_stages)


def _layer_matmul_int8(x, arrays, layout, *, reduce, interpret, num_warps, num_stages, gather_in_kernel):
  m = x.shape[0]
  if m > VECTOR_MAX_ROWS:
    raise ValueError(f"int8 activations are for decode, M <= {VECTOR_MAX_ROWS} rows, got {m}; "
                     f"use int8_reference for more rows")
  if any(p.n_lhs != 1 for p in layout.planes):
    raise ValueError("int8 activations need planes with one row-scale set (planes_for(one_lhs=True))")
  operands, in_specs = _operands(x, arrays, layout, m, gather_in_kernel=gather_in_kernel)
  kernel = functools.partial(_kernel_int8, layout=layout, rows=m, reduce=reduce, gather_in_kernel=gather_in_kernel)
  return _launch(kernel, operands, in_specs, layout, m, m, reduce=reduce, interpret=interpret,
                 num_warps=num_warps, num_stages=num_stages)


def _plane_x(x: jax.Array, a: Mapping[str, jax.Array], p: PlaneLayout) -> jax.Array:
  """The x columns plane p reads (gathered for a gathered plane), checked against its rows."""
  xp = jnp.take(x, a["rows"], axis=1) if p.gathered else x
  if xp.shape[1] != a["bits"].shape[0] * WORD_BITS:
    raise ValueError(f"x has {xp.shape[1]} inputs for a plane of {a['bits'].shape[0] * WORD_BITS} rows")
  return xp


def _operands(x, arrays, layout, rows, gather_in_kernel):
  """Per plane: x, row scales `[L, K/32, 32]` if any, bits, column scales, with their
  (column tile, K split) blocks. x is `[rows, K/32, 32]` (zero rows padded; a free
  reshape), gathered by XLA for a gathered plane, or, with `gather_in_kernel` (the
  multiply-add variants), x whole plus the plane's row indices, gathered by the kernel."""
  if len(arrays) != len(layout.planes):
    raise ValueError(f"{len(arrays)} planes of arrays for a layout of {len(layout.planes)}")
  bn = layout.block_n
  operands, in_specs = [], []
  for p, a in zip(layout.planes, arrays):
    words = p.chunks_per_split * p.chunk // WORD_BITS
    if x.shape[1] < p.x_width or (not p.gathered and x.shape[1] != p.x_width):
      raise ValueError(f"x has {x.shape[1]} inputs; the layer's planes read {p.x_width}")
    if p.gathered and gather_in_kernel:
      operands += [jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))), a["rows"]]
      in_specs += [pl.BlockSpec((rows, x.shape[1]), lambda j, s: (0, 0)),
                   pl.BlockSpec((words * WORD_BITS,), lambda j, s: (s,))]
    else:
      xp = jnp.pad(_plane_x(x, a, p), ((0, rows - x.shape[0]), (0, 0)))
      operands.append(xp.reshape(rows, -1, WORD_BITS))
      in_specs.append(pl.BlockSpec((rows, words, WORD_BITS), lambda j, s: (0, s, 0)))
    if p.scaled:
      operands.append(a["lhs_scale"].reshape(p.n_lhs, -1, WORD_BITS))
      in_specs.append(pl.BlockSpec((p.n_lhs, words, WORD_BITS), lambda j, s: (0, s, 0)))
    operands += [a["bits"], a["col_scale"]]
    in_specs += [pl.BlockSpec((words, bn), lambda j, s: (s, j)),
                 pl.BlockSpec((a["col_scale"].shape[0], p.n_lhs, bn), lambda j, s: (0, 0, j))]
  return operands, in_specs


def _plane_refs(ins, layout, gather_in_kernel):
  """(plane layout, x tile reader, row-scale ref or None, bits_ref, col_ref) per plane, in
  `_operands` order; `read(r, i)` is row r's chunk i of the plane's x as float32 `[W, 32]`."""
  it = iter(ins)
  for p in layout.planes:
    x_ref = next(it)
    w = p.chunk // WORD_BITS
    if p.gathered and gather_in_kernel:
      rows_ref = next(it)

      def read(r, i, x_ref=x_ref, rows_ref=rows_ref, p=p, w=w):
        idx = rows_ref[pl.ds(pl.multiple_of(i * p.chunk, p.chunk), p.chunk)]
        return x_ref[r, idx].astype(jnp.float32).reshape(w, WORD_BITS)
    else:
      def read(r, i, x_ref=x_ref, w=w):
        return x_ref[r, pl.ds(pl.multiple_of(i * w, w), w), :].astype(jnp.float32)
    lhs_ref = next(it) if p.scaled else None
    yield p, read, x_ref, lhs_ref, next(it), next(it)


def _launch(kernel, operands, in_specs, layout, rows, m, *, reduce, interpret, num_warps, num_stages):
  """One pallas_call over (column tiles, K splits); partials summed or added atomically."""
  bn, splits = layout.block_n, layout.k_splits
  n_padded = operands[-2].shape[1]  # the last plane's bits
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  grid = (n_padded // bn, splits)
  if reduce == "sum":
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, rows, n_padded), jnp.float32),
                         grid=grid, in_specs=in_specs,
                         out_specs=pl.BlockSpec((1, rows, bn), lambda j, s: (s, 0, j)),
                         interpret=interpret, compiler_params=params, name="packed_layer_matmul")(*operands)
    return out.sum(0)[:m, :layout.n_out]
  zeros = jnp.zeros((rows, n_padded), jnp.float32)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n_padded), jnp.float32),
                       grid=grid, in_specs=in_specs + [pl.BlockSpec((rows, bn), lambda j, s: (0, j))],
                       out_specs=pl.BlockSpec((rows, bn), lambda j, s: (0, j)),
                       input_output_aliases={len(operands): 0},
                       interpret=interpret, compiler_params=params, name="packed_layer_matmul")(*operands, zeros)
  return out[:m, :layout.n_out]
