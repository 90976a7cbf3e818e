"""The loss's sensitivity to every selected Dense layer's outputs, per modality (SAB's significance pass).

One forward and backward pass of the full-precision model per calibration batch and label
draw, with each selected layer wrapped in `Probe`: it sows its input and adds a zero
perturbation to its output (flax.nnx `perturb`), whose gradient is ∂L/∂y per token. The
loss is the answer cross-entropy against labels *sampled from the model's own* next-token
distribution at the answer positions (the true Fisher): the teacher is near-perfect on its
training distribution, so the empirical Fisher of the reference answers comes from the few
questions it gets wrong (issue 15: the top 5 of 256 questions held 97% of its trace). Each
question's squared gradients are then scaled to sum 1 over all probed layers and outputs,
so every calibration question weighs the same.

Per layer the pass keeps `[out] + [in]` floats per modality (`base.OutputSensitivity`), not
a per-weight Fisher (7B: ~52 GB in f32). Token sums run on each device's shard of the batch
and are `psum`-ed over the mesh's data axes (`jax.shard_map`), as the Hessians are, so the
result is the same on 1 or 8 devices. The pass's own memory is the backward pass's
activations plus one perturbation the size of each probed layer's output.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sab_jax import distributed
from sab_jax.calib import hessian
from sab_jax.models import paths as module_paths
from sab_jax.quant.providers.base import OutputSensitivity

NORMALIZE = ("question", "none")


class Probe(nnx.Module):
  """Wraps a Dense layer: sows its input and perturbs its output (for ∂L/∂output)."""

  def __init__(self, inner: nnx.Module):
    self.inner = inner

  def __call__(self, x: jax.Array) -> jax.Array:
    self.sow(nnx.Intermediate, "inputs", x)
    return self.perturb("outputs", self.inner(x))


def _forward(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])


def _by_layer(state: nnx.State, leaf: str) -> dict[str, jax.Array]:
  """{dotted layer path: array} of the `leaf` ("inputs" / "outputs") entries of a state."""
  out = {}
  for path, v in nnx.to_flat_state(state):
    if path[-1] == leaf:
      value = v.get_value()
      out[module_paths.dotted(path[:-1])] = value[0] if isinstance(value, tuple) else value
  return out


def sampled_answer_loss(logits: jax.Array, loss_mask: jax.Array, key: jax.Array) -> jax.Array:
  """Σ over answer positions of −log p(ŷ), ŷ drawn from the model's own (detached) distribution."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  labels = jax.random.categorical(key, jax.lax.stop_gradient(logp))
  return jnp.sum(-jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * loss_mask)


def _masks(batch: dict[str, jax.Array], image_token_id: int, paths: Sequence[str], shapes: dict[str, tuple[int, ...]]):
  """Per layer (text, image) token masks `[B, T]` of its probed arrays: the decoder's and the
  head's from the token ids, a tower's (not language_model.*) all image."""
  real = batch["attention_mask"] > 0
  is_image = (batch["input_ids"] == image_token_id) & real
  text, vis = (real & ~is_image).astype(jnp.float32), is_image.astype(jnp.float32)
  out = {}
  for p in paths:
    lead = shapes[p][:2]
    if p.startswith(("language_model.", "lm_head")):
      out[p] = (text, vis)
    elif lead[0] == text.shape[0] and len(shapes[p]) == 3:
      out[p] = (jnp.zeros(lead, jnp.float32), jnp.ones(lead, jnp.float32))
    else:
      raise ValueError(f"{p}: its inputs are {shapes[p]}, not one row per question, so the sensitivity pass cannot "
                       "tell which question a token belongs to; leave the layer out of config.quant.rules")
  return out


