"""LLaVA-1.5 vision-language model (Liu et al. 2023, arXiv 2310.03744) in flax.nnx.

CLIP vision tower -> two-layer GELU projector -> Llama decoder. Image-token
placeholders in `input_ids` are replaced, in order, by projected image features,
as transformers' `LlavaForConditionalGeneration` does (one feature per placeholder).

`Model(config, rngs=...)` builds it; `VARIANTS` lists published shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sab_jax.models import clip, layers, llama


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: clip.VisionConfig = clip.VisionConfig()
  text: llama.TextConfig = llama.TextConfig()
  image_token_id: int = 32000
  projector_hidden_act: str = "gelu"
  # An int, or a tuple of ints whose hidden states are concatenated (transformers' list form).
  vision_feature_layer: int | tuple[int, ...] = -2
  # 'default' drops the class token, 'full' keeps it.
  vision_feature_select_strategy: str = "default"
  multimodal_projector_bias: bool = True
  # Not in LLaVA/transformers (off for HF checkpoints): add `row * e_r + col * e_c` (the
  # patch's grid row and column scaled to [-1, 1], e_r, e_c learned) to the projected image
  # features. Without ViT blocks, CLIP's position embedding is added before the pre-LayerNorm
  # and drowned by the patch content, so the decoder cannot tell where an object is.
  image_coordinates: bool = False
  # Init std of e_r, e_c: large enough to be read next to features of norm ~20.
  image_coordinate_std: float = 3.0

  def __post_init__(self):
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                       f"got {self.vision_feature_select_strategy!r}")
    n = self.vision.num_hidden_layers
    if any(not -(n + 1) <= l <= n for l in self.feature_layers):
      raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is out of range for "
                       f"{self.vision.num_hidden_layers} vision layers")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} outside vocab of {self.text.vocab_size}")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    fl = self.vision_feature_layer
    return (fl,) if isinstance(fl, int) else tuple(fl)

  @property
  def num_image_tokens(self) -> int:
    """Placeholders per image in `input_ids`."""
    return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)


# Published shapes. LLaVA-1.5: Liu et al. 2023 (arXiv 2310.03744), CLIP ViT-L/14-336 +
# Vicuna-1.5 (Llama-2 shapes, arXiv 2307.09288). 'demo' is the embedded default workload's
# model; 'test' the ~100k-parameter size used by unit tests.
VARIANTS: dict[str, LlavaConfig] = {
    "llava-1.5-7b": LlavaConfig(),
    "llava-1.5-13b": LlavaConfig(text=llama.TextConfig(hidden_size=5120, intermediate_size=13824,
                                                       num_hidden_layers=40, num_attention_heads=40,
                                                       num_key_value_heads=40)),
    # No ViT blocks: a randomly initialised ViT mixes the 16 patch features into near
    # copies of each other and from-scratch training then sits on the answer prior for
    # thousands of steps (measured; experiments/benchmarks/RESULTS.md). Patch embedding +
    # pre-LN + the 2-layer projector (a per-patch MLP) feed the decoder, as in Fuyu-style
    # linear patch encoders.
    "demo": LlavaConfig(
        vision=clip.VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=0,
                                 num_attention_heads=4, image_size=64, patch_size=16, initializer_range=1.0),
        text=llama.TextConfig(vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              initializer_range=1.0),
        image_token_id=3, vision_feature_layer=-1, image_coordinates=True),
    "test": LlavaConfig(
        vision=clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8),
        text=llama.TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        image_token_id=3, vision_feature_layer=-1),
}


def config_from_dict(d: dict[str, Any]) -> LlavaConfig:
  """Builds a LlavaConfig from a plain (e.g. ml_collections) dict: {variant, vision: {...}, text: {...}, ...}."""
  d = dict(d)
  base = VARIANTS[d.pop("variant")] if "variant" in d else LlavaConfig()
  vision = dataclasses.replace(base.vision, **dict(d.pop("vision", {})))
  text = dataclasses.replace(base.text, **dict(d.pop("text", {})))
  if isinstance(d.get("vision_feature_layer"), list):
    d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
  return dataclasses.replace(base, vision=vision, text=text, **d)


class Projector(nnx.Module):
  def __init__(self, cfg: LlavaConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = cfg.vision.hidden_size * len(cfg.feature_layers)
    self.linear_1 = dense(width, cfg.text.hidden_size, axes=("vision_embed", "embed"), **kw)
    self.linear_2 = dense(cfg.text.hidden_size, cfg.text.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.projector_hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(self.act(self.linear_1(x)))


class Llava(nnx.Module):
  """`model(input_ids, pixel_values)` -> logits `[B, T, vocab]`.

  `pixel_values` are `[B, H, W, 3]` (NHWC), already normalised for the vision tower.
  """

  def __init__(self, cfg: LlavaConfig, *, dense: layers.DenseFactory = layers.Dense,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = dict(dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision_tower = clip.VisionTower(cfg.vision, **kw)
    self.multi_modal_projector = Projector(cfg, **kw)
    self.language_model = llama.Decoder(cfg.text, **kw)
    if cfg.text.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = dense(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, axes=("embed", "vocab"),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.image_coordinates:
      self.image_coordinate_embedding = layers.param(
          rngs, nnx.initializers.normal(cfg.image_coordinate_std), (2, cfg.text.hidden_size), param_dtype,
          (None, "embed"))

  # --- pieces ---------------------------------------------------------------
  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected image features `[B, num_image_tokens, text_hidden]`."""
    n = self.cfg.vision.num_hidden_layers
    idx = [l % (n + 1) for l in self.cfg.feature_layers]
    hidden = self.vision_tower(pixel_values.astype(self.dtype), num_layers=max(idx))
    feats = jnp.concatenate([hidden[i] for i in idx], axis=-1)
    if self.cfg.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    out = self.multi_modal_projector(feats)
    if self.cfg.image_coordinates:
      out = out + (self.patch_coordinates() @ self.image_coordinate_embedding[...]).astype(out.dtype)
    return out

  def patch_coordinates(self) -> jax.Array:
    """`[num_image_tokens, 2]`: (row, col) of each image feature in [-1, 1]; (0, 0) for the class token."""
    g = self.cfg.vision.image_size // self.cfg.vision.patch_size
    ramp = jnp.linspace(-1.0, 1.0, g)
    coords = jnp.stack([jnp.repeat(ramp, g), jnp.tile(ramp, g)], axis=-1)  # row-major, as patchify
    if self.cfg.vision_feature_select_strategy == "full":
      coords = jnp.concatenate([jnp.zeros((1, 2)), coords], axis=0)
    return coords

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """Token embeddings with image placeholders replaced by image features, in order."""
    x = self.language_model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    feats = self.image_features(pixel_values)
    is_image = input_ids == self.cfg.image_token_id
    if not isinstance(input_ids, jax.core.Tracer):
      found, expected = int(is_image.sum()), feats.shape[0] * feats.shape[1]
      if found != expected:
        raise ValueError(f"input_ids hold {found} image tokens (id {self.cfg.image_token_id}) but the images give "
                         f"{expected} features ({self.cfg.num_image_tokens} per image): put exactly "
                         f"{self.cfg.num_image_tokens} placeholders per image in the prompt")
    flat = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)
    order = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(x.shape)
    return jnp.where(is_image[..., None], gathered, x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array | None = None,
                image_grid_thw: Any = None) -> jax.Array:
    """int32 `[B, T]` rotary positions: the running count of attended tokens, so left padding never
    shifts real tokens (the same signature as Qwen2.5-VL's 3D positions, for shared callers)."""
    if image_grid_thw is not None:
      raise ValueError("LLaVA takes NHWC pixel_values of one size; image_grid_thw is for Qwen2.5-VL")
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)

  # --- forward passes ---------------------------------------------------------
  def forward(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits plus named intermediates (`hidden`, `layer_inputs`) for distillation and calibration."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    positions = self.positions(input_ids, attention_mask, pixel_values)
    x = self.embed(input_ids, pixel_values)
    hidden, inputs, _ = self.language_model(x, attention_mask, positions)
    return self.logits(hidden), {"hidden": hidden, "layer_inputs": inputs}

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    return self.forward(input_ids, pixel_values, attention_mask)[0]

  def decode_step(self, x: jax.Array, positions: jax.Array, cache: list[llama.Cache], cache_index: jax.Array,
                  cache_mask: jax.Array) -> tuple[jax.Array, list[llama.Cache]]:
    """Runs embeddings `x` through the decoder against a KV cache; returns logits and the new cache."""
    hidden, _, cache = self.language_model(x, None, positions, cache, cache_index, cache_mask)
    return self.logits(hidden), cache


def Model(config: LlavaConfig | str, *, rngs: nnx.Rngs, **kw) -> Llava:
  """Factory in the big_vision style: a config or a variant name."""
  cfg = VARIANTS[config] if isinstance(config, str) else config
  return Llava(cfg, rngs=rngs, **kw)
