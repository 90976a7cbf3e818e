"""The image preprocessing a Hugging Face LLaVA checkpoint ships (`preprocessor_config.json`).

Every sab_jax model was trained and evaluated on images resized to the vision tower's
square (`pipeline.Preprocess.pixels`). A Hugging Face LLaVA was trained with CLIP's
processor instead: resize the shortest edge to `size`, center-crop to `crop_size`,
rescale, normalize. `ClipImageProcessor` does the same steps in numpy + Pillow as
transformers' Pillow backend does, so `sab_jax.ask` feeds such a checkpoint the pixels
it expects without importing transformers (or torch).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from sab_jax.errors import UserError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Processor types that are CLIP's recipe (LLaVA-1.5 ships CLIPImageProcessor).
CLIP_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")


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
    path = os.path.join(path, PREPROCESSOR_CONFIG) if os.path.isdir(path) else path
    try:
      with open(path) as f:
        c = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); restore the "
                      f"checkpoint's {PREPROCESSOR_CONFIG}") from None
    kind = c.get("image_processor_type") or c.get("feature_extractor_type") or "CLIPImageProcessor"
    if kind not in CLIP_TYPES:
      raise UserError(f"{path}: image_processor_type {kind!r} is not supported; sab_jax implements "
                      f"CLIPImageProcessor (LLaVA-1.5's)")
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
