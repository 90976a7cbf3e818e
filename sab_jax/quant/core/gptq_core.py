"""GPTQ-style error compensation over blocks of input channels.

GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) quantizes the input
dimension in order and pushes each quantized input's error onto the inputs not yet
quantized, using the upper Cholesky factor `U` of the damped `H⁻¹` (`H⁻¹ = Uᵀ U`).
Binarizers decide a whole block of inputs at once (the scales are shared across the
block), so here the callback returns the block's `Q_F` in one go and the in-block
column sweep of GPTQ (with `Q_F` held fixed) is done in closed form: the sweep
`err_i = (w_i − q_i)/U_ii; w_{>i} −= err_i U_{i,>i}` is `U_FFᵀ Err = W_F − Q_F`, a
triangular solve, after which the later rows get `W_R −= U_FRᵀ Err`. Because it is
a sequence of exact conditional OBS updates, this is the optimal compensation of the
rows still free given the block's fixed `Q_F`. Scales shared by a group of several
blocks are found when the loop reaches the group, as GPTQ's `groupsize`.

Layout: kernel `[in, out]`, so GPTQ's columns are our rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def hessian_inverse_cholesky(h: jax.Array, damp_ratio: float = 0.01) -> jax.Array:
  """Upper Cholesky factor `U` of the damped inverse Hessian, `H⁻¹ = Uᵀ U` (GPTQ).

  Dead inputs (`H_jj == 0`) get `H_jj = 1` first, then `damp_ratio · mean(diag H)` is
  added to the diagonal, both as in GPTQ. An all-zero `H` (no calibration data)
  becomes `1.01·I`, i.e. no compensation.
  """
  h = h.astype(jnp.float32)
  n = h.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  diag = jnp.diag(h)
  h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
  h = h + damp_ratio * jnp.mean(jnp.diag(h)) * eye
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
  hinv = 0.5 * (hinv + hinv.T)
  return jnp.linalg.cholesky(hinv).T


BlockQuantizer = Callable[..., tuple[jax.Array, Any]]


def gptq_quantize(w: jax.Array, u: jax.Array, quantize_block: BlockQuantizer, *,
                  block_size: int = 128, compensate: bool = True,
                  aux: tuple[jax.Array, ...] = (), group_size: int | None = None,
                  prepare_group: Callable[..., Any] | None = None
                  ) -> tuple[jax.Array, Any, Any]:
  """Quantize `w` block by block (over inputs), compensating each block's error.

  The input dimension is padded to a multiple of the group size with zero rows (their
  `U` is the identity, so they neither receive nor send compensation); callbacks see a
  `valid` row mask and must leave invalid rows alone.

  Groups (GPTQ's `groupsize`): with `prepare_group`, every `group_size` inputs (a multiple
  of `block_size`) share state, e.g. scales, that `prepare_group` computes from the
  group's current (already compensated) weights when the loop reaches the group, exactly
  where GPTQ calls `find_params`; its blocks are then quantized and compensated one by one.

  Args:
    w: kernel `[in, out]`.
    u: `[in, in]` from `hessian_inverse_cholesky`.
    quantize_block: `(w_blk [b, out], d [b], valid [b], *aux_blk) -> (q_blk, parts)`
      where `d = diag(U)` of the block's rows and `aux_blk` the block's rows of `aux`;
      with `prepare_group` it also gets `state=` (the group's) and `offset=` (the block's
      first row within the group). `parts` is any pytree of fixed shapes, stacked over
      blocks.
    block_size: rows per block (static).
    compensate: False quantizes every block from the original weights (no GPTQ).
    aux: arrays with leading dimension `in`, sliced per block (and per group).
    group_size: rows per group (static, multiple of `block_size`); default one block.
    prepare_group: `(w_grp, d, valid, *aux_grp) -> state` or None.

  Returns:
    (Ŵ `[in, out]`, parts stacked with a leading `[n_blocks]` axis (row-indexed leaves
    still include the padding rows), group states stacked `[n_groups]` (() without
    `prepare_group`)).
  """
  w = w.astype(jnp.float32)
  n_in, n_out = w.shape
  bs = block_size
  gs = group_size or bs
  if gs % bs:
    raise ValueError(f"group_size {gs} is not a multiple of block_size {bs}")
  n_sub = gs // bs
  ng = math.ceil(n_in / gs)
  n_pad = ng * gs
  pad = n_pad - n_in
  w_p = jnp.pad(w, ((0, pad), (0, 0)))
  u_p = jnp.pad(u.astype(jnp.float32), ((0, pad), (0, pad)))
  u_p = u_p + jnp.diag(jnp.concatenate([jnp.zeros(n_in), jnp.ones(pad)]).astype(jnp.float32))
  d_all = jnp.diag(u_p)
  valid_all = jnp.arange(n_pad) < n_in
  aux_p = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in aux)
  cols = jnp.arange(n_pad)

  def group_step(w_cur, g):
    g0 = g * gs
    grp = lambda a: jax.lax.dynamic_slice_in_dim(a, g0, gs, 0)
    state = () if prepare_group is None else prepare_group(
        grp(w_cur), grp(d_all), grp(valid_all), *map(grp, aux_p))

    def block_step(w_cur, i):
      r0 = g0 + i * bs
      rows = lambda a: jax.lax.dynamic_slice_in_dim(a, r0, bs, 0)
      w_blk = rows(w_cur)
      extra = {} if prepare_group is None else {"state": state, "offset": i * bs}
      q, parts = quantize_block(w_blk, rows(d_all), rows(valid_all), *map(rows, aux_p), **extra)
      if compensate:
        u_ff = jax.lax.dynamic_slice(u_p, (r0, r0), (bs, bs))
        err = jax.scipy.linalg.solve_triangular(u_ff, w_blk - q, trans="T", lower=False)
        u_row = jnp.where(cols[None, :] >= r0 + bs, rows(u_p), 0.0)
        w_cur = w_cur - jnp.matmul(u_row.T, err, precision=_HI)
      return w_cur, (q, parts)

    w_cur, (qs, parts) = jax.lax.scan(block_step, w_cur, jnp.arange(n_sub))
    return w_cur, (qs, parts, state)

  _, (qs, parts, states) = jax.lax.scan(group_step, w_p, jnp.arange(ng))
  parts = jax.tree.map(lambda x: x.reshape((ng * n_sub,) + x.shape[2:]), parts)
  return qs.reshape(n_pad, n_out)[:n_in], parts, states


def output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """`tr((W − Ŵ)ᵀ H (W − Ŵ))`: with `H = 2/N Σ x xᵀ` this is 2× the mean over
  tokens of `‖x(W − Ŵ)‖²`."""
  e = (w - w_hat).astype(jnp.float32)
  return jnp.sum(e * jnp.matmul(h.astype(jnp.float32), e, precision=_HI))
