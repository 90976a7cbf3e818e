"""The salient-row layout BiLLM, ARB-RC and SAB share, and the GPTQ loop that fills it.

Per block of input channels (GPTQ's `block_size`; `scale_block` in the structured
variant), the salient rows get a 1st-order plane plus a 2nd-order residual plane, the
other rows one plane, split by |W| into two groups where `split` (BiLLM's bell-shaped
split, stored as a per-weight bitmap). With `salient_groups` the salient rows' entries
are split in two as well (ARB-LLM's `--order2_group`; the same bitmap, read on the
salient rows), each group with its own pair of planes' scales. `mode` "rc": `α_in[j]·B·α_out[k]` (ARB-RC);
"mean_offset": `α_out[k]·B + μ[k]` (BiLLM). The block quantizers are in
`core.binarize_core`; this file owns the resulting typed parts.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.quant.core import binarize_core, bits_core, gptq_core
from sab_jax.quant.providers import base

# Parts indexed by input row (leading axis `in`); the others are per scale group.
_ROW_PARTS = ("signs", "residual_signs", "salient_rows", "group_hi", "alpha_in")
MODES = ("rc", "mean_offset")


def _rows(flags: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return np.broadcast_to(np.asarray(flags, bool).reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def _layout(arrays: Mapping[str, Any]) -> tuple[bool, bool]:
  """(split, salient_groups), read off alpha_out (stored dense, so also when the other
  parts are still compacted)."""
  return binarize_core.salient_layout(arrays["alpha_out"].shape[-2], arrays.get("alpha_in") is not None)


def _alpha_in_read(salient_rows: Any, slots: int, split: bool) -> np.ndarray:
  """`[in, slots]` the alpha_in entries the layout reads: slot 0 on every row, slot 1 on
  every row with the split (else the salient rows), slots 2, 3 on the salient rows."""
  sal = np.asarray(salient_rows, bool)
  every = np.ones_like(sal)
  return np.stack([every, every if split else sal] + [sal] * (slots - 2), axis=1)


@base.parts_dataclass(meta=("group", "mode"))
class SalientSplitParts(base.Parts):
  """Parts of a salient-row layout; G = ceil(in / group) scale groups, C components.

  signs [in,out] bool           first-order sign (True = +1) of every entry
  residual_signs [in,out] bool  2nd-order residual sign, False off the salient rows
  salient_rows [in] bool        rows with a residual plane
  alpha_out [G,C,out] bf16      C = (order1, order2, rest | lo, [hi], [order1', order2']):
                                3, +1 with the split, +2 with salient groups
  alpha_in [in,S] bf16          ("rc") slot 0: order1 / lo / rest, slot 1: order2 / hi
                                (1.0 off the salient rows without the split); S = 4 with
                                salient groups: slots 2, 3 order1' / order2' (salient rows)
  mu [G,C,out] bf16             ("mean_offset") per-component offsets
  group_hi [in,out] bool        the per-weight group bitmap: the split's |W| > t on the other
                                rows (False there without it), the salient groups' high
                                group on the salient rows (False without them); None: neither
  group, mode                   rows per scale group (static), "rc" or "mean_offset"
  """
  signs: Any
  residual_signs: Any
  salient_rows: Any
  alpha_out: Any
  alpha_in: Any = None
  mu: Any = None
  group_hi: Any = None
  group: int = 128
  mode: str = "rc"

  @property
  def split(self) -> bool:
    return _layout(self.arrays())[0]

  @property
  def salient_groups(self) -> bool:
    return _layout(self.arrays())[1]

  def expected(self):
    n_in, n_out = self.shape
    g = math.ceil(n_in / self.group)
    if self.mode not in MODES:
      raise ValueError(f"unknown mode {self.mode!r}; one of {MODES}")
    if self.mode == "mean_offset" and self.alpha_in is not None:
      raise ValueError("mode 'mean_offset' has no alpha_in")
    split, groups = _layout(self.arrays())
    c = 3 + split + 2 * groups
    out = {"signs": ((n_in, n_out), np.bool_), "residual_signs": ((n_in, n_out), np.bool_),
           "salient_rows": ((n_in,), np.bool_), "alpha_out": ((g, c, n_out), jnp.bfloat16)}
    if self.mode == "rc":
      out["alpha_in"] = ((n_in, 4 if groups else 2), jnp.bfloat16)
    else:
      out["mu"] = ((g, c, n_out), jnp.bfloat16)
    if split or groups:
      out["group_hi"] = ((n_in, n_out), np.bool_)
    return out

  def dequantize(self) -> jax.Array:
    return base.dequantize_blocks(self.arrays(), lambda p: binarize_core.compose_salient_split(p, self.mode),
                                  n_in=self.shape[0], block_size=self.group, row_parts=_ROW_PARTS)

  @classmethod
  def storage(cls, arrays: Mapping[str, Any]) -> dict[str, base.SparseRule]:
    """residual_signs: the salient rows' entries; group_hi: the other rows' entries (the
    split), the salient rows' (salient groups), or all; alpha_in: `_alpha_in_read`."""
    sal = lambda a, s: _rows(a["salient_rows"], s)
    split, groups = _layout(arrays)
    rules = {"residual_signs": (sal, False)}
    if split != groups:
      rules["group_hi"] = ((lambda a, s: ~sal(a, s), False) if split else (sal, False))
    if "alpha_in" in arrays and not (split and not groups):
      rules["alpha_in"] = (lambda a, s: _alpha_in_read(a["salient_rows"], s[1], split), 1.0)
    return rules

  def planes(self, *, one_lhs: bool = False) -> list[base.PlaneSource] | None:
    """ARB-RC without the split (the structured layout), per scale group g:
      rest rows:    α_in0 · B1 · α_out[g, 2]
      salient rows: α_in0 · B1 · α_out[g, 0] + α_in1 · B2 · α_out[g, 1]
    = plane B1 with two row-scale sets (α_in0 on rest rows -> α_out2, on salient rows ->
    α_out0) plus plane B2 over the salient rows only -> α_out1.

    `one_lhs`: one row-scale set per plane, which unpacks each sign once per product:
    B1 (α_in0, all rows) -> α_out2, B1 over the salient rows -> α_out0 - α_out2, B2 as above
    (1.25·K rows instead of 2.125·K, for 11% more bits: the salient rows' B1 twice).
    The per-weight group bitmap and BiLLM's offsets are not covered (None).
    """
    if self.mode != "rc" or self.group_hi is not None:
      return None
    n_in = self.shape[0]
    sal = np.asarray(self.salient_rows, bool)
    a_in = np.asarray(self.alpha_in, np.float32)
    a_out = np.asarray(self.alpha_out, np.float32)  # [G, 3, out]
    all_rows = [np.arange(s, min(s + self.group, n_in)) for s in range(0, n_in, self.group)]
    sal_rows = [r[sal[r]] for r in all_rows]
    signs, residual = np.asarray(self.signs), np.asarray(self.residual_signs)
    p2 = base.PlaneSource(residual, sal_rows, [a_in[:, 1]], [a_out[:, 1]])
    if one_lhs:
      return [base.PlaneSource(signs, all_rows, [a_in[:, 0]], [a_out[:, 2]]),
              base.PlaneSource(signs, sal_rows, [a_in[:, 0]], [a_out[:, 0] - a_out[:, 2]]), p2]
    return [base.PlaneSource(signs, all_rows, [a_in[:, 0] * ~sal, a_in[:, 0] * sal], [a_out[:, 2], a_out[:, 0]]),
            p2]

  # --- quantization-aware form -----------------------------------------------------------
  @classmethod
  def _terms(cls, meta, scales, masks, n_in):
    """(first scale, first offset, second scale, second offset), each `[in, out]`."""
    group, rc = meta["group"], meta["mode"] == "rc"
    a_out = scales["alpha_out"]                                   # [G, C, out]
    split, groups = _layout(scales)
    n_comp = a_out.shape[1]
    sal = base.blocks_of(masks["salient_rows"], group)[..., None]  # [G, group, 1]
    hi = base.blocks_of(masks["group_hi"], group) if "group_hi" in masks else None
    if rc:
      a_in = base.blocks_of(scales["alpha_in"], group)             # [G, group, S]
      scale = lambda slot, c: a_in[..., slot:slot + 1] * a_out[:, None, c, :]
    else:
      scale = lambda slot, c: jnp.broadcast_to(a_out[:, None, c, :], sal.shape[:2] + a_out.shape[-1:])
    rest = scale(0, 2)
    if split:
      rest = jnp.where(hi, scale(1, 3), rest)
    first_sal, second_sal = scale(0, 0), scale(1, 1)
    if groups:
      first_sal = jnp.where(hi, scale(2, n_comp - 2), first_sal)
      second_sal = jnp.where(hi, scale(3, n_comp - 1), second_sal)
    first = jnp.where(sal, first_sal, rest)
    second = jnp.where(sal, second_sal, 0.0)
    crop = lambda t: base.rows_of(t, n_in)
    if rc:
      return crop(first), 0.0, crop(second), 0.0
    mu = scales["mu"]
    off = lambda c: jnp.broadcast_to(mu[:, None, c, :], first.shape)
    off_rest = off(2) if not split else jnp.where(hi, off(3), off(2))
    return crop(first), crop(jnp.where(sal, off(0), off_rest)), crop(second), crop(jnp.where(sal, off(1), 0.0))

  def qat_init(self) -> base.QatState:
    scales = {"alpha_out": np.asarray(self.alpha_out, np.float32)}
    scales.update({"alpha_in": np.asarray(self.alpha_in, np.float32)} if self.mode == "rc"
                  else {"mu": np.asarray(self.mu, np.float32)})
    masks = {"salient_rows": np.asarray(self.salient_rows, bool)}
    if self.group_hi is not None:
      masks["group_hi"] = np.asarray(self.group_hi, bool)
    first, _, second, _ = self._terms(self.meta(), {k: jnp.asarray(v) for k, v in scales.items()},
                                      {k: jnp.asarray(v) for k, v in masks.items()}, self.shape[0])
    latent = base.two_plane_latent(self.signs, np.asarray(first), self.residual_signs, np.asarray(second))
    return base.QatState(latent=latent, scales=scales, masks=masks)

  @classmethod
  def qat_weight(cls, meta, latent, scales, masks, sign, clip):
    first, first_off, second, second_off = cls._terms(meta, scales, masks, latent.shape[0])
    return base.two_plane_weight(latent, first, second, sign, clip, first_offset=first_off,
                                 second_offset=second_off)

  @classmethod
  def from_qat(cls, meta, latent, scales, masks):
    w = jnp.asarray(latent, jnp.float32)
    s1 = jnp.where(w >= 0, 1.0, -1.0)
    sal = np.asarray(masks["salient_rows"], bool)
    stored = {k: base.bf16(v) for k, v in scales.items()}
    if "alpha_in" in stored:  # the layout's fill (1.0) where it reads no alpha_in
      a_in = np.asarray(scales["alpha_in"], np.float32)
      a_in = np.where(_alpha_in_read(sal, a_in.shape[1], _layout(scales)[0]), a_in, 1.0)
      stored["alpha_in"] = base.bf16(a_in)
    # the residual sign against the first-order term built from the stored (rounded) scales
    first, _, _, _ = cls._terms(meta, {k: jnp.asarray(v, jnp.float32) for k, v in stored.items()},
                                {k: jnp.asarray(v) for k, v in masks.items()}, w.shape[0])
    residual = np.asarray((w - s1 * first) >= 0) & sal[:, None]
    return cls(signs=np.asarray(s1 > 0), residual_signs=residual, salient_rows=sal,
               group_hi=np.asarray(masks["group_hi"]) if "group_hi" in masks else None, **stored, **meta)


