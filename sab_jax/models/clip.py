"""CLIP ViT vision tower, as used by LLaVA-1.5 (Radford et al. 2021, arXiv 2103.00020).

Matches transformers' `CLIPVisionModel`: class token, learned position embeddings,
`pre_layrnorm` before the encoder, quick-GELU MLP. The post-layernorm is kept for
weight compatibility but LLaVA reads hidden states before it. The patch embedding
(a stride-p convolution) is a Dense on flattened `(p, p, channels)` patches, so it
goes through the same Dense factory as every other linear layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sab_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Std of the class/position embedding init (transformers' `initializer_range`);
  # from-scratch demo models use 1.0 so patch positions are visible from step 0.
  initializer_range: float = 0.02

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class Attention(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.head_dim = cfg.hidden_size // cfg.num_attention_heads
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
    self.k_proj = dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
    self.v_proj = dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
    self.out_proj = dense(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    out = layers.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), None)
    return self.out_proj(out.reshape(b, t, -1))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, **norm)
    self.self_attn = Attention(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, **norm)
    self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class VisionTower(nnx.Module):
  """Returns all hidden states (embeddings after pre-LN, then each layer's output)."""

  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory = layers.Dense,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    self.patch_embedding = dense(p * p * c, d, use_bias=False, axes=("patch", "embed"),
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.normal(cfg.initializer_range)
    self.class_embedding = layers.param(rngs, init, (d,), param_dtype, ("embed",))
    self.position_embedding = layers.param(rngs, init, (cfg.num_patches + 1, d),
                                           param_dtype, (None, "embed"))
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_layrnorm = layers.LayerNorm(d, **norm)
    self.layers = nnx.List([EncoderLayer(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = layers.LayerNorm(d, **norm)

  def patchify(self, pixel_values: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, N, p*p*C]`, patches in row-major order, (p, p, C) flattened."""
    b, h, w, c = pixel_values.shape
    p = self.cfg.patch_size
    if h != self.cfg.image_size or w != self.cfg.image_size or c != self.cfg.num_channels:
      raise ValueError(f"pixel_values must be [B, {self.cfg.image_size}, {self.cfg.image_size}, "
                       f"{self.cfg.num_channels}] (NHWC), got {pixel_values.shape}")
    x = pixel_values.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, pixel_values: jax.Array, num_layers: int | None = None) -> list[jax.Array]:
    """Hidden states 0..num_layers (default: all); later layers are skipped, not computed."""
    x = self.patch_embedding(self.patchify(pixel_values))
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(self.dtype)
    x = self.pre_layrnorm(x)
    hidden = [x]
    n = len(self.layers) if num_layers is None else num_layers
    for layer in list(self.layers)[:n]:
      x = layer(x)
      hidden.append(x)
    return hidden
