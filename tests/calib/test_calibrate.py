"""The sequential calibrate-and-binarize pass: what each layer is calibrated on, and what changes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sab_jax import sharding
from sab_jax.calib import calibrate
from sab_jax.models import llava, paths
from sab_jax.quant import providers, rules
from calib.calib_fixture import IMG, batches as _batches


class Recording:
  """XNOR, remembering the statistics each layer was given."""
  name = "recording"

  def __init__(self):
    self.seen = {}
    self.inner = providers.Xnor()

  def __call__(self, kernel, stats):
    self.seen[len(self.seen)] = stats
    return self.inner(kernel, stats)


def test_layer_is_calibrated_on_the_binarized_prefix_split_by_modality():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  batches = _batches(model.cfg)
  rec = Recording()
  mesh = sharding.make_mesh({"data": 8})
  results = calibrate.binarize_model(model, batches, rec, rules.DECODER_ONLY, mesh, progress=False)
  paths = list(results)
  assert all(p.startswith("language_model.layers.") for p in paths) and len(paths) == 14
  stats = rec.seen[paths.index("language_model.layers.1.self_attn.q_proj")]

  # Reference: the *binarized* model's input to layer 1, through its input norm, in float64.
  xs_t, xs_v = [], []
  for b in batches:
    _, aux = model.forward(jnp.asarray(b["input_ids"]), jnp.asarray(b["pixel_values"]),
                           jnp.asarray(b["attention_mask"]))
    x = np.asarray(model.language_model.layers[1].input_layernorm(aux["layer_inputs"][1]), np.float64)
    real = b["attention_mask"] > 0
    vis = real & (b["input_ids"] == IMG)
    xs_t.append(x[real & ~vis])
    xs_v.append(x[vis])
  xt, xv = np.concatenate(xs_t), np.concatenate(xs_v)
  assert (stats.n_text, stats.n_vis) == (len(xt), len(xv))
  np.testing.assert_allclose(np.asarray(stats.h_text), 2 / len(xt) * xt.T @ xt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.h_vis), 2 / len(xv) * xv.T @ xv, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_only_selected_layers_change_and_they_become_binary():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  before = nnx.clone(model)
  only_mlp = (rules.BinarizeRule(module_path=r"language_model\.layers\.0\.mlp\..*"),
              rules.BinarizeRule(module_path=r".*", binarize=False))
  calibrate.binarize_model(model, _batches(model.cfg, n=1), providers.Xnor(), only_mlp,
                           sharding.make_mesh({"data": 8}), progress=False)
  for path, dense in paths.dense_layers(model):
    new = np.asarray(dense.kernel[...])
    ref = np.asarray(dict(paths.dense_layers(before))[path].kernel[...])
    if path.startswith("language_model.layers.0.mlp."):
      assert not np.allclose(new, ref)
      # XNOR: one magnitude per output channel, signs of the original.
      np.testing.assert_allclose(np.abs(new), np.broadcast_to(np.abs(new).max(axis=0), new.shape), rtol=1e-6)
      assert np.all(np.sign(new) == np.where(ref >= 0, 1, -1))
    else:
      np.testing.assert_array_equal(new, ref)


def test_rule_matching_nothing_is_an_error():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="match no Dense layer"):
    rules.select(model, [(r"language_model\.layerz\..*", True)])


def test_vision_layers_see_only_image_tokens():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  rec = Recording()
  vision_rules = [(r"vision_tower\.layers\.0\.fc1", True), (r"multi_modal_projector\.linear_1", True), (r".*", False)]
  batches = _batches(model.cfg, n=1)
  results = calibrate.binarize_model(model, batches, rec, vision_rules, sharding.make_mesh({"data": 8}),
                                     progress=False)
  assert sorted(results) == ["multi_modal_projector.linear_1", "vision_tower.layers.0.fc1"]
  b = len(batches[0]["input_ids"])
  n_patch = model.cfg.vision.num_patches
  by_path = dict(zip(results, (rec.seen[i] for i in range(len(rec.seen)))))  # results keep binarization order
  tower, proj = by_path["vision_tower.layers.0.fc1"], by_path["multi_modal_projector.linear_1"]
  assert (tower.n_text, tower.n_vis) == (0, b * (n_patch + 1))  # the tower also runs the class token
  assert (proj.n_text, proj.n_vis) == (0, b * n_patch)          # 'default' strategy drops it


@pytest.mark.slow
def test_sab_plans_its_salient_rows_over_the_model_within_the_per_layer_bits():
  """Structured SAB measures the loss sensitivity first, then gives each layer the rows its
  plan decided: unequal over the layers, no more stored bits than ARB-RC's equal share."""
  batches = _batches(llava.Model("test", rngs=nnx.Rngs(0)).cfg, answers=True)
  mesh = sharding.make_mesh({"data": 8})
  out = {}
  for name, provider in (("sab", providers.Sab(structured=True)), ("arb_rc", providers.ArbRc(structured=True))):
    model = llava.Model("test", rngs=nnx.Rngs(0))
    out[name] = calibrate.binarize_model(model, batches, provider, rules.DECODER_ONLY, mesh, progress=False)
  rows = {n: {p: int(r.binarized.parts.salient_rows.sum()) for p, r in res.items()} for n, res in out.items()}
  bits = {n: sum(r.binarized.stored_bits for r in res.values()) for n, res in out.items()}
  assert bits["sab"] <= bits["arb_rc"], bits
  assert rows["sab"] != rows["arb_rc"] and len(set(rows["sab"].values())) > 2, rows
  with pytest.raises(ValueError, match="loss_mask"):
    calibrate.binarize_model(llava.Model("test", rngs=nnx.Rngs(0)), _batches(llava.Model("test", rngs=nnx.Rngs(0)).cfg),
                             providers.Sab(), rules.DECODER_ONLY, mesh, progress=False)
