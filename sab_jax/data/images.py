"""The image preprocessing a Hugging Face checkpoint ships (`preprocessor_config.json`).

Every sab_jax model was trained and evaluated on images resized to the vision tower's
square (`pipeline.Preprocess.pixels`). A Hugging Face LLaVA was trained with CLIP's
processor instead: resize the shortest edge to `size`, center-crop to `crop_size`,
rescale, normalize. `ClipImageProcessor` does the same steps in numpy + Pillow as
transformers' Pillow backend does, so `sab_jax.ask` feeds such a checkpoint the pixels
it expects without importing transformers (or torch).

Qwen2-VL and Qwen2.5-VL see images at (nearly) their own size instead: `smart_resize` picks the
closest height and width that are multiples of patch_size * merge_size with a pixel count in
[min_pixels, max_pixels], and `QwenImageProcessor` cuts the normalized image into flat patches
in the order their vision tower merges them (transformers' Pillow backend, step for step).
`processor_for` reads a checkpoint's `image_processor_type` and returns the matching one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from sab_jax.errors import UserError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Processor types that are CLIP's recipe (LLaVA-1.5 ships CLIPImageProcessor).
CLIP_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")
# Processor types that are Qwen2-VL's recipe (Qwen2.5-VL ships Qwen2VLImageProcessor too).
QWEN_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
SUPPORTED = "CLIPImageProcessor (LLaVA-1.5's) and Qwen2VLImageProcessor (Qwen2-VL's and Qwen2.5-VL's)"
# OpenAI CLIP's normalization: Qwen2VLImageProcessor's defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _read_config(path: str) -> tuple[str, dict, str]:
  """(file, its JSON, its processor type) of a `preprocessor_config.json` or its directory."""
  path = os.path.join(path, PREPROCESSOR_CONFIG) if os.path.isdir(path) else path
  try:
    with open(path) as f:
      c = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); restore the "
                    f"checkpoint's {PREPROCESSOR_CONFIG}") from None
  if not isinstance(c, dict):
    raise UserError(f"{path} holds {type(c).__name__}, not a JSON object; restore the checkpoint's "
                    f"{PREPROCESSOR_CONFIG}")
  # Older checkpoints say feature_extractor_type; LLaVA-1.5's says CLIP's, so that is the default.
  return path, c, c.get("image_processor_type") or c.get("feature_extractor_type") or "CLIPImageProcessor"


def _refuse(path: str, kind: str) -> UserError:
  return UserError(f"{path}: image_processor_type {kind!r} is not supported; sab_jax implements {SUPPORTED}")


def _size(value: Any, what: str, path: str) -> dict[str, int]:
  """A size as transformers writes it: an int (CLIP: the shortest edge, or a square crop) or a dict."""
  if isinstance(value, int):
    return {"shortest_edge": value} if what == "size" else {"height": value, "width": value}
  if isinstance(value, Mapping):
    if set(value) == {"shortest_edge"} or set(value) == {"height", "width"}:
      return {k: int(v) for k, v in value.items()}
  raise UserError(f"{path}: {what}={value!r} is not supported: expected an int, {{'shortest_edge': N}} or "
                  f"{{'height': H, 'width': W}} (CLIP's forms)")


class ClipImageProcessor:
  """transformers' CLIPImageProcessor in numpy: `processor(uint8 [H, W, 3])` -> float32 `[h, w, 3]`.

  Args mirror the JSON fields (`from_file` reads them): size (shortest edge or height/width),
  crop_size (height/width), resample (a PIL filter number; 3 = bicubic), rescale_factor,
  image_mean / image_std (per channel, of rescaled pixels), and the do_* switches.
  """

  def __init__(self, *, size: Mapping[str, int], crop_size: Mapping[str, int], resample: int = 3,
               rescale_factor: float = 1 / 255, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
               image_std: Sequence[float] = (0.5, 0.5, 0.5), do_resize: bool = True, do_center_crop: bool = True,
               do_rescale: bool = True, do_normalize: bool = True):
    self.size, self.crop_size = dict(size), dict(crop_size)
    self.resample = Image.Resampling(int(resample))
    self.rescale_factor = float(rescale_factor)
    self.mean = np.asarray(image_mean, np.float32)
    self.std = np.asarray(image_std, np.float32)
    self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
    self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)

  @classmethod
  def from_file(cls, path: str) -> ClipImageProcessor:
    """Reads a `preprocessor_config.json` (or the checkpoint directory holding one)."""
    path, c, kind = _read_config(path)
    if kind not in CLIP_TYPES:
      raise _refuse(path, kind)
    keys = ("resample", "rescale_factor", "image_mean", "image_std", "do_resize", "do_center_crop", "do_rescale",
            "do_normalize")
    return cls(size=_size(c.get("size", 224), "size", path), crop_size=_size(c.get("crop_size", 224), "crop_size",
                                                                            path),
               **{k: c[k] for k in keys if c.get(k) is not None})

  def _resized(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if "shortest_edge" in self.size:
      short, long = (w, h) if w <= h else (h, w)
      new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
      new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    else:
      new_h, new_w = self.size["height"], self.size["width"]
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=self.resample))

  def _cropped(self, image: np.ndarray) -> np.ndarray:
    """The center crop; an image smaller than the crop is first zero-padded around (as transformers does)."""
    ch, cw = self.crop_size["height"], self.crop_size["width"]
    h, w = image.shape[:2]
    if ch > h or cw > w:
      ph, pw = -(-max(ch - h, 0) // 2), -(-max(cw - w, 0) // 2)
      padded = np.zeros((max(h, ch), max(w, cw), image.shape[2]), image.dtype)
      padded[ph:ph + h, pw:pw + w] = image
      top, left = (h - ch) // 2 + ph, (w - cw) // 2 + pw
      image = padded
    else:
      top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]

  def __call__(self, image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image, np.uint8)
    if self.do_resize:
      image = self._resized(image)
    if self.do_center_crop:
      image = self._cropped(image)
    x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image.astype(np.float64)
    x = x.astype(np.float32)
    return (x - self.mean) / self.std if self.do_normalize else x


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Qwen2-VL's target (height, width): multiples of `factor`, about the same aspect ratio and
  a pixel count in [min_pixels, max_pixels] (transformers' and qwen-vl-utils' rule).

  Each edge is rounded to the nearest multiple (Python's round: halves to even); if that leaves
  too many (too few) pixels, both edges are scaled by one factor, rounded down (up) to multiples.
  """
  if min(height, width) <= 0 or max(height, width) > 200 * min(height, width):
    raise UserError(f"a {height}x{width} image cannot be resized for Qwen2-VL: the aspect ratio must be "
                    f"under 200 (and both edges positive)")
  h, w = round(height / factor) * factor, round(width / factor) * factor
  if h * w > max_pixels:
    shrink = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / shrink / factor) * factor)
    w = max(factor, math.floor(width / shrink / factor) * factor)
  elif h * w < min_pixels:
    grow = math.sqrt(min_pixels / (height * width))
    h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
  return h, w


