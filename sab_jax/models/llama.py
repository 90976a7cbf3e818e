"""Llama decoder (Touvron et al. 2023, arXiv 2302.13971), the language model of LLaVA-1.5.

RMSNorm, rotary position embeddings with configurable theta, grouped-query attention
(Ainslie et al. 2023, arXiv 2305.13245) and a SwiGLU MLP; numerically the same as
transformers' `LlamaModel` in float32. A functional key/value cache (a pytree passed
in and returned) lets generation run inside one jitted loop without recomputing the
prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sab_jax.models import layers

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 32064
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  # None: hidden_size // num_attention_heads.
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  hidden_act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  # Std of the token-embedding init (transformers' `initializer_range`). From-scratch
  # LVLMs need it near 1: at 0.02 the O(1) image features swamp the question words in
  # the residual stream and training stalls at the answer prior.
  initializer_range: float = 0.02

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the rotate-half convention of the HF Llama port.

  Args:
    x: `[B, T, H, D]`; positions: `[B, T]` integer positions.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  return apply_rope(x, positions.astype(jnp.float32)[..., None] * inv_freq)  # angles [B, T, D/2]


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates `x` `[B, T, H, D]` by `angles` `[B, T, D/2]` (rotate-half convention, float32 math).

  Split from `rope` so models whose angles are not `position * inv_freq` of one position
  (Qwen2.5-VL's multimodal rotary embedding) rotate exactly the same way.
  """
  d = x.shape[-1]
  emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]      # [B, T, 1, D]
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
  return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache.

  `qkv_bias` / `o_bias` (default: `cfg.attention_bias` for all four) let decoders with bias on
  q/k/v only (Qwen2) reuse it; subclasses override `rotate` for other rotary embeddings.
  """

  def __init__(self, cfg: TextConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
               qkv_bias: bool | None = None, o_bias: bool | None = None):
    self.cfg = cfg
    h, k, d, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim, cfg.hidden_size
    if h % k:
      raise ValueError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={k}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv_bias = cfg.attention_bias if qkv_bias is None else qkv_bias
    o_bias = cfg.attention_bias if o_bias is None else o_bias
    self.q_proj = dense(e, h * d, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
    self.k_proj = dense(e, k * d, use_bias=qkv_bias, axes=("embed", "kv_heads"), **kw)
    self.v_proj = dense(e, k * d, use_bias=qkv_bias, axes=("embed", "kv_heads"), **kw)
    self.o_proj = dense(h * d, e, use_bias=o_bias, axes=("heads", "embed"), **kw)

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding of q or k `[B, T, H, D]` at `positions`."""
    return rope(x, positions, self.cfg.rope_theta)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: Cache | None, cache_index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    b, t, _ = x.shape
    cfg = self.cfg
    d = cfg.resolved_head_dim
    q = self.rotate(self.q_proj(x).reshape(b, t, cfg.num_attention_heads, d), positions)
    k = self.rotate(self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, d), positions)
    v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, d)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      cache = {"k": k, "v": v}
    out = layers.dot_product_attention(q, k, v, mask)
    return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
  def __init__(self, cfg: TextConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: TextConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
               attention: Callable[..., Attention] = Attention):
    norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)
    self.self_attn = attention(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, mask, cache, cache_index):
    h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Decoder(nnx.Module):
  """Token embedding, decoder layers and final norm (transformers' `LlamaModel`).

  `attention` builds each layer's self-attention (another rotary embedding or bias layout,
  e.g. Qwen2.5-VL's); the param paths stay those of the Llama decoder.
  """

  def __init__(self, cfg: TextConfig, *, dense: layers.DenseFactory = layers.Dense,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               attention: Callable[..., Attention] = Attention):
    self.cfg = cfg
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                     stddev=cfg.initializer_range)
    self.layers = nnx.List([DecoderLayer(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         attention=attention)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, attention_mask: jax.Array, positions: jax.Array,
               cache: list[Cache] | None = None, cache_index: jax.Array | None = None,
               cache_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array], list[Cache] | None]:
    """Runs the decoder on input embeddings.

    Args:
      x: `[B, T, E]` input embeddings.
      attention_mask: `[B, T]` 1 for real tokens, 0 for padding.
      positions: `[B, T]` rotary positions (or whatever the layers' `attention.rotate` takes,
        e.g. Qwen2.5-VL's `[3, B, T]`).
      cache: per-layer `{"k", "v"}` of `[B, S, K, D]`, or None for a cache-free pass.
      cache_index: column of the cache where `x`'s first token is written.
      cache_mask: `[B, S]` which cache columns hold real tokens (incl. the new ones).
    Returns:
      final hidden states `[B, T, E]`, each layer's input (for calibration/distillation),
      and the updated cache (None without one).
    """
    t = x.shape[1]
    if cache is None:
      mask = causal_mask(attention_mask)
    else:
      s = cache[0]["k"].shape[1]
      query_col = cache_index + jnp.arange(t)
      causal = jnp.arange(s)[None, :] <= query_col[:, None]                    # [T, S]
      mask = causal[None, None] & cache_mask.astype(bool)[:, None, None, :]
    inputs, new_cache = [], []
    for i, layer in enumerate(self.layers):
      inputs.append(x)
      x, c = layer(x, positions, mask, None if cache is None else cache[i], cache_index)
      new_cache.append(c)
    return self.norm(x), inputs, (new_cache if cache is not None else None)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """`[B, 1, T, T]` boolean: causal and not attending to padding."""
  t = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


def init_cache(cfg: TextConfig, batch: int, length: int, dtype: Any) -> list[Cache]:
  shape = (batch, length, cfg.num_key_value_heads, cfg.resolved_head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]
