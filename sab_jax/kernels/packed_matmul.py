"""`x @ (α_r ⊙ B ⊙ α_c)` straight from packed sign bits: a Pallas kernel for decode shapes.

At decode (1–16 tokens) a linear layer is memory-bound: a bf16 `[4096, 11008]` kernel
is 90 MB, its sign bits 5.6 MB. Unpacking the bits in XLA first writes and re-reads a
dense matrix and loses most of that; this kernel reads each 32-bit word once and expands
it to ±1 in registers.

A binarized layer is a short sum of *planes* (`sab_jax.serve.packed.planes_for`):

  y[m, n] = Σ_planes Σ_l Σ_g col[g, l, n] · Σ_{k ∈ group g} x[m, k] · lhs[l, k] · B[k, n]

with B = ±1 sign bits (1 = +1) packed 32 to a uint32 word along the input axis, `L`
per-input scale sets α_r sharing those bits, and output scales α_c that change every
`group_size` inputs (the structured SAB layout shares α_c over 512 inputs). XNOR is one
plane; structured SAB two (signs with two scale sets, and the residual signs of the
gathered salient rows).

`plane_matmul` computes one plane; grid = (output tiles of `block_n` columns) × (K
splits). Each program walks its chunks of `chunk` inputs (`chunk/32` words per column),
unpacks a `[chunk, block_n]` ±1 tile and accumulates with the chunk's group scales, by a
multiply-add on the CUDA cores (`vector`, M ≤ 4) or a dot (M padded to 16, Triton's
smallest); K splits write partial sums that one XLA add reduces. The splits matter: a
one-launch-per-layer variant without them (every plane in one program loop, no partial
sums) measured 2–3× slower on the H200 for lack of programs in flight, although it
saved the ~5 µs each extra XLA op costs inside a decode loop (RESULTS.md).

`interpret=True` runs the same kernel on CPU (Pallas interpret mode); tests check it
against the dequantized kernel. `plane_matmul_reference` is the unpack-in-XLA baseline.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

WORD_BITS = 32
MIN_ROWS = 16  # Triton's smallest dot operand


# Up to this many rows the multiply-add variant (`vector=True`) serves a call: faster than
# a 16-row-padded dot at M = 1 on an H200 (RESULTS.md).
VECTOR_MAX_ROWS = 4
# Split K until a layer has about this many programs (a few per SM); the best tilings of
# the H200 sweep used 8 splits on both 7B shapes.
MAX_K_SPLITS = 8


def tiling(n_out: int, n_chunks: int) -> tuple[int, int]:
  """(block_n, k_splits) for an output width and a number of K chunks: the H200 sweep's
  best for the 7B decode shapes (64 columns for 11008 outputs, 128 for 4096)."""
  block_n = 64 if n_out > 8192 or n_out < 128 else 128
  return block_n, max(1, min(n_chunks, MAX_K_SPLITS))


def _unpack_pm1(words: jax.Array, n_rows: int, dtype) -> jax.Array:
  """uint32 `[n_rows/32, N]` -> ±1 `[n_rows, N]` in the order (bit, word): row i·W + w
  holds bit i of word w, i.e. input 32·w + i. The caller permutes x to match, which
  keeps the unpack a broadcast + reshape of leading axes (cheap in Triton)."""
  n_words = n_rows // WORD_BITS
  shifts = jax.lax.broadcasted_iota(jnp.int32, (WORD_BITS, 1, 1), 0).astype(jnp.uint32)
  bits = (words[None, :, :] >> shifts) & jnp.uint32(1)
  pm1 = jnp.where(bits != 0, 1.0, -1.0).astype(dtype)
  return pm1.reshape(WORD_BITS * n_words, words.shape[-1])


def _kernel(x_ref, b_ref, c_ref, o_ref, *, n_lhs, chunks_per_program, chunks_per_group, chunk):
  """One (column tile, K split): x_ref [CP, L, M, chunk], b_ref [CP, chunk/32, BN],
  c_ref [G, L, BN] (all groups), o_ref [1, M, BN]."""
  split = pl.program_id(1)
  m, bn = o_ref.shape[1], o_ref.shape[2]

  def body(i, acc):
    s = _unpack_pm1(b_ref[i], chunk, x_ref.dtype)
    g = (split * chunks_per_program + i) // chunks_per_group
    for l in range(n_lhs):
      y = jnp.dot(x_ref[i, l], s, preferred_element_type=jnp.float32)
      acc = acc + y * c_ref[g, l][None, :].astype(jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, chunks_per_program, body, jnp.zeros((m, bn), jnp.float32))
  o_ref[0] = acc


def _kernel_vector(x_ref, b_ref, c_ref, o_ref, *, n_lhs, chunks_per_program, chunks_per_group, chunk):
  """Few rows (M ≤ 4): multiply-add on the CUDA cores, no 16-row padding for a dot."""
  split = pl.program_id(1)
  m, bn = o_ref.shape[1], o_ref.shape[2]

  def body(i, accs):
    s = _unpack_pm1(b_ref[i], chunk, jnp.float32)
    g = (split * chunks_per_program + i) // chunks_per_group
    accs = list(accs)
    for l in range(n_lhs):
      c = c_ref[g, l].astype(jnp.float32)
      for r in range(m):
        xr = x_ref[i, l, r].astype(jnp.float32)
        accs[r] = accs[r] + jnp.sum(xr[:, None] * s, axis=0) * c
    return tuple(accs)

  accs = jax.lax.fori_loop(0, chunks_per_program, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m)))
  for r in range(m):
    o_ref[0, r] = accs[r]


def _permute_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[L, M, K] -> [K/chunk, L, M, chunk] with each chunk's inputs in (bit, word) order."""
  n_lhs, m, k = x.shape
  w = chunk // WORD_BITS
  x = x.reshape(n_lhs, m, k // chunk, w, WORD_BITS)      # input = chunk·c + 32·w + i
  return x.transpose(2, 0, 1, 4, 3).reshape(k // chunk, n_lhs, m, chunk)


@functools.partial(jax.jit, static_argnames=("group_size", "chunk", "block_n", "k_splits", "interpret", "vector",
                                             "num_warps", "num_stages"))
def plane_matmul(x: jax.Array, bits: jax.Array, col_scale: jax.Array, *, group_size: int,
                 chunk: int = 128, block_n: int = 128, k_splits: int = 1, interpret: bool = False,
                 vector: bool = False, num_warps: int | None = None, num_stages: int | None = None
                 ) -> jax.Array:
  """Σ_l Σ_g col_scale[g, l] ⊙ (x[l, :, g] @ B_g) for packed ±1 bits B.

  Args:
    x: `[L, M, K]` left-hand sides, their row scales α_r applied (bf16 on GPU; f32 keeps
      interpret mode exact).
    bits: uint32 `[K/32, N]`, `pack_bits` layout.
    col_scale: `[K/group_size, L, N]`.
    group_size: inputs sharing one col_scale row; a multiple of `chunk`.
    chunk: inputs unpacked per step (multiple of 32).
    block_n: output columns per program.
    k_splits: programs along K per column tile (partial sums added in XLA).
    interpret: run in Pallas interpret mode (CPU).
    vector: multiply-add instead of a dot (M ≤ 4; no padding to 16 rows).
    num_warps, num_stages: Triton launch parameters (None: Pallas' defaults).

  Returns:
    `[M, N]` float32.
  """
  n_lhs, m, k = x.shape
  n = bits.shape[1]
  if chunk % WORD_BITS or group_size % chunk:
    raise ValueError(f"chunk ({chunk}) must be a multiple of 32 and divide group_size ({group_size})")
  if k % group_size or bits.shape[0] * WORD_BITS != k:
    raise ValueError(f"K={k} must be a multiple of group_size={group_size} and match bits {bits.shape}")
  if col_scale.shape != (k // group_size, n_lhs, n):
    raise ValueError(f"col_scale {col_scale.shape} != {(k // group_size, n_lhs, n)}")
  if vector and m > 4:
    raise ValueError(f"vector=True is for M <= 4 rows, got {m}")
  n_chunks = k // chunk
  per_program = math.ceil(n_chunks / k_splits)
  pad_chunks = per_program * k_splits - n_chunks
  m_pad = 0 if vector else max(MIN_ROWS, pl.next_power_of_2(m)) - m
  n_pad = -n % block_n

  xc = _permute_chunks(x, chunk)
  xc = jnp.pad(xc, ((0, pad_chunks), (0, 0), (0, m_pad), (0, 0)))
  words = chunk // WORD_BITS
  b = bits.reshape(n_chunks, words, n)
  b = jnp.pad(b, ((0, pad_chunks), (0, 0), (0, n_pad)))
  c = jnp.pad(col_scale, ((0, 0), (0, 0), (0, n_pad)))
  # padded chunks have x = 0 (their group index may run past G: give them rows)
  n_groups = c.shape[0]
  extra_groups = -(-(per_program * k_splits * chunk) // group_size) - n_groups
  c = jnp.pad(c, ((0, max(0, extra_groups)), (0, 0), (0, 0)))
  mp, np_ = m + m_pad, n + n_pad

  kernel = functools.partial(_kernel_vector if vector else _kernel, n_lhs=n_lhs, chunks_per_program=per_program,
                             chunks_per_group=group_size // chunk, chunk=chunk)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((k_splits, mp, np_), jnp.float32),
      grid=(np_ // block_n, k_splits),
      in_specs=[
          pl.BlockSpec((per_program, n_lhs, mp, chunk), lambda j, s: (s, 0, 0, 0)),
          pl.BlockSpec((per_program, words, block_n), lambda j, s: (s, 0, j)),
          pl.BlockSpec((c.shape[0], n_lhs, block_n), lambda j, s: (0, 0, j)),
      ],
      out_specs=pl.BlockSpec((1, mp, block_n), lambda j, s: (s, 0, j)),
      interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="packed_plane_matmul",
  )(xc, b, c)
  return out.sum(0)[:m, :n]


@functools.partial(jax.jit, static_argnames=("group_size",))
def plane_matmul_reference(x: jax.Array, bits: jax.Array, col_scale: jax.Array, *,
                           group_size: int) -> jax.Array:
  """The same plane by unpacking in XLA (float32): the oracle for the kernel, and the
  'unpack-in-XLA' baseline of the speed benchmark."""
  n_lhs, m, k = x.shape
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  s = ((bits[:, None, :] >> shifts[None, :, None]) & 1).reshape(k, -1)
  s = jnp.where(s != 0, 1.0, -1.0).astype(x.dtype)
  g = k // group_size
  y = jnp.einsum("lmgk,gkn->glmn", x.reshape(n_lhs, m, g, group_size),
                 s.reshape(g, group_size, -1), preferred_element_type=jnp.float32)
  return jnp.einsum("glmn,gln->mn", y, col_scale.astype(jnp.float32))