# --- the GPTQ loop ------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("block_size", "n_salient", "iters", "mode", "split",
                                             "group_size", "refine", "salient_groups", "layer_budget"))
def _salient_split_ptq(kernel, h, weight, budget, *, block_size, n_salient, iters, mode, split, group_size, refine,
                       salient_groups, layer_budget):
  u = gptq_core.hessian_inverse_cholesky(h)
  # Each group's (block's) salient-row count: fixed, or its share of the layer-wide budget (the
  # rows a residual plane helps most, judged on the uncompensated kernel; which rows of the
  # group get them is decided on the compensated weights when GPTQ reaches the group).
  # (`budget` is traced: layers with different totals share one program)
  every = jnp.ones((kernel.shape[0],), bool)
  share = binarize_core.allocate_salient_rows(kernel, weight, jnp.diag(u), every, budget) if layer_budget else every
  if group_size is not None:
    def prepare(w_grp, d, valid, weight_grp, share_grp):
      count = jnp.sum(share_grp) if layer_budget else n_salient
      return binarize_core.structured_prepare(w_grp, weight_grp, d, valid, n_salient=count, iters=iters)

    def structured_block(w_blk, d, valid, weight_blk, share_blk, *, state, offset):
      return binarize_core.structured_block(w_blk, weight_blk, d, valid, state=state,
                                            offset=offset)

    _, parts, state = gptq_core.gptq_quantize(
        kernel, u, structured_block, block_size=block_size, aux=(weight, share),
        group_size=group_size, prepare_group=prepare)
    return dict(parts, alpha_out=state["alpha_out"])

  def quantize_block(w_blk, d, valid, weight_blk, share_blk):
    return binarize_core.salient_split_block(
        w_blk, weight_blk, d, valid, n_salient=jnp.sum(share_blk & valid) if layer_budget else n_salient,
        iters=iters, mode=mode, split=split, refine=refine, salient_groups=salient_groups)

  _, parts, _ = gptq_core.gptq_quantize(kernel, u, quantize_block, block_size=block_size,
                                        aux=(weight, share))
  return parts


