"""Bit packing and the sparse layout of binarized parts (host-side numpy; unpacking also in JAX).

Dense bit planes are packed along the INPUT dimension (axis 0): bit `i` of word `w` of
column `k` is row `32·w + i` of column `k` (little-endian bit order), so
`pack_bits(b: bool[in, out]) -> uint32[ceil(in/32), out]`; rows past `in` are zero
padding. A 1-D bool array `[n]` packs to `[ceil(n/32)]` the same way.

`packed_parts` / `unpacked_parts` pack every bool array of a provider's `parts` and leave
the others (bf16 scales, int8 values) as they are. Parts never hold uint32 arrays, so a
uint32 entry of a packed dict always means packed bits.

A method's typed parts (`quant.providers.base.Parts`) keep some parts dense although only
a subset of their entries is meaningful (`bits_core` counts only that subset); the layout
class says which (`Parts.storage`: a selector and the fill elsewhere, e.g. the residual
plane only on the salient rows). `compact_parts` stores such a part as the 1-D vector of
its meaningful entries, `expand_parts` puts them back with the fill, so the round trip is
exact part for part. Bool parts the layout names in `Parts.POSITIONS` (PB-LLM's
`salient_mask`: 0.5% salient weights cost 0.08 bits/weight as 16-bit positions against 1
bit as a plane) are stored as their sorted flat positions when that is smaller than the
plane (uint16 when the layer has <= 2**16 weights, else int32: uint32 means packed bits).

A compacted vector lists the selected entries column by column, inputs ascending within
a column (`x.T[m.T]`), i.e. still in input order. Packed, it costs at most 31 padding
bits, so the bytes written track `bits_core.stored_bits` closely; the differences left
are the padding of dense planes when `in` is not a multiple of 32, the padding of each
compacted vector (< 32 bits), and the salient-row flags, stored as a bitmap of `in` bits
where `bits_core` counts the cheaper of a bitmap and an index list per block.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def packed_rows(n_in: int) -> int:
  """Words per column of a packed plane of `n_in` rows: `ceil(n_in / 32)`."""
  return math.ceil(n_in / WORD_BITS)


def pack_bits(b: Any) -> np.ndarray:
  """bool `[in, ...]` -> uint32 `[ceil(in/32), ...]`, bit i of word w = row 32·w + i."""
  b = np.asarray(b)
  if b.dtype != np.bool_:
    raise TypeError(f"pack_bits takes a bool array, got {b.dtype}")
  if b.ndim == 0:
    raise ValueError("pack_bits needs at least one dimension (the input dimension)")
  n_words = packed_rows(b.shape[0])
  by = np.packbits(b, axis=0, bitorder="little")  # [ceil(in/8), ...] uint8
  by = np.pad(by, ((0, 4 * n_words - by.shape[0]),) + ((0, 0),) * (b.ndim - 1))
  by = by.reshape((n_words, 4) + b.shape[1:]).astype(np.uint32)
  return by[:, 0] | (by[:, 1] << 8) | (by[:, 2] << 16) | (by[:, 3] << 24)


def unpack_bits(words: Any, n_in: int) -> Any:
  """uint32 `[ceil(n_in/32), ...]` -> bool `[n_in, ...]` (inverse of `pack_bits`).

  numpy in, numpy out; a `jax.Array` (or tracer) is unpacked with jnp, so this also runs
  inside jit (`n_in` static).
  """
  xp = jnp if isinstance(words, jax.Array) else np
  words = xp.asarray(words)
  if words.dtype != xp.uint32:
    raise TypeError(f"unpack_bits takes uint32 words, got {words.dtype}")
  if words.ndim == 0 or words.shape[0] != packed_rows(n_in):
    raise ValueError(f"{n_in} rows pack into {packed_rows(n_in)} words per column, got words of "
                     f"shape {tuple(words.shape)}")
  shift = xp.arange(WORD_BITS, dtype=xp.uint32).reshape((1, WORD_BITS) + (1,) * (words.ndim - 1))
  bits = (words[:, None] >> shift) & xp.uint32(1)
  return bits.reshape((words.shape[0] * WORD_BITS,) + tuple(words.shape[1:]))[:n_in].astype(bool)


def packed_parts(parts: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Packs every bool array (`pack_bits`, along axis 0); the others pass through as numpy."""
  out = {}
  for k, v in parts.items():
    v = np.asarray(v)
    if v.dtype == np.uint32:
      raise TypeError(f"part {k!r} is uint32, which the packed format reserves for packed bits")
    out[k] = pack_bits(v) if v.dtype == np.bool_ else v
  return out


