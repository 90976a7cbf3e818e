"""What every post-training binarization method takes and returns.

A provider is a frozen dataclass (its knobs are fields) called as
`provider(kernel, stats) -> Binarized` on one Dense kernel (Flax layout `[in, out]`)
with the calibration statistics of that layer's inputs.

Its parts are one typed structure per method, a `Parts` subclass (cf. Qwix's `QArray`):
a frozen dataclass whose array fields are what an exporter stores and whose static fields
say how to read them. Everything derived from the parts lives on that class, so no other
module branches on a method's name:
  * `dequantize()`: Ŵ `[in, out]`, bitwise what the provider returned;
  * `storage(arrays)`: which parts are stored as the vector of their meaningful entries
    (and the fill elsewhere), and `POSITIONS`, bool parts stored as position lists when
    cheaper (the exporter's `packing` applies both);
  * `planes(one_lhs)`: the sum-of-sign-planes decomposition the packed kernels serve, or
    None where the kernels do not cover the layout;
  * `qat_init()` / `qat_weight(...)` / `from_qat(...)`: the quantization-aware forward of
    `quant.binary_dense.BinaryDense`, initialised so that step 0 is the PTQ model.
A provider rebuilds its typed parts from stored arrays with `from_arrays(arrays)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.quant.core import bits_core, gptq_core


@dataclasses.dataclass(frozen=True)
class OutputSensitivity:
  """How much the model's loss feels one Dense layer's outputs, per modality (float32).

  From the full-precision model (`calib.sensitivity`): with ĝ_t = ∂L/∂y_t the gradient of
  the answer loss (labels sampled from the model itself: the true Fisher) at token t's output,
  each question's ĝ² scaled so that the question weighs 1 over all probed layers,
    grad_m[k] = Σ_{t ∈ m} ĝ_tk²,   diag_m[j] = 2/N_m Σ_{t ∈ m} x_tj²   (m = text, image).
  To second order (diagonal Fisher per output, K-FAC's independence of x and ĝ), an error Δ
  of the kernel costs ΔL ≈ ¼ Σ_m Σ_k grad_m[k] · Δ_kᵀ H_m Δ_k with H_m = 2/N_m Σ_{t∈m} x xᵀ,
  in the same units in every layer: this is what lets a significance map compare layers.
  A modality whose gradient vanishes at this layer (image tokens after the last layer that
  can reach an answer) has grad_m ≡ 0, and its tokens then cost nothing here, by measurement.
  """
  grad_text: jax.Array  # [out]
  grad_vis: jax.Array   # [out]
  diag_text: jax.Array  # [in]
  diag_vis: jax.Array   # [in]
  n_text: float = 0.0   # tokens of each modality the pass saw (per label draw)
  n_vis: float = 0.0

  def uniform(self) -> "OutputSensitivity":
    """The same inputs with every output felt alike on every token (ĝ ≡ 1): what is left of
    the map without the loss gradients (an ablation)."""
    ones = jnp.ones_like(self.grad_text)
    return dataclasses.replace(self, grad_text=self.n_text * ones, grad_vis=self.n_vis * ones)

  def loss_weight(self) -> jax.Array:
    """`[in, out]` `grad_t[k]·diag_t[j] + grad_v[k]·diag_v[j]`: a weight error's loss cost per
    unit² (the diagonal of the objective above), comparable across layers: the per-weight
    significance map."""
    return entry_weight(self.grad_text, self.grad_vis, self.diag_text, self.diag_vis)


def entry_weight(g_text, g_vis, d_text, d_vis) -> jax.Array:
  """`g_t[k]·d_t[j] + g_v[k]·d_v[j]` `[in, out]` (g `[out]`; or a scalar each: `[in, 1]`)."""
  return g_text * d_text[:, None] + g_vis * d_vis[:, None]


def uniform_sensitivity(stats: "LayerStats", n_out: int) -> OutputSensitivity:
  """No measurement: every output felt alike on every token (ĝ ≡ 1). SAB's loss-calibrated
  objective is then the count-weighted Hessian with Λ ≡ 1 (ARB-RC's), on SAB's code path:
  for timing it, or for a lone kernel that belongs to no model."""
  zeros = jnp.zeros((n_out,), jnp.float32)
  return OutputSensitivity(grad_text=zeros, grad_vis=zeros, diag_text=jnp.diag(stats.h_text),
                           diag_vis=jnp.diag(stats.h_vis), n_text=stats.n_text, n_vis=stats.n_vis).uniform()


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration statistics of one Dense layer's inputs (float32)."""
  h_text: jax.Array  # [in, in] = 2/N_t Σ_text x xᵀ (zeros if N_t == 0)
  h_vis: jax.Array   # [in, in] = 2/N_v Σ_image x xᵀ (zeros if N_v == 0)
  n_text: int
  n_vis: int
  # The loss's sensitivity to this layer's outputs, for providers that ask for it (`Provider.plan`).
  sensitivity: OutputSensitivity | None = None
  # What the provider's `plan` decided for this layer from the whole model (e.g. its salient-row budget).
  plan: Any = None

  @property
  def h(self) -> jax.Array:
    """Count-weighted `(N_t H_t + N_v H_v)/(N_t + N_v)` = 2/N Σ_all x xᵀ (zeros if N = 0)."""
    n = self.n_text + self.n_vis
    if n == 0:
      return jnp.zeros_like(self.h_text, dtype=jnp.float32)
    return (self.n_text * self.h_text.astype(jnp.float32)
            + self.n_vis * self.h_vis.astype(jnp.float32)) / n


# --- the typed parts -------------------------------------------------------------------------

# (selector(arrays, shape) -> bool mask of the part's shape, fill value off the mask)
SparseRule = tuple[Callable[[Mapping[str, Any], tuple[int, ...]], np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class PlaneSource:
  """One sign plane of a layer as the kernels read it: `Σ_g x[:, rows_g]·diag(lhs_i) @ B·diag(col_i[g])`.

  signs: bool `[in, out]`; group_rows: per output-scale group, the input rows this plane
  reads; lhs: per row-scale set, float `[in]` (read at those rows); col: per row-scale
  set, `[G, out]` output scales.
  """
  signs: np.ndarray
  group_rows: list[np.ndarray]
  lhs: list[np.ndarray]
  col: list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class QatState:
  """The variables of a `BinaryDense` built from parts: `latent` (trainable, its signs are
  the sign planes), `scales` (trainable float32), `masks` (fixed structure)."""
  latent: np.ndarray
  scales: dict[str, np.ndarray]
  masks: dict[str, np.ndarray]


class Parts:
  """Base of every method's typed parts; subclasses are made with `@parts_dataclass(meta=...)`.

  Data fields hold arrays (None when a layout variant leaves a part out); `META` names the
  static fields (Python ints/strings), which are pytree metadata, so a `Parts` passes
  through `jax.jit` with its layout static.
  """
  META: ClassVar[tuple[str, ...]] = ()
  # bool parts stored as the sorted positions of their True entries when smaller than a bitmap
  POSITIONS: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def data_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.META)

  def arrays(self) -> dict[str, Any]:
    """{part name: array} of the parts present (what the exporter stores)."""
    return {k: getattr(self, k) for k in self.data_fields() if getattr(self, k) is not None}

  def meta(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self.META}

  def map(self, fn: Callable[[Any], Any]) -> "Parts":
    """The same layout with `fn` applied to every present array."""
    return dataclasses.replace(self, **{k: fn(v) for k, v in self.arrays().items()})

  @property
  def shape(self) -> tuple[int, int]:
    """The kernel's `[in, out]`."""
    return tuple(self.signs.shape)  # every layout has a sign plane of the kernel's shape

  def check(self) -> None:
    """Raises ValueError when a part has another shape or dtype than the layout's, or (numpy
    parts) a value off the entries the layout reads (`storage`: e.g. a residual sign off the
    salient rows) other than the layout's fill."""
    for k, (shape, dtype) in self.expected().items():
      v = getattr(self, k)
      if v is None:
        raise ValueError(f"{type(self).__name__}: part {k!r} is missing")
      if tuple(v.shape) != tuple(shape) or np.dtype(v.dtype) != np.dtype(dtype):
        raise ValueError(f"{type(self).__name__}: part {k!r} is {np.dtype(v.dtype)}{list(v.shape)}, the layout "
                         f"needs {np.dtype(dtype)}{list(shape)}")
    extra = set(self.arrays()) - set(self.expected())
    if extra:
      raise ValueError(f"{type(self).__name__}: parts {sorted(extra)} do not belong to this layout variant")
    if all(isinstance(v, np.ndarray) for v in self.arrays().values()):  # values too (not under jit)
      arrays = self.arrays()
      for k, (select, fill) in self.storage(arrays).items():
        off = arrays[k][~select(arrays, arrays[k].shape)]
        if off.size and not np.all(off == np.asarray(fill, off.dtype)):
          raise ValueError(f"{type(self).__name__}: part {k!r} holds values other than {fill!r} outside the "
                           f"entries the layout reads (e.g. a residual sign off the salient rows)")

  # --- what subclasses define -----------------------------------------------------------
  def expected(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{part: (shape, dtype)} of this layout variant (the invariants `check` enforces)."""
    raise NotImplementedError

  def dequantize(self) -> jax.Array:
    """Ŵ `[in, out]` float32."""
    raise NotImplementedError

  @classmethod
  def storage(cls, arrays: Mapping[str, Any]) -> dict[str, SparseRule]:
    """Parts stored as the vector of their meaningful entries, given the decoded others."""
    del arrays
    return {}

  def planes(self, *, one_lhs: bool = False) -> list[PlaneSource] | None:
    """The plane decomposition the packed kernels serve; None: not covered."""
    del one_lhs
    return None

  def qat_init(self) -> QatState:
    raise NotImplementedError(f"{type(self).__name__} has no quantization-aware form")

  @classmethod
  def qat_weight(cls, meta: Mapping[str, Any], latent: jax.Array, scales: Mapping[str, jax.Array],
                 masks: Mapping[str, jax.Array], sign: Callable[[jax.Array, jax.Array], jax.Array],
                 clip: float) -> jax.Array:
    """Ŵ from the QAT variables; `sign(x, clip)` is the straight-through sign."""
    raise NotImplementedError

  @classmethod
  def from_qat(cls, meta: Mapping[str, Any], latent: jax.Array, scales: Mapping[str, jax.Array],
               masks: Mapping[str, jax.Array]) -> "Parts":
    """The parts (stored dtypes) of the current QAT variables."""
    raise NotImplementedError


def parts_dataclass(*, meta: Sequence[str] = ()):
  """Makes a frozen dataclass pytree of a `Parts` subclass; `meta` fields are static."""
  def wrap(cls):
    cls.META = tuple(meta)
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name not in cls.META]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(cls.META))
  return wrap


@jax.jit
def _dequantize(parts: Parts) -> jax.Array:
  return parts.dequantize()


def dequantize(parts: Parts) -> jax.Array:
  """`parts.dequantize()` jitted (the layout is static)."""
  return _dequantize(parts.map(jnp.asarray))


@dataclasses.dataclass
class Binarized:
  """One binarized kernel."""
  w_hat: jax.Array               # [in, out] dequantized kernel, Flax layout, float32
  nominal_bits: float            # bits/weight as the papers count them
  stored_bits: int               # every stored bit (signs, bitmaps, residual planes, scales, flags)
  parts: Parts                   # the method's typed parts; `parts.dequantize()` == w_hat
  error: dict[str, float]        # mse, weighted_mse, output_mse, output_rel

  @property
  def bits_per_weight(self) -> float:
    return bits_core.bits_per_weight(self.stored_bits, self.w_hat.shape)


class Provider(Protocol):
  """A post-training binarization method."""
  name: str
  parts_class: type  # its typed parts (a `Parts` subclass)

  def __call__(self, kernel: jax.Array, stats: LayerStats) -> Binarized:
    ...

  def from_arrays(self, arrays: Mapping[str, Any]) -> Parts:
    """The typed parts of stored arrays (the inverse of `Parts.arrays`)."""
    ...


class ModelPlanner(Protocol):
  """A provider that decides across the whole model before binarizing any layer (optional).

  The calibration pass then measures `OutputSensitivity` of every selected layer on the
  full-precision model (`sensitivity_options` are `calib.sensitivity.measure`'s keyword
  arguments), calls `plan` once, and hands each layer its sensitivity and plan entry in
  `LayerStats`.
  """

  def sensitivity_options(self) -> dict[str, Any] | None:
    """None: no sensitivity pass (e.g. a setting of the provider that does not use it)."""
    ...

  def plan(self, kernels: Mapping[str, jax.Array], sensitivity: Mapping[str, OutputSensitivity]
           ) -> dict[str, Any]:
    """Per layer path, what `LayerStats.plan` carries to that layer's binarization."""
    ...


@jax.jit
def _errors(w, w_hat, h, weight):
  e = w.astype(jnp.float32) - w_hat
  return (jnp.mean(jnp.square(e)), jnp.mean(weight * jnp.square(e)),
          gptq_core.output_error(w, w_hat, h), gptq_core.output_error(w, jnp.zeros_like(w_hat), h))


def error_metrics(w: jax.Array, w_hat: jax.Array, h: jax.Array,
                  weight: jax.Array | None = None) -> dict[str, float]:
  """Errors of Ŵ.

  mse: mean (W − Ŵ)². weighted_mse: mean weight·(W − Ŵ)² (= mse without a weight).
  output_mse: tr(EᵀHE)/(2·out) = mean over calibration tokens and outputs of (x E)²
  (H = 2/N Σ x xᵀ). output_rel: tr(EᵀHE)/tr(WᵀHW) = ‖X(W − Ŵ)‖²/‖XW‖² (nan if H = 0).
  """
  mse, wmse, num, den = map(float, _errors(w, w_hat, h, 1.0 if weight is None else weight))
  return {"mse": mse, "weighted_mse": wmse, "output_mse": num / (2 * w.shape[1]),
          "output_rel": num / den if den > 0 else math.nan}


# --- block plumbing shared by the GPTQ-based layouts -------------------------------------------

def dequantize_blocks(parts: Mapping[str, jax.Array], compose, *, n_in: int, block_size: int,
                      row_parts: tuple[str, ...]) -> jax.Array:
  """Rebuild Ŵ `[in, out]` by applying a block's `compose(parts) -> Ŵ_blk` to every block.

  `row_parts` name the leaves indexed by input row (`[in, ...]`); the other leaves have a
  leading `[n_blocks]` axis.
  """
  nb = math.ceil(n_in / block_size)
  pad = nb * block_size - n_in

  def blocks(k, x):
    if k not in row_parts:
      return x
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((nb, block_size) + x.shape[1:])

  w = jax.vmap(compose)({k: blocks(k, v) for k, v in parts.items()})
  return w.reshape(nb * block_size, -1)[:n_in]


def crop_rows(parts: Mapping[str, jax.Array], n_in: int, row_parts: tuple[str, ...]) -> dict[str, jax.Array]:
  """Flatten the `[n_blocks, block, ...]` row leaves of stacked parts to `[in, ...]`."""
  return {k: (v.reshape((-1,) + v.shape[2:])[:n_in] if k in row_parts else v)
          for k, v in parts.items()}


def effective_blocks(n_in: int, block_size: int, scale_block: int | None) -> tuple[int, int]:
  """(GPTQ block, scale group) actually used: a layer narrower than a block or group is
  one block / group of its own size, so the salient-row budget stays a fraction of the
  real rows."""
  block = min(block_size, n_in)
  if scale_block is None:
    return block, block
  return block, min(scale_block, math.ceil(n_in / block) * block)


def blocks_of(x: jax.Array, group: int) -> jax.Array:
  """`[in, ...]` -> `[ceil(in/group), group, ...]`, rows padded with zeros."""
  nb = math.ceil(x.shape[0] / group)
  x = jnp.pad(x, ((0, nb * group - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape((nb, group) + x.shape[1:])


def rows_of(x: jax.Array, n_in: int) -> jax.Array:
  """Inverse of `blocks_of`: `[nb, group, ...]` -> `[in, ...]`."""
  return x.reshape((-1,) + x.shape[2:])[:n_in]


def bf16(x: Any) -> np.ndarray:
  """The stored (bfloat16) value of a scale, as numpy."""
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16))


def signs_pm(b: jax.Array) -> jax.Array:
  """bool sign plane -> ±1 float32."""
  return jnp.where(b, 1.0, -1.0)


def two_plane_weight(latent: jax.Array, first_scale: jax.Array, second_scale: jax.Array | None,
                     sign: Callable[[jax.Array, jax.Array], jax.Array], clip: float, *,
                     first_offset: Any = 0.0, second_offset: Any = 0.0) -> jax.Array:
  """The QAT Ŵ of a layout with a first sign plane and an optional residual one.

  `B1 = sign(latent)`, `Ŵ = (B1·first_scale + first_offset) + (B2·second_scale + second_offset)`
  with `B2 = sign(latent − B1·first_scale)` (residual binarization of the latent); every
  `[in, out]` (or broadcastable). The straight-through window of a row is `clip` times
  its largest first-order scale.
  """
  bound = jax.lax.stop_gradient(clip * jnp.max(jnp.abs(first_scale), axis=1, keepdims=True))
  s1 = sign(latent, bound)
  term1 = s1 * first_scale
  first = term1 + first_offset
  if second_scale is None:
    return first
  s2 = sign(latent - term1, bound)
  return first + (s2 * second_scale + second_offset)


def two_plane_latent(signs: np.ndarray, first_scale: np.ndarray, residual_signs: np.ndarray | None = None,
                     second_scale: np.ndarray | None = None) -> np.ndarray:
  """Latent weights whose signs give exactly the planes of `two_plane_weight`.

  Per entry, with A = |first_scale| and B = |second_scale|: latent = s1·A (+ s2·min(B, A/2)
  where B ≠ 0, at least A·2⁻¹⁸; a refined residual scale may be negative), floored away
  from 0 (float32 throughout). Then sign(latent) = s1 and latent − s1·A has sign s2.
  """
  one = np.float32(1)
  s1 = np.where(np.asarray(signs), one, -one)
  a = np.maximum(np.abs(np.asarray(first_scale, np.float32)), np.float32(1e-8))
  lat = s1 * a
  if residual_signs is not None:
    s2 = np.where(np.asarray(residual_signs), one, -one)
    b = np.abs(np.asarray(second_scale, np.float32))
    # at least a few ulps of A, so that latent − s1·A keeps the sign in float32
    lat = lat + s2 * np.maximum(np.minimum(b, a / 2), a * np.float32(2.0 ** -18)) * (b > 0).astype(np.float32)
  return lat.astype(np.float32)