def _reduce(grads, inputs, masks, mesh: Mesh, normalize: str):
  """Per layer: Σ_{t∈m} w_q ĝ_tk² and Σ_{t∈m} x_tj², m = text, image, and the token counts;
  summed per device and psum-ed over the data axes. w_q = 1 / (question q's Σ ĝ² over every
  probed layer) with `normalize="question"`, else 1."""
  axes = hessian.data_axes(mesh)
  spec = P(axes if axes else None)
  paths = sorted(grads)

  def local(g, x, m):
    f32 = lambda a: a.astype(jnp.float32)
    per_q = sum(jnp.sum(jnp.square(f32(g[p])), axis=tuple(range(1, g[p].ndim))) for p in paths)
    w = (jnp.where(per_q > 0, 1.0 / jnp.where(per_q > 0, per_q, 1.0), 0.0) if normalize == "question"
         else jnp.ones_like(per_q))
    out = {}
    for p in paths:
      g2 = jnp.square(f32(g[p])) * w[:, None, None]
      x2 = jnp.square(f32(x[p]))
      t, v = m[p]
      out[p] = (jnp.einsum("bt,btk->k", t, g2), jnp.einsum("bt,btk->k", v, g2),
                jnp.einsum("bt,btj->j", t, x2), jnp.einsum("bt,btj->j", v, x2), jnp.sum(t), jnp.sum(v))
    return jax.lax.psum(out, axes) if axes else out

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P(), check_vma=False)(
      grads, inputs, masks)


def output_gradients(model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array
                     ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """({layer: ∂L/∂output}, {layer: input}) of every `Probe`-wrapped layer, L the sampled answer loss."""
  _, perturbations = nnx.capture(_forward, nnx.Perturbation)(model, batch)  # zeros; the forward is dead code

  def loss(model, perturbations):
    logits, sown = nnx.capture(_forward, nnx.Intermediate, init=perturbations)(model, batch)
    return sampled_answer_loss(logits, batch["loss_mask"], key), sown

  grads, sown = nnx.grad(loss, argnums=1, has_aux=True)(model, perturbations)
  return _by_layer(grads, "outputs"), _by_layer(sown, "inputs")


def _batch_sums(model, batch, key, *, mesh, paths, image_token_id, normalize):
  g, x = output_gradients(model, batch, key)
  masks = _masks(batch, image_token_id, paths, {p: x[p].shape for p in paths})
  return _reduce(g, x, masks, mesh, normalize)


_batch_sums_jit = nnx.jit(_batch_sums, static_argnames=("mesh", "paths", "image_token_id", "normalize"))


def measure(model: nnx.Module, batches: Iterable[dict[str, jax.Array]], paths: Sequence[str], mesh: Mesh, *,
            samples: int = 1, normalize: str = "question", seed: int = 0) -> dict[str, OutputSensitivity]:
  """`OutputSensitivity` of each layer at `paths`, from the full-precision `model`.

  Args:
    model: the LVLM (not modified: the probes are removed again).
    batches: calibration batches on the mesh (input_ids, attention_mask, pixel_values, loss_mask).
    paths: the Dense layers to measure (decoder layers, the head, or tower layers with one
      image per question).
    mesh: the batches' mesh; token sums are psum-ed over its data axes.
    samples: label draws per question (the true Fisher's expectation, by sampling).
    normalize: "question" (each question weighs 1) or "none" (as the loss gives them).
    seed: the label draws' seed.
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize={normalize!r}: one of {NORMALIZE}")
  if samples < 1:
    raise ValueError(f"samples={samples}: at least 1 label draw per question")
  paths = tuple(sorted(paths))
  totals: dict[str, list[Any]] = {}
  key = jax.random.key(seed)
  with module_paths.wrapped(model, paths, Probe):
    for i, batch in enumerate(batches):
      for s in range(samples):
        sums = _batch_sums_jit(model, batch, jax.random.fold_in(key, i * samples + s), mesh=mesh, paths=paths,
                               image_token_id=model.cfg.image_token_id, normalize=normalize)
        for p, vals in sums.items():
          vals = [np.asarray(distributed.host_value(v), np.float64) for v in vals]
          totals[p] = vals if p not in totals else [a + b for a, b in zip(totals[p], vals)]
  out = {}
  for p, (gt, gv, dt, dv, nt, nv) in totals.items():
    diag = lambda d, n: d * (2.0 / n) if n else np.zeros_like(d)  # 2/N Σ x², as LayerStats' Hessians
    out[p] = OutputSensitivity(grad_text=jnp.asarray(gt / samples, jnp.float32),
                               grad_vis=jnp.asarray(gv / samples, jnp.float32),
                               diag_text=jnp.asarray(diag(dt, nt), jnp.float32),
                               diag_vis=jnp.asarray(diag(dv, nv), jnp.float32),
                               n_text=float(nt) / samples, n_vis=float(nv) / samples)
  return out