def unpacked_parts(packed: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Inverse of `packed_parts`: `shapes[k]` is part k's shape before packing.

  Raises ValueError when `packed` and `shapes` name different parts or a stored array's
  shape does not fit its declared shape.
  """
  if set(packed) != set(shapes):
    raise ValueError(f"packed parts {sorted(packed)} differ from the declared parts {sorted(shapes)}")
  out = {}
  for k, v in packed.items():
    v = np.asarray(v)
    shape = tuple(shapes[k])
    if v.dtype == np.uint32:
      want = (packed_rows(shape[0]),) + shape[1:] if shape else None
      if want != v.shape:
        raise ValueError(f"part {k!r}: packed bits of shape {v.shape} cannot hold a bool array of shape "
                         f"{shape} (expected words of shape {want})")
      out[k] = unpack_bits(v, shape[0])
    else:
      if v.shape != shape:
        raise ValueError(f"part {k!r}: stored shape {v.shape} differs from the declared shape {shape}")
      out[k] = v
  return out


# --- sparse layout (the layout class says which parts and entries) -------------------------------

def position_dtype(n: int) -> np.dtype:
  return np.dtype(np.uint16) if n <= 2**16 else np.dtype(np.int32)


def as_positions(parts: Any) -> list[str]:
  """Names of the bool parts `compact_parts` stores as position lists (cheaper than bitmaps)."""
  out = []
  arrays = parts.arrays()
  for k in type(parts).POSITIONS:
    if k in arrays and np.asarray(arrays[k]).dtype == np.bool_:
      m = np.asarray(arrays[k])
      if int(m.sum()) * 8 * position_dtype(m.size).itemsize < packed_rows(m.shape[0]) * WORD_BITS * (m.size // m.shape[0]):
        out.append(k)
  return out


def sparse_parts(parts: Any) -> list[str]:
  """Names of the parts `compact_parts` stores as vectors of their meaningful entries."""
  return list(type(parts).storage(parts.arrays()))


def _gather(x: np.ndarray, m: np.ndarray) -> np.ndarray:
  return x.T[m.T]


def compact_parts(parts: Any) -> dict[str, np.ndarray]:
  """The arrays of typed `parts` with every sparse part (`Parts.storage`) replaced by the 1-D
  vector of its meaningful entries and position parts by their positions; the others as
  numpy, unchanged.

  Raises ValueError if a sparse part holds something other than its fill value off its
  selection (the layout could not rebuild it exactly).
  """
  arrays = {k: np.asarray(v) for k, v in parts.arrays().items()}
  out = dict(arrays)
  for k, (select, fill) in type(parts).storage(arrays).items():
    x = out[k]
    m = select(arrays, x.shape)
    off = x[~m]
    if off.size and not np.all(off == np.asarray(fill, x.dtype)):
      raise ValueError(f"part {k!r} holds values other than {fill!r} outside the entries the sparse "
                       f"layout keeps; this layout cannot store it exactly")
    out[k] = _gather(x, m)
  for k in as_positions(parts):
    out[k] = np.flatnonzero(out[k]).astype(position_dtype(out[k].size))
  return out


def expand_parts(compact: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], layout: type
                 ) -> dict[str, np.ndarray]:
  """Inverse of `compact_parts` for a `layout` class: `shapes[k]` is part k's full shape.

  Raises ValueError when a compacted vector's length differs from the number of entries
  its selector (decoded from the other parts) marks.
  """
  out = {k: np.asarray(v) for k, v in compact.items()}
  for k in layout.POSITIONS:  # position lists first: the sparse selectors read these masks
    if k in out and out[k].dtype != np.bool_:
      shape = tuple(shapes[k])
      pos = out[k].astype(np.int64)
      if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= math.prod(shape) or np.any(np.diff(pos) <= 0))):
        raise ValueError(f"part {k!r}: stored positions are not a sorted list of distinct indices into {shape}")
      mask = np.zeros(math.prod(shape), bool)
      mask[pos] = True
      out[k] = mask.reshape(shape)
  rules = layout.storage(out)
  for k, (select, fill) in rules.items():
    shape = tuple(shapes[k])
    m = select(out, shape)
    v = out[k]
    if v.shape != (int(m.sum()),):
      raise ValueError(f"part {k!r}: {v.shape} stored entries but its selection marks "
                       f"{int(m.sum())} of shape {shape}")
    full = np.full(shape[::-1], fill, v.dtype)
    full[m.T] = v
    out[k] = np.ascontiguousarray(full.T)
  return out


def encode_parts(parts: Any) -> dict[str, np.ndarray]:
  """What the exporter writes for typed `parts`: `packed_parts(compact_parts(parts))`."""
  return packed_parts(compact_parts(parts))


def decode_parts(stored: Mapping[str, Any], compact_shapes: Mapping[str, tuple[int, ...]],
                 shapes: Mapping[str, tuple[int, ...]], layout: type) -> dict[str, np.ndarray]:
  """Inverse of `encode_parts` given each part's compacted and full shapes: the arrays of
  a `layout` (`provider.from_arrays` makes them typed parts)."""
  return expand_parts(unpacked_parts(stored, compact_shapes), shapes, layout)
