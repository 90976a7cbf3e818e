"""The packed inference model: binarized Dense layers served from their packed export.

`PackedDense` replaces a binarized `Dense` and holds only what the export stores (sign
bits as uint32 words, bf16 scales, ...), never a float kernel. Two ways to apply it:

  * "dequant" (every method): unpack the bits in XLA and rebuild Ŵ with the provider's
    own dequantizer inside the jitted forward, then `x @ Ŵ` exactly as `Dense` does. The
    result is bitwise that of the in-memory binarized model, so VQA predictions agree
    exactly (tests check it on a whole test split).
  * "kernel" (XNOR and the structured SAB / ARB-RC layout, the ≤ 1.2-bit one): a sum of
    planes `x @ (α_r ⊙ B ⊙ α_c)` computed by `kernels.packed_matmul` straight from the
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

`from_export` builds the model from an export directory (`export.checkpoint.read`).
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

from sab_jax.export import packing
from sab_jax.kernels import packed_layer, packed_matmul

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


def kernel_supports(provider: Any) -> bool:
  """Whether `planes_for` decomposes this provider's layers (XNOR, structured SAB/ARB-RC)."""
  name = getattr(provider, "name", None)
  return name == "xnor" or (name in ("sab", "arb_rc") and getattr(provider, "structured", False))


def planes_for(provider: Any, parts: Mapping[str, np.ndarray], n_in: int, *, one_lhs: bool = False
               ) -> list[tuple[PlaneSpec, dict[str, np.ndarray]]] | None:
  """The plane decomposition of a layer, or None when the kernel does not cover it.

  XNOR: Ŵ = B ⊙ α_out, one plane, one group. Structured SAB / ARB-RC, per scale group g
  of `scale_block` inputs (α_in per input row, α_out[g] per output):
    rest rows:    α_in0 · B1 · α_out[g, 2]
    salient rows: α_in0 · B1 · α_out[g, 0] + α_in1 · B2 · α_out[g, 1]
  = plane B1 with two LHS (α_in0 on rest rows → α_out2, on salient rows → α_out0) plus
  plane B2 over the salient rows only (gathered, 41 of 512 by default) → α_out1.

  `one_lhs`: every plane with a single row-scale set, which unpacks each sign once per
  product instead of twice over the K rows: plane B1 (α_in0 on all rows) → α_out2, plane
  B1 over the salient rows (α_in0) → α_out0 - α_out2, plane B2 as above. 1.25·K rows
  instead of 2.125·K, for 11% more bits (the salient rows' B1 twice).
  """
  if not kernel_supports(provider):
    return None
  if provider.name == "xnor":
    a_out = np.asarray(parts["alpha_out"], np.float32)
    return [_plane(np.asarray(parts["signs"]), [np.arange(n_in)], [np.ones(n_in, np.float32)],
                   [a_out[None]], n_in)]
  from sab_jax.quant.providers import base
  _, group = base.effective_blocks(n_in, provider.block_size, provider.scale_block)
  sal = np.asarray(parts["salient_rows"], bool)
  a_in = np.asarray(parts["alpha_in"], np.float32)
  a_out = np.asarray(parts["alpha_out"], np.float32)  # [G, 3, out]
  starts = range(0, n_in, group)
  all_rows = [np.arange(s, min(s + group, n_in)) for s in starts]
  sal_rows = [r[sal[r]] for r in all_rows]
  signs, residual = np.asarray(parts["signs"]), np.asarray(parts["residual_signs"])
  p2 = _plane(residual, sal_rows, [a_in[:, 1]], [a_out[:, 1]], n_in)
  if one_lhs:
    return [_plane(signs, all_rows, [a_in[:, 0]], [a_out[:, 2]], n_in),
            _plane(signs, sal_rows, [a_in[:, 0]], [a_out[:, 0] - a_out[:, 2]], n_in), p2]
  p1 = _plane(signs, all_rows, [a_in[:, 0] * ~sal, a_in[:, 0] * sal], [a_out[:, 2], a_out[:, 0]], n_in)
  return [p1, p2]


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

  def __init__(self, provider: Any, parts: Mapping[str, np.ndarray], n_in: int, n_out: int, *,
               bias: np.ndarray | None, dtype: Any, mode: str = "auto", kernel_dtype: Any = None,
               interpret: bool | None = None, kernel: str = "per_plane", activations: str = "bf16"):
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not in {MODES}")
    if kernel not in KERNELS:
      raise ValueError(f"kernel {kernel!r} not in {KERNELS}")
    if activations not in packed_layer.ACTIVATIONS or (activations == "int8" and kernel != "fused"):
      raise ValueError(f"activations {activations!r}: 'bf16', or 'int8' with kernel='fused'")
    self.provider, self.in_features, self.out_features, self.dtype = provider, n_in, n_out, dtype
    on_gpu = jax.default_backend() == "gpu"
    planes = planes_for(provider, parts, n_in, one_lhs=kernel == "fused") if mode != "dequant" else None
    if mode == "kernel" and planes is None:
      raise ValueError(f"the packed kernel does not cover {provider!r} (XNOR and structured SAB/ARB-RC "
                       f"only); use mode='dequant' or 'auto'")
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
      stored = packing.packed_parts(parts)
      self.part_shapes = {k: tuple(np.shape(v)) for k, v in parts.items()}
      self.parts = nnx.Dict({k: Packed(jnp.asarray(v)) for k, v in stored.items()})

  def weight(self) -> jax.Array:
    """Ŵ `[in, out]` rebuilt from the packed parts (dequant mode)."""
    parts = {}
    for k, v in self.parts.items():
      v = v[...]
      parts[k] = packing.unpack_bits(v, self.part_shapes[k][0]) if v.dtype == jnp.uint32 else v
    return self.provider.dequantize(parts, self.in_features)

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


