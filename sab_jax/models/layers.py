"""Small building blocks shared by the vision tower and the decoder.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...) in its
`out_sharding` metadata; `sab_jax.sharding` maps them onto whatever mesh is in use,
so the model code never mentions devices. Sharding is applied explicitly by the
caller (eval_shape -> jit(out_shardings)), hence `eager_sharding=False`.

Every linear layer is built through a `DenseFactory` (default: `Dense`), which picks the
Dense class for every layer at construction time. Replacing single layers of a built
model (the binarized student's `BinaryDense`, the packed model's `PackedDense`) goes
through `models.paths.replace` instead: which layers are binarized is only known once
the model and the rules meet.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


_SHAPES_ONLY = contextvars.ContextVar("sab_jax_shapes_only", default=False)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], dtype: Any, axes: Axes) -> nnx.Param:
  """A parameter annotated with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  value = jnp.zeros(tuple(shape), dtype) if _SHAPES_ONLY.get() else init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def abstract(make: Callable[[], nnx.Module]) -> nnx.Module:
  """`nnx.eval_shape(make)`: the module's structure, shapes, dtypes and axis names, nothing
  initialised (a template to restore, import or load an export into).

  Its parameters are traced as zeros instead of drawn: every draw advances the RNG stream's
  counter, and flax (0.12) then reads the new counter's `sharding`, which on a tracer builds an
  error message from the whole trace so far; the drawing made a template's cost quadratic in
  its parameter count (5-7 s for Qwen2.5-VL-7B, 0.2 s without).
  """
  token = _SHAPES_ONLY.set(True)
  try:
    return nnx.eval_shape(make)
  finally:
    _SHAPES_ONLY.reset(token)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel in Flax layout `[in, out]`."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
               axes: Axes = ("embed", "mlp"), dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (out_features,), param_dtype, axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class DenseFactory(Protocol):
  """Signature every replacement for `Dense` must accept."""

  def __call__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    ...


class Embed(nnx.Module):
  """Token embedding table `[vocab, embed]`; `attend` reuses it as a tied head."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs, axes: Axes = ("vocab", "embed"), stddev: float = 0.02):
    self.dtype = dtype
    self.embedding = param(rngs, nnx.initializers.normal(stddev), (num_embeddings, features), param_dtype, axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """Llama RMSNorm; statistics in float32 whatever the compute dtype (as transformers)."""

  def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nnx.Module):
  """CLIP LayerNorm with bias; statistics in float32."""

  def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (features,), param_dtype, ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros_init(), (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention with grouped K/V heads.

  Args:
    q: `[B, T, H, D]`; k, v: `[B, S, K, D]` with H a multiple of K (GQA).
    mask: boolean, broadcastable to `[B, 1, T, S]`; True = attend.
  Returns:
    `[B, T, H, D]`.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (d ** -0.5)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)
