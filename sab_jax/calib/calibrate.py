"""Sequential calibrate-and-binarize pass over an LVLM (GPTQ/BiLLM/ARB order).

Decoder layer i is calibrated on the outputs of layers 0..i-1 *after* those were
binarized, so each layer compensates the error that reaches it. Only one decoder
layer's Hessians live at a time. Token modality decides which Hessian a token feeds:
image-placeholder positions are `vision`, the other real tokens `text`, padding
neither. Vision-tower and projector layers (when a rule selects them) see only image
tokens; they are calibrated in one pass on the full-precision tower (not
sequentially) before the decoder, a simplification documented here on purpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sab_jax import distributed, sharding as sharding_lib
from sab_jax.calib import hessian, sensitivity
from sab_jax.models import llama
from sab_jax.models import paths as module_paths
from sab_jax.quant import rules as rules_lib
from sab_jax.quant.providers.base import Binarized, LayerStats, Provider


class Capture(nnx.Module):
  """Wraps a Dense layer and sows its input, so a jitted forward can hand it back."""

  def __init__(self, inner: nnx.Module):
    self.inner = inner

  def __call__(self, x: jax.Array) -> jax.Array:
    self.sow(nnx.Intermediate, "inputs", x)
    return self.inner(x)


def capturing(root: nnx.Module, paths: Sequence[str]):
  """Temporarily wraps the Dense layers at `paths` (relative to root) in `Capture`."""
  return module_paths.wrapped(root, paths, Capture)


def _sown_inputs(intermediates: nnx.State) -> dict[str, jax.Array]:
  """Sown inputs by dotted path of the wrapped layer (relative to the captured module)."""
  return {module_paths.dotted(path[:-1]): v.get_value()[0] for path, v in nnx.to_flat_state(intermediates)}


@nnx.jit
def _run_layer(layer: nnx.Module, x, positions, mask):
  (y, _), sown = nnx.capture(lambda l: l(x, positions, mask, None, None), nnx.Intermediate)(layer)
  return y, _sown_inputs(sown)


@nnx.jit
def _run_vision(model: nnx.Module, pixel_values):
  _, sown = nnx.capture(lambda m: m.image_features(pixel_values), nnx.Intermediate)(model)
  return _sown_inputs(sown)


@nnx.jit
def _embed(model: nnx.Module, input_ids, pixel_values):
  return model.embed(input_ids, pixel_values)


@nnx.jit
def _positions(model: nnx.Module, input_ids, attention_mask, pixel_values):
  return model.positions(input_ids, attention_mask, pixel_values)


@nnx.jit
def _final_norm(model: nnx.Module, x):
  return model.language_model.norm(x)


@dataclasses.dataclass
class LayerResult:
  binarized: Binarized
  stats_tokens: tuple[int, int]     # (text, image) calibration tokens
  relative_output_error: float      # tr(ΔᵀHΔ) / tr(WᵀHW): the layer's output error on calibration data


def _binarize_one(model: nnx.Module, path: str, acc: hessian.Accumulator, provider: Provider,
                  plan: dict[str, Any]) -> LayerResult:
  dense = module_paths.get(model, path)
  w = dense.kernel[...]
  stats: LayerStats = dataclasses.replace(acc.stats(), **plan.get(path, {}))
  # The whole layer on one device of this process (every process binarizes it alike, FSDP over
  # hosts included): on the mesh, the replicated or FSDP-sharded search ran as an SPMD program
  # on every device at once, each computing the same layer (8x the CPU on 8 simulated devices,
  # and a costlier compile), for the same result.
  device = jax.local_devices()[0]
  if w.is_fully_addressable:
    local = lambda a: jax.device_put(a, device)
  else:
    local = lambda a: jax.device_put(distributed.host_value(a), device)
  w_in = local(w)
  stats = dataclasses.replace(stats, h_text=local(stats.h_text), h_vis=local(stats.h_vis))
  out = provider(w_in.astype(jnp.float32), stats)
  dense.kernel[...] = sharding_lib.put(out.w_hat.astype(w.dtype), w.sharding)
  # The provider already measured tr(ΔᵀHΔ)/tr(WᵀHW) on these statistics.
  return LayerResult(out, (stats.n_text, stats.n_vis), out.error["output_rel"])


def on_mesh(batches: Iterable[dict[str, Any]], mesh: Mesh, *, loss_mask: bool = False, reader: str = ""
            ) -> list[dict[str, jax.Array]]:
  """Calibration batches (this process's part) as global arrays split over the mesh's data axes,
  with the answer positions (`loss_mask`) when a significance pass reads them."""
  keys = ("input_ids", "attention_mask", "pixel_values") + (("loss_mask",) if loss_mask else ())
  batches = list(batches)
  if loss_mask and any("loss_mask" not in b for b in batches):
    raise ValueError(f"{reader} needs each calibration batch's loss_mask (the answer positions, as the data "
                     "pipeline gives them); add it")
  put = lambda a: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, a.ndim), a)
  return [{k: put(b[k]) for k in keys} for b in batches]


def model_plan(model: nnx.Module, batches: Sequence[dict[str, Any]], provider: Provider, selected: Sequence[str],
               mesh: Mesh, options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
  """Per layer, the `LayerStats` fields a `base.ModelPlanner` provider decided before any layer
  is binarized (its sensitivity and plan entry); empty for the other providers."""
  if options is None:
    return {}
  sens = sensitivity.measure(model, batches, selected, mesh, **options)
  kernels = {p: module_paths.get(model, p).kernel[...] for p in selected}
  kernels = {p: k if k.is_fully_addressable else distributed.host_value(k) for p, k in kernels.items()}
  decided = provider.plan(kernels, sens)
  return {p: {"sensitivity": sens[p], "plan": decided.get(p)} for p in selected}


def binarize_model(model: nnx.Module, batches: Iterable[dict[str, Any]], provider: Provider,
                   rules: Sequence[rules_lib.BinarizeRule], mesh: Mesh, *, progress: bool = True
                   ) -> dict[str, LayerResult]:
  """Binarizes, in place, every Dense layer the rules select; returns per-layer results.

  Args:
    model: the LVLM (modified in place: selected kernels become their binarized values).
    batches: calibration batches (pipeline dicts with input_ids, attention_mask, pixel_values).
    provider: the binarization method.
    rules: which layers to binarize.
    mesh: batches are split over its data axes; Hessians are psum-ed over them.
    progress: show a progress bar over decoder layers.
  """
  selected = rules_lib.select(model, rules)
  options = provider.sensitivity_options() if hasattr(provider, "sensitivity_options") else None
  batches = on_mesh(batches, mesh, loss_mask=options is not None,
                    reader=f"{provider.name}'s significance pass (or use significance='hessian')")
  plan = model_plan(model, batches, provider, selected, mesh, options)
  results: dict[str, LayerResult] = {}

  # --- vision tower and projector: image tokens only ----------------------------------------
  vision = [p for p in selected if p.startswith(("vision_tower.", "multi_modal_projector."))]
  if vision:
    accs = {p: hessian.Accumulator() for p in vision}
    with capturing(model, vision):
      for b in batches:
        for p, x in _run_vision(model, b["pixel_values"]).items():
          x = x.reshape((-1,) + x.shape[-2:])  # [images, tokens, in] whatever the tower's own layout
          ones = jnp.ones(x.shape[:2], jnp.float32)
          accs[p].add(x, jnp.zeros_like(ones), ones, mesh)
    for p in vision:
      results[p] = _binarize_one(model, p, accs[p], provider, plan)

  # --- decoder, layer by layer ----------------------------------------------------------------
  image_id = model.cfg.image_token_id
  xs, aux = [], []
  for b in batches:
    mask = b["attention_mask"]
    is_image = (b["input_ids"] == image_id) & (mask > 0)
    xs.append(_embed(model, b["input_ids"], b["pixel_values"]))
    aux.append(dict(positions=_positions(model, b["input_ids"], mask, b["pixel_values"]), mask=llama.causal_mask(mask),
                    text=((mask > 0) & ~is_image).astype(jnp.float32), vis=is_image.astype(jnp.float32)))
  decoder_layers = list(model.language_model.layers)
  bar = tqdm(range(len(decoder_layers)), desc="binarize decoder", disable=not progress)
  for i in bar:
    layer = decoder_layers[i]
    prefix = f"language_model.layers.{i}."
    here = [p[len(prefix):] for p in selected if p.startswith(prefix)]
    if here:
      accs = {p: hessian.Accumulator() for p in here}
      with capturing(layer, here):
        for x, a in zip(xs, aux):
          _, inputs = _run_layer(layer, x, a["positions"], a["mask"])
          for p, inp in inputs.items():
            accs[p].add(inp, a["text"], a["vis"], mesh)
      for p in here:
        results[prefix + p] = _binarize_one(model, prefix + p, accs[p], provider, plan)
    xs = [_run_layer(layer, x, a["positions"], a["mask"])[0] for x, a in zip(xs, aux)]

  # --- head -----------------------------------------------------------------------------------
  if "lm_head" in selected:
    acc = hessian.Accumulator()
    for x, a in zip(xs, aux):
      acc.add(_final_norm(model, x), a["text"], a["vis"], mesh)
    results["lm_head"] = _binarize_one(model, "lm_head", acc, provider, plan)
  return results