def _parent(model: nnx.Module, path: str) -> tuple[Any, str]:
  *head, last = path.split(".")
  node = model
  for k in head:
    node = node[int(k)] if isinstance(node, (nnx.List, list)) else getattr(node, k)
  return node, last


def get_layer(model: nnx.Module, path: str) -> nnx.Module:
  parent, last = _parent(model, path)
  return parent[int(last)] if isinstance(parent, (nnx.List, list)) else getattr(parent, last)


def replace_layer(model: nnx.Module, path: str, new: nnx.Module) -> None:
  parent, last = _parent(model, path)
  if isinstance(parent, (nnx.List, list)):
    parent[int(last)] = new
  else:
    setattr(parent, last, new)


def from_export(directory: str, model_template: nnx.Module, *, mode: str = "auto", kernel_dtype: Any = None,
                kernel: str = "per_plane", activations: str = "bf16") -> tuple[nnx.Module, dict[str, Any]]:
  """The packed inference model of an export; returns (model, manifest).

  `model_template` gives the structure and dtypes (build it from the manifest's
  model_config); its non-binarized params get the exported values, each binarized Dense
  becomes a `PackedDense` holding the exported parts.
  """
  from sab_jax.export import checkpoint
  manifest, layers, params = checkpoint.read(directory, model_template)
  provider = checkpoint.provider_from_spec(manifest["provider"])
  model = model_template
  state = {".".join(str(p) for p in path): v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  for p, a in params.items():
    var = state[p]
    var.set_value(jnp.asarray(a).astype(var.get_value().dtype))
  for path, parts in layers.items():
    dense = get_layer(model, path)
    n_in, n_out = dense.in_features, dense.out_features
    bias = None if dense.bias is None else np.asarray(dense.bias[...])
    replace_layer(model, path, PackedDense(provider, parts, n_in, n_out, bias=bias, dtype=dense.dtype,
                                           mode=mode, kernel_dtype=kernel_dtype, kernel=kernel,
                                           activations=activations))
  return model, manifest


def packed_bytes(model: nnx.Module) -> int:
  """Bytes the model holds on device (packed storage + remaining params)."""
  leaves = jax.tree.leaves(nnx.state(model, (nnx.Param, Packed)))
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves))
