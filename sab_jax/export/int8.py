"""int8 params of an export (`export(int8_params=[regex, ...])`, for embeddings and the head).

Symmetric absmax with one bf16 scale per row. A Dense kernel `[in, out]` (e.g.
`lm_head.kernel`, `[embed, vocab]`) gets one scale per OUTPUT channel (absmax over axis 0,
scales `[1, out]`), so each logit has its own scale; every other param one per row of its
last axis (absmax over the last axis: a `[vocab, embed]` table gets one scale per
vocabulary row, `[vocab, 1]`; a vector one scale). `scale = bf16(absmax / 127)` (nearest),
`q = clip(rint(x / scale), -127, 127)`, value = `float32(q) · float32(scale)`. Error per
entry ≤ absmax/254 · (1 + 2⁻⁸): the bf16 rounding of the scale is what the 2⁻⁸ pays for
(no bf16 scale can guarantee absmax/254 exactly).

The export keeps them out of the state's `params` tree (in `int8_params` / `int8_scales`)
so that a reader that predates int8 params refuses the export (missing params) instead of
loading int8 codes as values. The manifest records each such param with dtype "int8" and
its scale part.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sab_jax.export.manifest import PARAM_DTYPE

INT8_DTYPE = np.int8
SCALE_DTYPE = PARAM_DTYPE
_INT8_MAX = 127
_INT8_CHUNK = 4096  # rows quantized at a time: bounds the float32 temporaries of big tables


def int8_axis(path: str, shape: Sequence[int], kernels: set[str]) -> int:
  """The axis an int8 param's absmax runs over.

  Args:
    path: the param's dotted path.
    shape: its shape.
    kernels: the dotted paths of the model's Dense kernels.

  Returns:
    0 for a Dense kernel `[in, out]` in `kernels` (one scale per output channel), else the
    last axis (one scale per row).
  """
  return 0 if path in kernels and len(shape) == 2 else len(shape) - 1


def quantize_int8(x: Any, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric absmax int8 with bf16 scales over `axis`.

  Args:
    x: the values (any float dtype numpy can convert), at least 1-D.
    axis: the axis the absmax runs over (`int8_axis`).

  Returns:
    (int8 codes of `x.shape`, bf16 scales of `x.shape` with `axis` set to 1).

  Raises:
    ValueError: for a 0-D `x` or non-finite values.
  """
  x = np.asarray(x)
  if x.ndim == 0:
    raise ValueError("int8 params need at least one dimension")
  q = np.empty(x.shape, INT8_DTYPE)
  scale_shape = list(x.shape)
  scale_shape[axis] = 1
  scale = np.empty(scale_shape, SCALE_DTYPE)
  # Views with the reduced axis last; chunks of their leading axis bound the temporaries.
  xt, qt, st = (np.moveaxis(a, axis, -1) for a in (x, q, scale))
  if x.ndim == 1:
    xt, qt, st = xt[None], qt[None], st[None]
  for i in range(0, xt.shape[0], _INT8_CHUNK):
    xc = np.asarray(xt[i:i + _INT8_CHUNK], np.float32)
    if not np.all(np.isfinite(xc)):
      raise ValueError("int8 params must be finite")
    s = (np.max(np.abs(xc), axis=-1, keepdims=True) / _INT8_MAX).astype(SCALE_DTYPE)
    s32 = s.astype(np.float32)
    qc = np.rint(xc / np.where(s32 > 0, s32, 1.0))
    qt[i:i + _INT8_CHUNK] = np.clip(qc, -_INT8_MAX, _INT8_MAX).astype(INT8_DTYPE)
    st[i:i + _INT8_CHUNK] = s
  return q, scale


def dequantize_int8(q: Any, scale: Any) -> np.ndarray:
  """`float32(q) · float32(scale)` (scale broadcasts over the reduced axis)."""
  return np.asarray(q).astype(np.float32) * np.asarray(scale).astype(np.float32)