def _pixel_range(c: Mapping[str, Any], path: str) -> tuple[int, int]:
  """(min_pixels, max_pixels): top-level fields win over `size` (as in transformers)."""
  size = c.get("size") or {}
  if not isinstance(size, Mapping):
    raise UserError(f"{path}: size={size!r} is not supported: Qwen2-VL's is {{'shortest_edge': MIN_PIXELS, "
                    f"'longest_edge': MAX_PIXELS}} (or top-level min_pixels / max_pixels)")
  low = c.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
  high = c.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
  return int(low), int(high)


class QwenImageProcessor:
  """transformers' Qwen2VLImageProcessor (Pillow backend) in numpy.

  `processor(uint8 [H, W, 3] or a list of them)` -> `(pixel_values, image_grid_thw)`:
  float32 `[num_patches, C * temporal_patch_size * patch_size**2]` (every image's patches, one
  image after the other) and int64 `[num_images, 3]` rows (t, h, w) in patches. An image is one
  frame, repeated temporal_patch_size times in each patch (so t = 1). Patches come in the
  vision tower's merge order: merge_size x merge_size blocks row-major, and row-major within a
  block; each flattens as (channel, time, row, column).

  Args mirror the JSON fields (`from_file` reads them); min_pixels / max_pixels bound the
  resized image's pixel count, resample is a PIL filter number (3 = bicubic).
  """

  def __init__(self, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
               temporal_patch_size: int = 2, merge_size: int = 2, resample: int = 3, rescale_factor: float = 1 / 255,
               image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
               do_resize: bool = True, do_rescale: bool = True, do_normalize: bool = True):
    sizes = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch_size,
             "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or int(v) != v or v <= 0}
    if bad or min_pixels > max_pixels:
      raise UserError(f"Qwen2-VL image processor: {bad or sizes} must be positive integers with min_pixels <= "
                      f"max_pixels")
    self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
    self.patch_size, self.temporal_patch_size, self.merge_size = int(patch_size), int(temporal_patch_size), int(
        merge_size)
    self.resample = Image.Resampling(int(resample))
    self.rescale_factor = float(rescale_factor)
    self.mean = np.asarray(image_mean, np.float32)
    self.std = np.asarray(image_std, np.float32)
    self.do_resize, self.do_rescale, self.do_normalize = bool(do_resize), bool(do_rescale), bool(do_normalize)

  @classmethod
  def from_file(cls, path: str) -> QwenImageProcessor:
    """Reads a `preprocessor_config.json` (or the checkpoint directory holding one)."""
    path, c, kind = _read_config(path)
    if kind not in QWEN_TYPES:
      raise _refuse(path, kind)
    min_pixels, max_pixels = _pixel_range(c, path)
    keys = ("patch_size", "temporal_patch_size", "merge_size", "resample", "rescale_factor", "image_mean",
            "image_std", "do_resize", "do_rescale", "do_normalize")
    try:
      return cls(min_pixels=min_pixels, max_pixels=max_pixels, **{k: c[k] for k in keys if c.get(k) is not None})
    except UserError as e:
      raise UserError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
      raise UserError(f"{path}: a field has the wrong type or value ({type(e).__name__}: {e})") from None

  @property
  def factor(self) -> int:
    """Edges are resized to multiples of this: one merged token covers factor x factor pixels."""
    return self.patch_size * self.merge_size

  def num_tokens(self, image_grid_thw: np.ndarray) -> list[int]:
    """Image tokens of each image in the language model's prompt (patches / merge_size**2)."""
    return [int(np.prod(g)) // self.merge_size ** 2 for g in np.asarray(image_grid_thw).reshape(-1, 3)]

  def _patches(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {image.shape}")
    if self.do_resize:
      h, w = smart_resize(image.shape[0], image.shape[1], self.factor, self.min_pixels, self.max_pixels)
      image = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample))
    h, w = image.shape[:2]
    if h % self.factor or w % self.factor:
      raise ValueError(f"a {h}x{w} image is not a multiple of patch_size * merge_size = {self.factor}; "
                       f"do_resize=false needs images of such sizes")
    x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
    x = x.astype(np.float32)
    if self.do_normalize:
      x = (x - self.mean) / self.std
    p, m, t, c = self.patch_size, self.merge_size, self.temporal_patch_size, x.shape[2]
    gh, gw = h // p, w // p
    # [H, W, C] -> (block row, row in block, pixel row, block column, column in block, pixel column, C)
    x = x.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    # -> (block row, block column, row in block, column in block, C, time, pixel row, pixel column)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
    return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)

  def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = [images]
    if len(images) == 0:
      raise ValueError("no images to preprocess")
    patches, grids = zip(*(self._patches(image) for image in images))
    return np.concatenate(patches, axis=0), np.asarray(grids, np.int64)


