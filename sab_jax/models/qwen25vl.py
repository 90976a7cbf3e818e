"""Qwen2.5-VL vision-language model (Bai et al. 2025, arXiv 2502.13923) in flax.nnx.

A ViT with 2D rotary positions, RMSNorm, a SwiGLU MLP and window attention (full
attention only in `fullatt_block_indexes`) encodes each image at its own grid; a patch
merger (RMSNorm, then a two-layer GELU MLP on each 2x2 block of patches) maps it into a
Qwen2 decoder, whose rotary embedding is multimodal (mrope: temporal/height/width position
components, each rotating its own slice of the head dimension). Numerically the same as
transformers' `Qwen2_5_VLForConditionalGeneration` in float32.

Images come either as NHWC pixels of one size (our fixed-shape pipeline: each image is
one frame, repeated over the temporal patch as transformers' image processor does for
still images) or in transformers' processor layout, flattened patches `[num_patches,
C*T*P*P]` with `image_grid_thw`. Grids are static Python ints: every index the window
attention and the mrope positions need is built with numpy at trace time, so one
compiled program serves one image shape and nothing data-dependent is traced.

`Model(config, rngs=...)` builds it; `VARIANTS` lists published shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sab_jax.models import layers, llama

FAMILY = "qwen2_5_vl"

Grid = tuple[int, int, int]  # (t, h, w) in patches, transformers' image_grid_thw row


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """transformers' `Qwen2_5_VLVisionConfig` (same names), plus our `image_size`."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  # Side of a window, in pixels: window attention groups (window_size // merge // patch)^2 merged tokens.
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  # Videos only (unsupported here); kept so an exported config.json says what the source said.
  tokens_per_second: int = 2
  initializer_range: float = 0.02
  # Not transformers': the square image side our fixed-shape pipeline feeds (a multiple of
  # patch_size * spatial_merge_size). transformers picks each image's size in its processor.
  image_size: int = 336
  # transformers hard-codes the vision RMSNorms' eps.
  rms_norm_eps: float = 1e-6

  @property
  def mlp_bias(self) -> bool:  # llama.MLP reads it: the vision MLP has biases
    return True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of a flattened patch, `C * T * P * P` (transformers' processor layout)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def window_units(self) -> int:
    """Side of an attention window in merged tokens (transformers' `vit_merger_window_size`)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder of transformers' `Qwen2_5_VLTextConfig` (full attention only)."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  # Rotary frequencies per position component (temporal, height, width); sums to head_dim // 2.
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  # Qwen2: q/k/v projections have a bias, o_proj none; the MLP has none.
  attention_bias: bool = True
  mlp_bias: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.resolved_head_dim // 2:
      raise ValueError(f"mrope_section {self.mrope_section} must be 3 ints summing to head_dim // 2 = "
                       f"{self.resolved_head_dim // 2}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Serialised with the config so a stored config says which model it builds.
  family: str = FAMILY

  def __post_init__(self):
    if self.family != FAMILY:
      raise ValueError(f"family must be {FAMILY!r} for a Qwen2.5-VL config, got {self.family!r}")
    v, t = self.vision, self.text
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
      if not 0 <= getattr(self, name) < t.vocab_size:
        raise ValueError(f"{name} {getattr(self, name)} outside vocab of {t.vocab_size}")
    unit = v.patch_size * v.spatial_merge_size
    if v.image_size <= 0 or v.image_size % unit:
      raise ValueError(f"vision.image_size {v.image_size} must be a positive multiple of patch_size * "
                       f"spatial_merge_size = {unit}")
    if v.window_units < 1:
      raise ValueError(f"vision.window_size {v.window_size} is smaller than one merged token ({unit} pixels)")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ValueError(f"vision.fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision head dim {v.hidden_size}/{v.num_heads} must be a multiple of 4 (2D rotary)")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision.out_hidden_size {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")

  @property
  def num_image_tokens(self) -> int:
    """Placeholders per `image_size` image in `input_ids`."""
    return (self.vision.image_size // (self.vision.patch_size * self.vision.spatial_merge_size)) ** 2


# Published shapes (the config.json files of Qwen/Qwen2.5-VL-{3B,7B}-Instruct); 'qwen2.5-vl-test' is a
# tiny size for unit tests: 2 vision blocks (one windowed, one full), 2x2 windows of merged
# tokens on a 3x3 grid (full and partial windows), GQA.
VARIANTS: dict[str, Qwen25VLConfig] = {
    "qwen2.5-vl-7b": Qwen25VLConfig(),
    "qwen2.5-vl-3b": Qwen25VLConfig(
        vision=VisionConfig(out_hidden_size=2048),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2.5-vl-test": Qwen25VLConfig(
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                            window_size=16, fullatt_block_indexes=(1,), out_hidden_size=32, image_size=24),
        text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 1, 1),
                        max_position_embeddings=256, rope_theta=10000.0),
        image_token_id=3, video_token_id=6, vision_start_token_id=4, vision_end_token_id=5),
}


def _tuples(d: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
  return {k: tuple(v) if k in names and isinstance(v, list) else v for k, v in d.items()}


def config_from_dict(d: dict[str, Any]) -> Qwen25VLConfig:
  """A Qwen25VLConfig from a plain (e.g. ml_collections or JSON) dict: {variant, vision: {...}, text: {...}, ...}.

  Lists (JSON has no tuples) become the tuples the frozen config holds, so a config that went
  through JSON compares equal to the original.
  """
  d = dict(d)
  base = VARIANTS[d.pop("variant")] if "variant" in d else Qwen25VLConfig()
  vision = dataclasses.replace(base.vision, **_tuples(dict(d.pop("vision", {})), ("fullatt_block_indexes",)))
  text = dataclasses.replace(base.text, **_tuples(dict(d.pop("text", {})), ("mrope_section",)))
  return dataclasses.replace(base, vision=vision, text=text, **d)


# --- static index plans (numpy, at trace time) ----------------------------------------
def _as_grids(image_grid_thw: Any) -> list[Grid]:
  """`image_grid_thw` as Python ints; it must be concrete (it decides shapes)."""
  if isinstance(image_grid_thw, jax.core.Tracer):
    raise TypeError("image_grid_thw must be static (numpy, a list or tuples of ints), not a traced array: it fixes "
                    "the shapes of the vision tower; pass it as a static argument under jit")
  grid = np.asarray(image_grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"image_grid_thw must be [num_images, 3] (t, h, w), got shape {grid.shape}")
  return [tuple(int(x) for x in row) for row in grid]


def _patch_order(grid: Grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of each patch of one image in transformers' order: frames, then merge blocks row-major,
  then the patches of a block row-major."""
  t, h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(block(rows), t), np.tile(block(cols), t)


def _window_plan(grid: Grid, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Window attention of one image: the permutation of merged tokens that makes every window
  contiguous (frames, windows row-major, tokens row-major inside a window; windows at the right
  and bottom edges may be partial), and the window id of each merged token after it."""
  t, h, w = grid
  lh, lw = h // merge, w // merge
  frame, row, col = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
  nw = -(-lw // window)
  window_id = (frame * -(-lh // window) + row // window) * nw + col // window
  order = np.lexsort((col.ravel(), row.ravel(), window_id.ravel()))  # stable: row-major within a window
  return order, window_id.ravel()[order]


@dataclasses.dataclass(frozen=True)
class _Segments:
  """Attention within contiguous segments (windows or frames) of a sequence of N tokens, run as a
  batch of segments padded to the longest: `gather` `[S, L]` token of each slot (padding repeats
  token 0), `valid` `[S, L]` which slots are real (None: all), `scatter` `[N]` each token's slot
  in the flattened `[S * L]`. Costs S * L^2 instead of N^2 and never builds an N x N mask."""
  gather: np.ndarray
  valid: np.ndarray | None
  scatter: np.ndarray

  @classmethod
  def of(cls, segment_ids: np.ndarray) -> _Segments | None:
    """From each token's segment id (equal ids contiguous); None for a single segment."""
    starts = np.flatnonzero(np.r_[True, segment_ids[1:] != segment_ids[:-1]])
    if len(starts) == 1:
      return None
    lengths = np.diff(np.r_[starts, len(segment_ids)])
    slot = np.arange(lengths.max())
    valid = slot[None] < lengths[:, None]
    which = np.repeat(np.arange(len(starts)), lengths)
    scatter = which * lengths.max() + np.arange(len(segment_ids)) - starts[which]
    return cls(np.where(valid, starts[:, None] + slot[None], 0), None if valid.all() else valid, scatter)


# --- vision tower ----------------------------------------------------------------------
class VisionAttention(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # One projection to (q, k, v) x heads x head_dim, in that order (transformers' `qkv`).
    self.qkv = dense(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "heads"), **kw)
    self.proj = dense(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, angles: jax.Array, segments: _Segments | None) -> jax.Array:
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k = (llama.apply_rope(qkv[:, :, i], angles) for i in (0, 1))
    v = qkv[:, :, 2]
    if segments is None:
      out = layers.dot_product_attention(q, k, v, None)
    else:
      s, l = segments.gather.shape
      split = lambda y: y[:, segments.gather].reshape(b * s, l, self.num_heads, self.head_dim)
      mask = None
      if segments.valid is not None:  # keys of padding slots
        mask = jnp.broadcast_to(jnp.asarray(segments.valid)[None, :, None, None], (b, s, 1, 1, l))
        mask = mask.reshape(b * s, 1, 1, l)
      out = layers.dot_product_attention(split(q), split(k), split(v), mask)
      out = out.reshape(b, s * l, self.num_heads, self.head_dim)[:, segments.scatter]
    return self.proj(out.reshape(b, n, -1))


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.attn = VisionAttention(cfg, dense=dense, **kw)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = llama.MLP(cfg, dense=dense, **kw)  # SwiGLU with biases

  def __call__(self, x: jax.Array, angles: jax.Array, segments: _Segments | None) -> jax.Array:
    x = x + self.attn(self.norm1(x), angles, segments)
    return x + self.mlp(self.norm2(x))


class VisionTower(nnx.Module):
  """Patches of equal-grid images `[B, N, C*T*P*P]` -> hidden states `[B, N, hidden]`, patch order kept.

  Inside, tokens are permuted so each attention window is contiguous (as transformers does) and
  permuted back at the end; attention runs per image and window (full-attention blocks: per frame).
  """

  def __init__(self, cfg: VisionConfig, *, dense: layers.DenseFactory = layers.Dense,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # transformers' Conv3d (kernel = stride = (T, P, P), no bias) as a Dense on flattened patches.
    self.patch_embed = dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=("patch", "embed"), **kw)
    self.blocks = nnx.List([VisionBlock(cfg, dense=dense, **kw) for _ in range(cfg.depth)])

  def rotary_angles(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`[N, head_dim // 2]`: the row angles in the first half, the column angles in the second."""
    half = self.cfg.head_dim // 2  # each axis gets head_dim // 4 frequencies
    inv_freq = 1.0 / (self.cfg.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
    return np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1).astype(np.float32)

  def __call__(self, patches: jax.Array, grid: Grid) -> jax.Array:
    cfg = self.cfg
    t, h, w = grid
    m2 = cfg.spatial_merge_size ** 2
    if patches.shape[1] != t * h * w or h % cfg.spatial_merge_size or w % cfg.spatial_merge_size:
      raise ValueError(f"{patches.shape[1]} patches do not fill grid {grid} (h, w multiples of "
                       f"{cfg.spatial_merge_size})")
    unit_order, window_id = _window_plan(grid, cfg.spatial_merge_size, cfg.window_units)
    order = (unit_order[:, None] * m2 + np.arange(m2)).reshape(-1)          # tokens, window-contiguous
    windows = np.repeat(window_id, m2)
    frames = order // (h * w)
    rows, cols = _patch_order(grid, cfg.spatial_merge_size)
    # Trace-time constants, built per call so no numpy array is held by the module.
    angles = jnp.asarray(self.rotary_angles(rows[order], cols[order]))[None]
    window_plan, frame_plan = _Segments.of(windows), _Segments.of(frames)
    x = self.patch_embed(patches)[:, order]
    for i, block in enumerate(self.blocks):
      x = block(x, angles, frame_plan if i in cfg.fullatt_block_indexes else window_plan)
    return x[:, np.argsort(order)]


class PatchMerger(nnx.Module):
  """RMSNorm per patch, then a GELU MLP on each merge block's concatenated patches."""

  def __init__(self, cfg: Qwen25VLConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    v = cfg.vision
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.merge_units = v.spatial_merge_size ** 2
    width = v.hidden_size * self.merge_units
    self.ln_q = layers.RMSNorm(v.hidden_size, eps=v.rms_norm_eps, **kw)
    self.linear_1 = dense(width, width, use_bias=True, axes=("vision_embed", "mlp"), **kw)
    self.linear_2 = dense(width, v.out_hidden_size, use_bias=True, axes=("mlp", "embed"), **kw)
    self.act = layers.activation("gelu")

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    x = self.ln_q(x).reshape(b, n // self.merge_units, self.merge_units * d)
    return self.linear_2(self.act(self.linear_1(x)))


# --- decoder -----------------------------------------------------------------------------
def mrope_angles(positions: jax.Array, cfg: TextConfig) -> jax.Array:
  """Rotary angles `[B, T, head_dim // 2]` from `[3, B, T]` positions (or `[B, T]`: all components equal).

  Frequency i rotates by the position component its `mrope_section` slice names (temporal,
  height, width), as transformers' multimodal rotary embedding.
  """
  d = cfg.resolved_head_dim
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  component = np.repeat(np.arange(3), cfg.mrope_section)                       # [D/2]
  chosen = jnp.moveaxis(positions.astype(jnp.float32)[component], 0, -1)        # [B, T, D/2]
  return chosen * inv_freq


class Attention(llama.Attention):
  """Qwen2 attention: bias on q/k/v only, multimodal rotary positions."""

  def __init__(self, cfg: TextConfig, *, dense: layers.DenseFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    super().__init__(cfg, dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs, qkv_bias=True, o_bias=False)

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return llama.apply_rope(x, mrope_angles(positions, self.cfg))


# --- the model ---------------------------------------------------------------------------
class Qwen25VL(nnx.Module):
  """`model(input_ids, pixel_values, attention_mask, image_grid_thw)` -> logits `[B, T, vocab]`.

  `pixel_values`: NHWC `[B, H, W, 3]` (normalised; one image per row's placeholders, in
  order) or transformers' `[num_patches, C*T*P*P]` with a static `image_grid_thw`.
  """

  def __init__(self, cfg: Qwen25VLConfig, *, dense: layers.DenseFactory = layers.Dense,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = dict(dense=dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision_tower = VisionTower(cfg.vision, **kw)
    self.multi_modal_projector = PatchMerger(cfg, **kw)
    self.language_model = llama.Decoder(cfg.text, attention=Attention, **kw)
    if cfg.text.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = dense(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, axes=("embed", "vocab"),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # --- images ---------------------------------------------------------------------------
  def patchify(self, pixel_values: jax.Array) -> tuple[jax.Array, Grid]:
    """NHWC `[B, H, W, C]` -> `[B, N, C*T*P*P]` in transformers' patch order, each frame repeated
    over the temporal patch (a still image), and the grid (1, H/P, W/P) of every image."""
    v = self.cfg.vision
    if pixel_values.ndim != 4:
      raise ValueError(f"pixel_values of shape {pixel_values.shape} need image_grid_thw (transformers' "
                       f"[num_patches, C*T*P*P] layout) or must be NHWC [B, H, W, C]")
    b, h, w, c = pixel_values.shape
    p, m, tp = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    if c != v.in_channels or h % (p * m) or w % (p * m):
      raise ValueError(f"pixel_values must be [B, H, W, {v.in_channels}] (NHWC) with H and W multiples of "
                       f"patch_size * spatial_merge_size = {p * m}, got {pixel_values.shape}")
    gh, gw = h // p, w // p
    x = pixel_values.reshape(b, gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)                                    # [B, bh, bw, mh, mw, C, P, P]
    x = jnp.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (tp, p, p))  # repeat over T
    return x.reshape(b, gh * gw, v.patch_dim), (1, gh, gw)

  def image_grids(self, pixel_values: jax.Array | None, image_grid_thw: Any = None) -> list[Grid] | Grid:
    """Static grids: the list of `image_grid_thw`, or one grid every image shares (NHWC pixels' shape,
    or `image_size` without pixels)."""
    if image_grid_thw is not None:
      return _as_grids(image_grid_thw)
    v = self.cfg.vision
    if pixel_values is not None:
      if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values of shape {pixel_values.shape} need image_grid_thw (transformers' "
                         f"[num_patches, C*T*P*P] layout) or must be NHWC [B, H, W, C]")
      return (1, pixel_values.shape[1] // v.patch_size, pixel_values.shape[2] // v.patch_size)
    return (1, v.image_size // v.patch_size, v.image_size // v.patch_size)

  def image_features(self, pixel_values: jax.Array, image_grid_thw: Any = None) -> jax.Array:
    """Merged image features: `[B, n, E]` for NHWC pixels, `[total_tokens, E]` for transformers' layout."""
    pixel_values = pixel_values.astype(self.dtype)
    if image_grid_thw is None:
      patches, grid = self.patchify(pixel_values)
      return self.multi_modal_projector(self.vision_tower(patches, grid))
    grids = _as_grids(image_grid_thw)
    sizes = [t * h * w for t, h, w in grids]
    if pixel_values.ndim != 2 or pixel_values.shape != (sum(sizes), self.cfg.vision.patch_dim):
      raise ValueError(f"pixel_values must be [num_patches={sum(sizes)}, C*T*P*P={self.cfg.vision.patch_dim}] "
                       f"for image_grid_thw {grids}, got {pixel_values.shape}")
    starts = np.cumsum([0] + sizes)
    feats: list[jax.Array | None] = [None] * len(grids)
    for grid in dict.fromkeys(grids):  # equal grids run as one batch, in order of first appearance
      members = [i for i, g in enumerate(grids) if g == grid]
      index = np.stack([np.arange(starts[i], starts[i + 1]) for i in members])
      out = self.multi_modal_projector(self.vision_tower(pixel_values[index], grid))
      for j, i in enumerate(members):
        feats[i] = out[j]
    return jnp.concatenate(feats, axis=0)

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
            image_grid_thw: Any = None) -> jax.Array:
    """Token embeddings with image placeholders replaced by image features, in order."""
    x = self.language_model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    feats = self.image_features(pixel_values, image_grid_thw)
    flat = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)
    is_image = input_ids == self.cfg.image_token_id
    if not isinstance(input_ids, jax.core.Tracer):
      found = int(is_image.sum())
      if found != flat.shape[0]:
        raise ValueError(f"input_ids hold {found} image tokens (id {self.cfg.image_token_id}) but the images give "
                         f"{flat.shape[0]} features: put (h/{self.cfg.vision.spatial_merge_size}) * "
                         f"(w/{self.cfg.vision.spatial_merge_size}) placeholders per image of h x w patches "
                         f"({self.cfg.num_image_tokens} for a {self.cfg.vision.image_size}-pixel square image)")
    order = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(x.shape)
    return jnp.where(is_image[..., None], gathered, x)

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array | None = None,
                image_grid_thw: Any = None) -> jax.Array:
    """int32 `[3, B, T]` mrope positions: transformers' `get_rope_index` for images, jit-friendly.

    Every attended token advances the next token's position: text by 1, an image by
    max(h, w) / merge once, at its last token. Image token (t, r, c) of an image starting at
    position s sits at (s + t, s + r, s + c); a text token at s on all three. Image tokens are
    matched to images in order over the flattened batch (as `embed` matches features), so
    only the grids need to be static. Padding gets 0.
    """
    m = self.cfg.vision.spatial_merge_size
    mask = attention_mask.astype(bool)
    is_image = input_ids == self.cfg.image_token_id
    k = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1      # image-token index over the batch
    grids = self.image_grids(pixel_values, image_grid_thw)
    if isinstance(grids, tuple):  # every image has this grid
      lh, lw = grids[1] // m, grids[2] // m
      n = grids[0] * lh * lw
      offset = k % n
    else:  # per-image grids: find each token's image by its index
      if not grids:
        raise ValueError("image_grid_thw is empty")
      merged = np.array([(t, h // m, w // m) for t, h, w in grids], np.int32)
      n_each = merged.prod(axis=1)
      ends = np.cumsum(n_each)
      image = jnp.clip(jnp.searchsorted(jnp.asarray(ends), k, side="right"), 0, len(grids) - 1)
      offset = k - jnp.asarray(ends - n_each)[image]
      lh, lw, n = (jnp.asarray(a)[image] for a in (merged[:, 1], merged[:, 2], n_each))
    last = offset == n - 1
    advance = jnp.where(is_image, jnp.where(last, jnp.maximum(lh, lw), 0), 1) * mask
    base = jnp.cumsum(advance, axis=-1) - advance                          # exclusive: the token's start
    t_idx, rest = offset // (lh * lw), offset % (lh * lw)
    comps = [jnp.where(is_image, base + c, base) for c in (t_idx, rest // lw, rest % lw)]
    return jnp.where(mask[None], jnp.stack(comps), 0).astype(jnp.int32)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  # --- forward passes ---------------------------------------------------------------------
  def forward(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              attention_mask: jax.Array | None = None, image_grid_thw: Any = None
              ) -> tuple[jax.Array, dict[str, Any]]:
    """Logits plus named intermediates (`hidden`, `layer_inputs`) for distillation and calibration."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    positions = self.positions(input_ids, attention_mask, pixel_values, image_grid_thw)
    x = self.embed(input_ids, pixel_values, image_grid_thw)
    hidden, inputs, _ = self.language_model(x, attention_mask, positions)
    return self.logits(hidden), {"hidden": hidden, "layer_inputs": inputs}

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, image_grid_thw: Any = None) -> jax.Array:
    return self.forward(input_ids, pixel_values, attention_mask, image_grid_thw)[0]

  def decode_step(self, x: jax.Array, positions: jax.Array, cache: list[llama.Cache], cache_index: jax.Array,
                  cache_mask: jax.Array) -> tuple[jax.Array, list[llama.Cache]]:
    """Runs embeddings `x` through the decoder against a KV cache; returns logits and the new cache.

    `positions`: `[3, B, T]`, or `[B, T]` for text tokens (the same position on every component).
    """
    hidden, _, cache = self.language_model(x, None, positions, cache, cache_index, cache_mask)
    return self.logits(hidden), cache


def Model(config: Qwen25VLConfig | str, *, rngs: nnx.Rngs, **kw) -> Qwen25VL:
  """Factory in the big_vision style: a config or a variant name."""
  cfg = VARIANTS[config] if isinstance(config, str) else config
  return Qwen25VL(cfg, rngs=rngs, **kw)
