"""Quantization-aware distillation: the full-precision teacher into its binarized student.

The student is the teacher with every layer of a PTQ export (any method) replaced
by a `quant.binary_dense.BinaryDense` initialised from that export's parts, so step 0 is
the PTQ model exactly. Only the latent weights and the scales train (`TRAINABLE`); the
other parameters stay the teacher's. The loop is `train.train` with the teacher passed in
(same mesh, same jitted step), so checkpoints, resume, non-finite handling and logging
are the teacher's. The trained student is written back as the PTQ provider's parts, i.e.
a packed export that `serve.packed` serves like any other. A student layer may carry the
calibration pass's significance map and step its weights by it (`build_student`'s
`significance`; `permuted` is that map's ablation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sab_jax.models import paths
from sab_jax.quant import binary_dense
from sab_jax.quant import providers as providers_lib
from sab_jax.quant.providers import base

TRAINABLE = nnx.Any(binary_dense.Latent, binary_dense.Scale)


def kd_loss(logits: jax.Array, batch: Mapping[str, jax.Array], teacher_logits: jax.Array,
            hidden: jax.Array | None = None, teacher_hidden: jax.Array | None = None, *,
            temperature: float = 1.0, ce_weight: float = 0.0, hidden_weight: float = 0.0) -> jax.Array:
  """T²·KL(teacher_T ‖ student_T) over answer positions, + ce_weight · answer cross-entropy,
  + hidden_weight · ‖h_s − h_t‖² / ‖h_t‖² of the final hidden states at those positions."""
  mask = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
  loss = jnp.sum(kl * mask) / n
  if ce_weight:
    targets = jnp.roll(batch["input_ids"], -1, axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    loss = loss + ce_weight * jnp.sum(ce * mask) / n
  if hidden_weight:
    if hidden is None or teacher_hidden is None:
      raise ValueError("hidden_weight > 0 needs the student's and the teacher's hidden states")
    hs, ht = hidden.astype(jnp.float32), teacher_hidden.astype(jnp.float32)
    num = jnp.sum(jnp.sum(jnp.square(hs - ht), axis=-1) * mask)
    den = jnp.maximum(jnp.sum(jnp.sum(jnp.square(ht), axis=-1) * mask), 1e-12)
    loss = loss + hidden_weight * num / den
  return loss


def build_student(teacher: nnx.Module, layers: Mapping[str, providers_lib.Parts], *, clip: float = 1.0,
                  significance: Mapping[str, base.OutputSensitivity] | None = None,
                  significance_power: float = 0.0) -> nnx.Module:
  """A copy of `teacher` whose layers in `layers` ({path: PTQ typed parts}) are BinaryDense,
  each carrying its significance map (`significance`, {path: the calibration pass's measure})
  and stepping its weights by it with `significance_power` (`binary_dense`)."""
  if significance is not None and set(significance) != set(layers):
    raise ValueError(f"the significance covers {len(significance)} layers, the parts {len(layers)}; measure it on "
                     "the parts' layers")
  student = nnx.clone(teacher)
  # own buffers: the training step donates the student's, and the teacher is an argument of that same call
  nnx.update(student, jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.state(student)))
  for path, parts in layers.items():
    dense = paths.get(student, path)
    bias = None if dense.bias is None else dense.bias[...]
    axes = dense.kernel.get_metadata().get("out_sharding") or ("embed", "mlp")
    if tuple(parts.shape) != tuple(dense.kernel.shape):
      raise ValueError(f"layer {path!r}: the parts are {parts.shape}, the teacher's kernel {dense.kernel.shape}")
    paths.replace(student, path, binary_dense.BinaryDense(
        parts, bias=bias, dtype=dense.dtype, clip=clip, axes=axes,
        significance=None if significance is None else significance[path], significance_power=significance_power))
  return student


def permuted(significance: Mapping[str, base.OutputSensitivity], seed: int = 0) -> dict[str, base.OutputSensitivity]:
  """Each layer's map with its inputs and its outputs shuffled (the same values on the wrong
  weights): the ablation that tells whether *where* the map puts the steps matters."""
  rng = np.random.default_rng(seed)
  out = {}
  for path in sorted(significance):
    sens = significance[path]
    i, o = rng.permutation(sens.diag_text.shape[0]), rng.permutation(sens.grad_text.shape[0])
    out[path] = dataclasses.replace(sens, diag_text=sens.diag_text[i], diag_vis=sens.diag_vis[i],
                                    grad_text=sens.grad_text[o], grad_vis=sens.grad_vis[o])
  return out


def binarized_layers(student: nnx.Module, bits: Mapping[str, Mapping[str, Any]]
                     ) -> dict[str, providers_lib.Binarized]:
  """The student's BinaryDense layers as `Binarized` (parts, exact Ŵ), ready for `export`.

  `bits`: per path the PTQ manifest's bit accounting (same layout, so the same bits).
  """
  out = {}
  for path, m in nnx.iter_graph(student):
    if isinstance(m, binary_dense.BinaryDense):
      p = paths.dotted(path)
      parts = m.to_parts()
      w_hat = base.dequantize(parts)
      b = bits[p]
      out[p] = providers_lib.Binarized(w_hat, float(b["nominal_bits"]), int(b["formula_stored_bits"]), parts, {})
  return out