def processor_for(path: str, cfg: Any = None) -> ClipImageProcessor | QwenImageProcessor | None:
  """The processor a checkpoint's `preprocessor_config.json` (or its directory) names; other types
  and unreadable files are refused with a UserError naming the file and what is supported.

  With the model's config (`cfg.vision`, as `sab_jax.ask` passes it): a checkpoint without the
  file gives None (the caller falls back to the vision tower's square), and a processor that
  does not fit the vision tower (CLIP's crop vs image_size; Qwen's patch, merge and temporal
  sizes) is refused rather than feeding it pixels it was not trained on.
  """
  file = os.path.join(path, PREPROCESSOR_CONFIG) if os.path.isdir(path) else path
  if cfg is not None and not os.path.exists(file):
    return None
  file, _, kind = _read_config(file)
  if kind in CLIP_TYPES:
    processor = ClipImageProcessor.from_file(file)
  elif kind in QWEN_TYPES:
    processor = QwenImageProcessor.from_file(file)
  else:
    raise _refuse(file, kind)
  if cfg is not None:
    _check_fits(processor, cfg.vision, file)
  return processor


def _check_fits(processor: ClipImageProcessor | QwenImageProcessor, vision: Any, file: str) -> None:
  dynamic = hasattr(vision, "spatial_merge_size")  # Qwen2.5-VL's tower takes patches of any grid
  if isinstance(processor, ClipImageProcessor):
    if dynamic:
      raise UserError(f"{file} is CLIP's processor, but the model's vision tower is Qwen2-VL's (dynamic "
                      f"resolution): restore the checkpoint's own {PREPROCESSOR_CONFIG}")
    crop = (processor.crop_size["height"], processor.crop_size["width"]) if processor.do_center_crop else None
    if crop is not None and crop != (vision.image_size,) * 2:
      raise UserError(f"{file} crops to {crop}, the vision tower takes {vision.image_size}x{vision.image_size} "
                      f"images")
    return
  if not dynamic:
    raise UserError(f"{file} is Qwen2-VL's processor (dynamic resolution), but the model's vision tower takes "
                    f"fixed-size images: restore the checkpoint's own {PREPROCESSOR_CONFIG}")
  ours = (processor.patch_size, processor.merge_size, processor.temporal_patch_size)
  tower = (vision.patch_size, vision.spatial_merge_size, getattr(vision, "temporal_patch_size", ours[2]))
  if ours != tower:
    raise UserError(f"{file}: patch_size, merge_size, temporal_patch_size = {ours}, but the vision tower's are "
                    f"{tower}")
