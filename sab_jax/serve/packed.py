"""The packed inference model: binarized Dense layers served from their packed export.

`PackedDense` replaces a binarized `Dense` and holds only what the export stores (sign
bits as uint32 words, bf16 scales, ...), never a float kernel. Two ways to apply it:

  * "dequant" (every method): unpack the bits in XLA and rebuild Ŵ with the layout's
    own dequantizer (`Parts.dequantize`) inside the jitted forward, then `x @ Ŵ` exactly as `Dense` does. The
    result is bitwise that of the in-memory binarized model, so VQA predictions agree
    exactly (tests check it on a whole test split).
  * "kernel" (the layouts whose `Parts.planes` decomposes them: XNOR and the structured
    SAB / ARB-RC layout, the ≤ 1.2-bit one): a sum of planes `x @ (α_r ⊙ B ⊙ α_c)` computed by `kernels.packed_matmul` straight from the
    bits. Compute in `kernel_dtype` (bf16 on GPU), so results match the in-memory model
    to rounding, not bitwise.
  "auto" takes the kernel on GPU when the layout supports it, dequant otherwise.

Two kernels serve "kernel" mode: "per_plane" (`kernels.packed_matmul`: one launch per
plane, scaling, permutation and reduction in XLA; measured on an H200, RESULTS.md) and
"fused" (`kernels.packed_layer`: the whole layer in one launch, its layout prepared at
load time). "per_plane" stays the default until "fused" has been timed on a GPU.
`activations="int8"` (fused only) quantizes what each plane multiplies to int8 per chunk
and serves decode steps (M <= 4) with the bit-serial popcount kernel, larger M with its
XLA twin (`packed_layer.int8_reference`): an approximation, measured in RESULTS.md.

`from_export` builds the model from an export directory (`export.reader.read`).
The packed model is single-device: it is for evaluation and decode, not training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sab_jax.export import packing, reader
from sab_jax.kernels import packed_layer, packed_matmul
from sab_jax.models import paths
from sab_jax.quant.providers import base

MODES = ("auto", "dequant", "kernel")
KERNELS = ("per_plane", "fused")


class Packed(nnx.Variable):
  """Non-trainable storage of an exported layer (bits, scales, row indices)."""


@dataclasses.dataclass(frozen=True)
class PlaneSpec:
  """Static description of one plane (see `kernels.packed_matmul`)."""
  n_lhs: int
  group_size: int
  chunk: int
  gathered: bool  # True: the plane reads x[:, rows]; False: all inputs in order


def _chunk_for(group_rows: int) -> int:
  return next(c for c in (128, 64, 32) if group_rows % c == 0)


def _plane(signs: np.ndarray, group_rows: list[np.ndarray], lhs: list[np.ndarray],
           col: list[np.ndarray], n_in: int) -> tuple[PlaneSpec, dict[str, np.ndarray]]:
  """One plane from per-group row lists.

  Args:
    signs: bool `[in, out]` sign plane.
    group_rows: per output-scale group, the input rows this plane reads.
    lhs: per LHS, float `[in]` per-input scale (α_r), read at those rows.
    col: per LHS, `[G, out]` output scales.
  Each group is padded to the same multiple of 32 rows with a zero scale.
  """
  width = max(32, -(-max(len(r) for r in group_rows) // 32) * 32)
  rows = np.zeros((len(group_rows), width), np.int32)
  valid = np.zeros((len(group_rows), width), bool)
  for g, r in enumerate(group_rows):
    rows[g, :len(r)], valid[g, :len(r)] = r, True
  rows, valid = rows.reshape(-1), valid.reshape(-1)
  gathered = not (valid.all() and np.array_equal(rows, np.arange(n_in)))
  bits = packing.pack_bits(np.where(valid[:, None], signs[rows], False))
  scales = np.stack([np.where(valid, s[rows], 0.0) for s in lhs]).astype(np.float32)
  spec = PlaneSpec(n_lhs=len(lhs), group_size=width, chunk=_chunk_for(width), gathered=gathered)
  arrays = {"bits": bits, "lhs_scale": scales, "col_scale": np.stack(col, axis=1)}
  if gathered:
    arrays["rows"] = rows
  return spec, arrays


def planes_for(parts: base.Parts, *, one_lhs: bool = False) -> list[tuple[PlaneSpec, dict[str, np.ndarray]]] | None:
  """The packed planes of a layer (`Parts.planes`, packed for the kernels), or None when
  the kernels do not cover its layout."""
  sources = parts.planes(one_lhs=one_lhs)
  if sources is None:
    return None
  n_in = parts.shape[0]
  return [_plane(p.signs, p.group_rows, p.lhs, p.col, n_in) for p in sources]


def apply_planes(x: jax.Array, specs: tuple[PlaneSpec, ...], planes: list[Mapping[str, jax.Array]],
                 n_out: int, *, kernel_dtype: Any, interpret: bool, vector: bool | None = None) -> jax.Array:
  """`x [M, in] @ Ŵ` as the sum of its planes (float32 `[M, out]`); `vector`: the kernel's
  multiply-add variant (default: for M ≤ `packed_matmul.VECTOR_MAX_ROWS`)."""
  if vector is None:
    vector = x.shape[0] <= packed_matmul.VECTOR_MAX_ROWS
  x = x.astype(jnp.float32)
  y = jnp.zeros((x.shape[0], n_out), jnp.float32)
  for spec, p in zip(specs, planes):
    xs = jnp.take(x, p["rows"], axis=1) if spec.gathered else x
    xl = (xs[None] * p["lhs_scale"][:, None, :]).astype(kernel_dtype)
    block_n, k_splits = packed_matmul.tiling(n_out, xl.shape[-1] // spec.chunk)
    y = y + packed_matmul.plane_matmul(xl, p["bits"], p["col_scale"], group_size=spec.group_size,
                                       chunk=spec.chunk, block_n=block_n, k_splits=k_splits,
                                       interpret=interpret, vector=vector)
  return y


class PackedDense(nnx.Module):
  """A binarized Dense layer held packed; same call signature as `layers.Dense`."""

  def __init__(self, parts: base.Parts, *, bias: np.ndarray | None, dtype: Any, mode: str = "auto", kernel_dtype: Any = None,
               interpret: bool | None = None, kernel: str = "per_plane", activations: str = "bf16"):
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not in {MODES}")
    if kernel not in KERNELS:
      raise ValueError(f"kernel {kernel!r} not in {KERNELS}")
    if activations not in packed_layer.ACTIVATIONS or (activations == "int8" and kernel != "fused"):
      raise ValueError(f"activations {activations!r}: 'bf16', or 'int8' with kernel='fused'")
    self.parts_class, self.parts_meta = type(parts), tuple(sorted(parts.meta().items()))
    (self.in_features, self.out_features), self.dtype = parts.shape, dtype
    n_out = self.out_features
    on_gpu = jax.default_backend() == "gpu"
    planes = planes_for(parts, one_lhs=kernel == "fused") if mode == "kernel" or (mode == "auto" and on_gpu) else None
    if mode == "kernel" and planes is None:
      raise ValueError(f"the packed kernels do not cover the {type(parts).__name__} layout {parts.meta()} "
                       f"(XNOR and structured SAB/ARB-RC only); use mode='dequant' or 'auto'")
    self.mode = "kernel" if planes is not None and (mode == "kernel" or on_gpu) else "dequant"
    self.interpret = (not on_gpu) if interpret is None else interpret
    self.kernel_dtype = kernel_dtype or (jnp.bfloat16 if on_gpu else jnp.float32)
    self.bias = Packed(jnp.asarray(bias)) if bias is not None else None
    self.kernel, self.activations = kernel, activations
    if activations == "int8" and self.mode != "kernel":
      raise ValueError(f"activations='int8' needs the kernel path (mode='kernel', or 'auto' on a GPU) and a layout "
                       f"it covers; this layer is served in {self.mode!r} mode")
    if self.mode == "kernel":
      self.specs = tuple(s for s, _ in planes)
      arrays = [a for _, a in planes]
      if kernel == "fused":
        self.layout, arrays = packed_layer.prepare(
            arrays, [s.group_size for s in self.specs], n_out,
            block_n=packed_layer.INT8_BLOCK_N if activations == "int8" else None)
      self.planes = nnx.List([nnx.Dict({k: Packed(jnp.asarray(v)) for k, v in a.items()}) for a in arrays])
    else:
      arrays = parts.arrays()
      stored = packing.packed_parts(arrays)
      self.part_shapes = tuple((k, tuple(np.shape(v))) for k, v in arrays.items())
      self.parts = nnx.Dict({k: Packed(jnp.asarray(v)) for k, v in stored.items()})

  def weight(self) -> jax.Array:
    """Ŵ `[in, out]` rebuilt from the packed parts (dequant mode)."""
    shapes = dict(self.part_shapes)
    arrays = {}
    for k, v in self.parts.items():
      v = v[...]
      arrays[k] = packing.unpack_bits(v, shapes[k][0]) if v.dtype == jnp.uint32 else v
    return base.dequantize(self.parts_class(**arrays, **dict(self.parts_meta)))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == "dequant":
      y = jnp.dot(x.astype(self.dtype), self.weight().astype(self.dtype))
    else:
      lead = x.shape[:-1]
      arrays = [{k: v[...] for k, v in p.items()} for p in self.planes]
      x2 = x.reshape(-1, x.shape[-1])
      if self.activations == "int8" and x2.shape[0] > packed_matmul.VECTOR_MAX_ROWS:
        y = packed_layer.int8_reference(x2, arrays, self.layout)
      elif self.kernel == "fused":
        y = packed_layer.layer_matmul(x2, arrays, self.layout, interpret=self.interpret, dtype=self.kernel_dtype,
                                      activations=self.activations)
      else:
        y = apply_planes(x2, self.specs, arrays, self.out_features,
                         kernel_dtype=self.kernel_dtype, interpret=self.interpret)
      y = y.astype(self.dtype).reshape(lead + (self.out_features,))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def from_export(directory: str, model_template: nnx.Module, *, mode: str = "auto", kernel_dtype: Any = None,
                kernel: str = "per_plane", activations: str = "bf16") -> tuple[nnx.Module, dict[str, Any]]:
  """The packed inference model of an export; returns (model, manifest).

  `model_template` gives the structure and dtypes (build it from the manifest's
  model_config); its non-binarized params get the exported values, each binarized Dense
  becomes a `PackedDense` holding the exported parts.
  """
  manifest, layers, params = reader.read(directory, model_template)
  model = model_template
  state = paths.params(model)
  for p, a in params.items():
    var = state[p]
    var.set_value(jnp.asarray(a).astype(var.get_value().dtype))
  for path, parts in layers.items():
    dense = paths.get(model, path)
    bias = None if dense.bias is None else np.asarray(dense.bias[...])
    paths.replace(model, path, PackedDense(parts, bias=bias, dtype=dense.dtype, mode=mode, kernel_dtype=kernel_dtype,
                                           kernel=kernel, activations=activations))
  return model, manifest


def packed_bytes(model: nnx.Module) -> int:
  """Bytes the model holds on device (packed storage + remaining params)."""
  leaves = jax.tree.leaves(nnx.state(model, (nnx.Param, Packed)))
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves))