# The structured layout's salient-row budget when `salient_rows="search"` (its rows are
# chosen per scale group, which the per-block search does not cover).
STRUCTURED_SALIENT_ROWS = 0.08


def salient_count(salient_rows: float | str, group: int, *, structured: bool) -> int | None:
  """Salient rows per block (or scale group) of a `salient_rows` setting; None: searched per block."""
  if salient_rows == "search" and structured:
    salient_rows = STRUCTURED_SALIENT_ROWS
  if salient_rows == "search":
    return None
  if isinstance(salient_rows, (int, float)) and not isinstance(salient_rows, bool) and 0 < salient_rows <= 1:
    return max(1, min(group, round(salient_rows * group)))
  raise ValueError(f"salient_rows={salient_rows!r}: 'search' or a fraction in (0, 1]")


def salient_split_ptq(kernel: jax.Array, h: jax.Array, weight: jax.Array, *, block_size: int,
                      salient_rows: float | str, iters: int, mode: str, split: bool,
                      scale_block: int | None = None, refine: int = 0, salient_groups: bool = False,
                      salient_budget: str = "group", salient_total: int | None = None
                      ) -> tuple[jax.Array, SalientSplitParts, bits_core.BitCount]:
  """GPTQ loop around the salient-row block quantizers of `binarize_core`.

  Args:
    kernel: `[in, out]`.
    h: `[in, in]` Hessian used for compensation and the salient-row ranking.
    weight: `[in, out]` error weights of the ALS (Λ^p or ones).
    block_size: inputs per GPTQ block; also the salient-row budget and alpha_out sharing
      unless `scale_block` is given.
    salient_rows: "search": per block, the count `binarize_core.search_salient_count`
      picks (as BiLLM and ARB-LLM search it; structured mode: STRUCTURED_SALIENT_ROWS);
      or the fraction of each block's (or scale block's) inputs that get a residual
      plane, `round(salient_rows · rows)` rows (at least 1).
    iters: ARB-RC sweeps.
    mode: "rc" or "mean_offset".
    split: bell-shaped split of the non-salient rows.
    scale_block: structured mode (mode "rc", no split): salient rows and alpha_out are
      chosen per `scale_block` inputs (a multiple of `block_size`), alpha_in per row.
    refine: joint refinement sweeps of the salient rows' planes ("rc" mode, not structured).
    salient_groups: split the salient rows' entries into two groups with their own scales
      (ARB-LLM's `--order2_group`; "rc" mode, not structured).
    salient_budget: structured mode: "group", the same salient-row count in every scale
      group, or "layer", the same total allocated across the groups by
      `binarize_core.allocate_salient_rows` (the rows a residual plane helps most).
    salient_total: the layer's salient rows in total, placed where a residual plane helps
      most (`binarize_core.allocate_salient_rows`; a whole-model allocation,
      `model_salient_budget`): structured mode with salient_budget "layer" (instead of the
      fixed layout's total), or the unstructured layout (instead of the per-block count).
    Sizes above the layer's are clamped (`base.effective_blocks`).

  Returns:
    (Ŵ rebuilt from the parts, the parts, bit count).
  """
  n_in, n_out = kernel.shape
  if scale_block is not None and (mode != "rc" or split):
    raise ValueError("scale_block (structured mode) needs mode='rc' and split=False")
  block_size, group = base.effective_blocks(n_in, block_size, scale_block)
  n_salient = salient_count(salient_rows, group, structured=scale_block is not None)
  if refine and (mode != "rc" or scale_block is not None):
    raise ValueError("refine (joint 2nd-order refinement) is for ARB-RC's unstructured layout (mode 'rc')")
  if salient_groups and (mode != "rc" or scale_block is not None):
    raise ValueError("salient_groups is for ARB-RC's unstructured layout (mode 'rc')")
  if salient_budget not in ("group", "layer"):
    raise ValueError(f"salient_budget={salient_budget!r}: 'group' or 'layer'")
  budget = None
  if salient_total is not None and scale_block is not None and salient_budget != "layer":
    raise ValueError("salient_total replaces a structured layer's budget: it needs salient_budget='layer'")
  if salient_total is not None:
    budget = min(int(salient_total), n_in)
  elif salient_budget == "layer" and scale_block is not None:
    budget = sum(min(n_salient, r) for r in bits_core.block_rows(n_in, group))  # the fixed layout's total
  arrays = _salient_split_ptq(kernel, h, weight, jnp.int32(0 if budget is None else budget), block_size=block_size,
                              n_salient=n_salient, iters=iters, mode=mode, split=split,
                              group_size=None if scale_block is None else group, refine=refine,
                              salient_groups=salient_groups, layer_budget=budget is not None)
  parts = SalientSplitParts(**base.crop_rows(arrays, n_in, _ROW_PARTS), group=group, mode=mode)
  w_hat = base.dequantize(parts)
  rows = bits_core.block_rows(n_in, group)
  sal = jax.device_get(parts.salient_rows)
  per_block = [int(sal[i * group:i * group + r].sum()) for i, r in enumerate(rows)]
  bits = bits_core.salient_split_bits(n_in, n_out, block_rows=rows, salient_per_block=per_block,
                                      mode=mode, split=split, salient_groups=salient_groups)
  return w_hat, parts, bits


# One program per layer shape (eagerly, each of its dozen array ops compiled one of its own).
_residual_plane_gain = jax.jit(binarize_core.residual_plane_gain)


def model_salient_budget(layers: Mapping[str, tuple[jax.Array, jax.Array]], *, block_size: int,
                         scale_block: int | None, salient_rows: float | str, salient_groups: bool = False
                         ) -> dict[str, int]:
  """Each layer's salient-row total, allocated over the whole model.

  Every layer's fixed budget (`salient_rows` per scale group, or per block in the
  unstructured layout) is priced in stored bits; the model's sum is then spent again on the
  rows whose residual plane lowers the loss most per stored bit:
  `binarize_core.residual_plane_gain` under the loss weight of each entry (a comparable unit
  in every layer) over the row's cost, out residual signs + its extra alpha_in (1; 3 with
  salient groups) + its position. The linear cost bounds the layout's (the positions' cost is
  concave), so the model stores at most the bits of the per-layer allocation.

  Args:
    layers: path -> (full-precision kernel `[in, out]`, loss weight `[in, out]`).
    block_size, scale_block, salient_rows, salient_groups: the layout's (as
      `salient_split_ptq`; scale_block None: unstructured, `salient_rows` a fraction).

  Returns:
    path -> salient rows of that layer.
  """
  gains, costs, owners, budget_bits = [], [], [], 0.0
  paths = sorted(layers)
  for i, p in enumerate(paths):
    w, weight = layers[p]
    n_in, n_out = w.shape
    _, group = base.effective_blocks(n_in, block_size, scale_block)
    count = salient_count(salient_rows, group, structured=scale_block is not None)
    if count is None:
      raise ValueError("a whole-model salient budget needs a fixed salient_rows fraction to price (not 'search')")
    n_fixed = sum(min(count, r) for r in bits_core.block_rows(n_in, group))
    cost = n_out + (3 if salient_groups else 1) * bits_core.SCALE_BITS + math.ceil(math.log2(max(group, 2)))
    budget_bits += n_fixed * cost
    gain = np.asarray(_residual_plane_gain(jnp.asarray(w, jnp.float32), jnp.asarray(weight, jnp.float32),
                                           jnp.ones((n_in,), jnp.float32)), np.float64)
    gains.append(np.maximum(gain, 0.0) / cost)
    costs.append(np.full(n_in, cost, np.float64))
    owners.append(np.full(n_in, i))
  gain, cost, owner = np.concatenate(gains), np.concatenate(costs), np.concatenate(owners)
  order = np.argsort(-gain, kind="stable")
  taken = order[np.cumsum(cost[order]) <= budget_bits]
  counts = np.bincount(owner[taken], minlength=len(paths))
  return {p: int(c) for p, c in zip(paths, counts)}
