"""Every method end to end on a Gaussian layer with correlated, two-modality inputs."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from sab_jax.quant import METHODS, ArbRc, BiLLM, LayerStats, PbLlm, Sab, Xnor
from sab_jax.quant.core import bits_core
from sab_jax.quant.providers import base, salient_split
from sab_jax.quant.providers.sab import fisher_objective
from quant.sensitivity_fixture import with_sensitivity

N_IN, N_OUT = 256, 256


def _inputs(seed, tokens, n_in):
  """Correlated inputs: low-rank mixing + channel scales spread over two decades."""
  r = np.random.default_rng(seed)
  mix = r.normal(size=(n_in, n_in)) / np.sqrt(n_in) + 0.3 * np.eye(n_in)
  z = r.normal(size=(tokens, n_in)) * r.lognormal(0, 1, n_in)
  return (z @ mix).astype(np.float32)


@functools.cache
def _layer(n_in=N_IN, n_out=N_OUT):
  x_t, x_v = _inputs(1, 1024, n_in), _inputs(2, 512, n_in)
  w = (np.random.default_rng(0).normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
  stats = LayerStats(jnp.asarray(2 / len(x_t) * x_t.T @ x_t), jnp.asarray(2 / len(x_v) * x_v.T @ x_v),
                     len(x_t), len(x_v))
  return w, np.concatenate([x_t, x_v]), with_sensitivity(stats, n_out)


@functools.cache
def _run(name, **knobs):
  w, _, stats = _layer()
  return METHODS[name](**knobs)(jnp.asarray(w), stats)


def _rel(name, **knobs):
  w, x, _ = _layer()
  w_hat = np.asarray(_run(name, **knobs).w_hat)
  return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


def test_methods_table():
  assert list(METHODS) == ["xnor", "pbllm", "billm", "arb_rc", "sab"]
  assert all(cls.name == key for key, cls in METHODS.items())


@pytest.mark.parametrize("name", [n if n in ("xnor", "sab") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in METHODS])
def test_parts_rebuild_w_hat_and_errors_are_right(name):
  """dequantize(parts) == w_hat bitwise; output_rel is ‖X(W − Ŵ)‖²/‖XW‖²."""
  w, x, _ = _layer()
  b = _run(name)
  assert b.w_hat.shape == w.shape and b.w_hat.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(b.w_hat)))
  np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)
  b.parts.check()
  rebuilt = METHODS[name]().from_arrays(b.parts.arrays())
  assert type(rebuilt) is type(b.parts) and rebuilt.meta() == b.parts.meta()
  np.testing.assert_allclose(b.error["output_rel"], _rel(name) ** 2, rtol=1e-3)
  assert b.bits_per_weight == b.stored_bits / w.size


def test_output_error_ranking():
  """sab, arb_rc < billm < xnor; pbllm (1.7 nominal bits) beats xnor."""
  rel = {name: _rel(name) for name in METHODS}
  assert rel["sab"] < rel["billm"] and rel["arb_rc"] < rel["billm"], rel
  assert rel["billm"] < rel["xnor"] and rel["pbllm"] < rel["xnor"], rel


def test_lambda_one_reproduces_arb_rc_bitwise():
  """SAB's step 6 with Λ ≡ 1 is ARB-RC, bit for bit (w_hat and every part)."""
  w, _, stats = _layer()
  sab = Sab(salient_rows="search", salient_budget="layer").binarize_with_lambda(jnp.asarray(w), stats,
                                                                                jnp.ones(w.shape))
  arb = _run("arb_rc")
  np.testing.assert_array_equal(sab.w_hat, arb.w_hat)
  for key, value in arb.parts.arrays().items():
    np.testing.assert_array_equal(np.asarray(getattr(sab.parts, key), np.float32),
                                  np.asarray(value, np.float32), err_msg=key)


def test_single_modality_sab_matches_arb_rc():
  """The paper's map with no image tokens: Λ is constant and the search, the ALS and the sign
  refinement are scale-invariant, so SAB ≈ ARB-RC: the same layer error, and the same Ŵ up
  to float rounding (a bf16 rounding of a scale may land the other way on a few rows)."""
  w, _, stats = _layer()
  text_only = LayerStats(stats.h_text, jnp.zeros_like(stats.h_vis), stats.n_text, 0)
  sab, arb = Sab(significance="hessian")(jnp.asarray(w), text_only), ArbRc()(jnp.asarray(w), text_only)
  np.testing.assert_array_equal(np.asarray(sab.parts.salient_rows), np.asarray(arb.parts.salient_rows))
  close = np.isclose(np.asarray(sab.w_hat), np.asarray(arb.w_hat), rtol=1e-3, atol=1e-4)
  assert close.mean() > 0.99, close.mean()
  assert sab.error["output_rel"] == pytest.approx(arb.error["output_rel"], rel=1e-3)


def test_lambda_actually_changes_sab():
  """With two modalities Λ is not constant, so SAB differs from ARB-RC, Λ² more so."""
  d1 = float(jnp.max(jnp.abs(_run("sab").w_hat - _run("arb_rc").w_hat)))
  assert d1 > 1e-4
  sig = Sab(significance="hessian").significance_map(jnp.asarray(_layer()[0]), _layer()[2])
  assert float(jnp.std(sig.lam)) > 0.01


@pytest.mark.slow
def test_bits_match_the_formulas():
  """stored_bits equals the bits_core count from the parts, for every method."""
  w, _, _ = _layer()
  rows = bits_core.block_rows(N_IN, 128)
  assert _run("xnor").stored_bits == bits_core.xnor_bits(N_IN, N_OUT).stored_bits
  pb = _run("pbllm")
  n_sal = int(jnp.sum(pb.parts.salient_mask))
  assert n_sal == round(0.1 * w.size)
  assert pb.stored_bits == bits_core.pbllm_bits(N_IN, N_OUT, n_salient=n_sal, salient_bits=8,
                                                n_blocks=2).stored_bits
  assert int(jnp.max(jnp.abs(pb.parts.int_values.astype(jnp.int32)))) == 127
  for name, mode in [("billm", "mean_offset"), ("arb_rc", "rc"), ("sab", "rc")]:
    b = _run(name, salient_rows=0.08)  # a fixed fraction: round(0.08 · 128) = 10 rows per block
    assert int(b.parts.salient_rows.sum()) == 2 * 10
    groups = mode == "rc"  # ARB-RC / SAB: two salient groups by default
    c = bits_core.salient_split_bits(N_IN, N_OUT, block_rows=rows, salient_per_block=[10, 10],
                                     mode=mode, split=True, salient_groups=groups)
    assert (b.stored_bits, b.nominal_bits) == (c.stored_bits, c.nominal_bits)
    b = _run(name)  # searched: whatever each block picked, counted the same way
    sal = np.asarray(b.parts.salient_rows)
    per_block = [int(sal[:128].sum()), int(sal[128:].sum())]
    c = bits_core.salient_split_bits(N_IN, N_OUT, block_rows=rows, salient_per_block=per_block,
                                     mode=mode, split=True, salient_groups=groups)
    assert (b.stored_bits, b.nominal_bits) == (c.stored_bits, c.nominal_bits)


def test_structured_sab():
  """Structured: no per-weight bitmap, 3 alpha_out per block, bits as counted, and still
  far better than XNOR."""
  b = _run("sab", structured=True, scale_block=128)
  assert b.parts.group_hi is None and b.parts.alpha_out.shape == (2, 3, N_OUT)
  sal = np.asarray(b.parts.salient_rows)
  per_block = [int(sal[:128].sum()), int(sal[128:].sum())]
  assert sum(per_block) == 2 * 10  # the layer-wide budget: 10 per block in total, spread by need
  c = bits_core.salient_split_bits(N_IN, N_OUT, block_rows=[128, 128], salient_per_block=per_block,
                                   mode="rc", split=False)
  assert b.stored_bits == c.stored_bits
  fixed = _run("sab", structured=True, scale_block=128, salient_budget="group")
  assert [int(np.asarray(fixed.parts.salient_rows)[i:i + 128].sum()) for i in (0, 128)] == [10, 10]
  np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)
  assert _rel("sab", structured=True, scale_block=128) < 0.9 * _rel("xnor")


@pytest.mark.slow
def test_ragged_input_dimension():
  """in not a multiple of the block size (padding path) works for every GPTQ method."""
  r = np.random.default_rng(7)
  x = _inputs(3, 256, 72)
  w = jnp.asarray(r.normal(size=(72, 24)), jnp.float32)
  h = jnp.asarray(2 / 256 * x.T @ x)
  stats = with_sensitivity(LayerStats(h, h, 256, 256), 24)
  for p in (PbLlm(block_size=32), BiLLM(block_size=32), Sab(block_size=32, iters=3)):
    b = p(w, stats)
    assert b.w_hat.shape == (72, 24) and bool(jnp.all(jnp.isfinite(b.w_hat)))
    assert b.error["output_rel"] < Xnor()(w, stats).error["output_rel"]


@pytest.mark.slow
def test_layer_narrower_than_a_block():
  """in < block_size / scale_block: one block of the layer's size, budget from real rows."""
  r = np.random.default_rng(8)
  x = _inputs(4, 256, 64)
  w = jnp.asarray(r.normal(size=(64, 16)), jnp.float32)
  h = jnp.asarray(2 / 256 * x.T @ x)
  stats = with_sensitivity(LayerStats(h, h, 256, 256), 16)
  for p in (Sab(iters=3, salient_rows=0.08), Sab(iters=3, structured=True), BiLLM(salient_rows=0.08)):
    b = p(w, stats)
    assert int(b.parts.salient_rows.sum()) == 5  # round(0.08 · 64) (structured: its 8% default)
    np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)
  for p in (Sab(iters=3), BiLLM()):  # searched: 1 .. 63 candidates over the one 64-row block
    b = p(w, stats)
    assert 1 <= int(b.parts.salient_rows.sum()) < 64
    np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)


# --- SAB's loss-calibrated significance ("fisher") ------------------------------------------------

def test_fisher_objective_closed_form():
  """Text-only gradients: compensation with H_t alone, Λ[j,k] = g_t[k]/mean(g_t) on every row
  (the image tokens' Hessian drops out); no gradient at all: the count-weighted H and Λ ≡ 1."""
  _, _, stats = _layer()
  g = jnp.asarray(np.random.default_rng(4).lognormal(0, 1, N_OUT), jnp.float32)
  sens = base.OutputSensitivity(g, jnp.zeros_like(g), jnp.diag(stats.h_text), jnp.diag(stats.h_vis))
  h, lam = fisher_objective(dataclasses.replace(stats, sensitivity=sens))
  np.testing.assert_allclose(np.asarray(h), np.asarray(stats.h_text), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lam), np.broadcast_to(np.asarray(g / jnp.mean(g)), (N_IN, N_OUT)), rtol=1e-5)
  dead = base.OutputSensitivity(jnp.zeros_like(g), jnp.zeros_like(g), sens.diag_text, sens.diag_vis)
  h, lam = fisher_objective(dataclasses.replace(stats, sensitivity=dead))
  np.testing.assert_array_equal(np.asarray(h), np.asarray(stats.h))
  assert bool(jnp.all(lam == 1.0))
  # with both modalities, Λ varies within rows and across them, and averages 1 along each row
  _, lam = fisher_objective(_layer()[2])
  lam = np.asarray(lam)
  assert lam.std(axis=1).min() > 0.1 and lam[:, 0].std() > 0.01
  np.testing.assert_allclose(lam.mean(axis=1), 1.0, rtol=0.3)


def test_fisher_sab_needs_the_sensitivity_and_budget_needs_fisher():
  w, _, stats = _layer()
  with pytest.raises(ValueError, match="significance='hessian'"):
    Sab()(jnp.asarray(w), dataclasses.replace(stats, sensitivity=None))
  with pytest.raises(ValueError, match="needs significance='fisher'"):
    Sab(structured=True, significance="hessian", salient_budget="model")
  with pytest.raises(ValueError, match="searched counts"):
    Sab(salient_rows="search", salient_budget="model")
  # "auto": the whole-model budget with the loss-calibrated map, each layer's own with the paper's
  assert Sab()._budget == "model" and Sab(significance="hessian")._budget == "layer"
  assert Sab().layout_salient_rows == 0.09 and Sab(significance="hessian").layout_salient_rows == "search" and Sab(structured=True).layout_salient_rows == "search"
  with pytest.raises(ValueError, match="significance="):
    Sab(significance="obs")
  assert Sab().sensitivity_options() == {"samples": 1, "normalize": "question", "seed": 0}
  assert Sab(significance="hessian").sensitivity_options() is None


def test_fisher_sab_beats_arb_rc_on_its_objective():
  """On the loss-weighted output error Σ_k Δ_kᵀ(g_t[k]H_t + g_v[k]H_v)Δ_k, which it targets."""
  w, _, stats = _layer()
  sens = stats.sensitivity
  obj = lambda w_hat: float(sum(
      jnp.einsum("jk,ji,ik->k", w - w_hat, h, w - w_hat) @ g
      for h, g in ((stats.h_text, sens.grad_text), (stats.h_vis, sens.grad_vis))))
  assert obj(_run("sab").w_hat) < 0.97 * obj(_run("arb_rc").w_hat)


def test_model_budget_goes_where_the_loss_is_and_costs_no_more_bits():
  w, _, stats = _layer()
  weight = np.asarray(with_sensitivity(stats, N_OUT).sensitivity.grad_text)[None, :] * np.diag(np.asarray(stats.h))[:, None]
  fixed = salient_split.salient_count("search", 256, structured=True)
  cost = N_OUT + 16 + 8
  even = salient_split.model_salient_budget({"a": (w, weight), "b": (w, weight)}, block_size=128, scale_block=256,
                                            salient_rows="search")
  assert abs(even["a"] - even["b"]) <= 1 and (even["a"] + even["b"]) * cost <= 2 * fixed * cost
  assert even["a"] + even["b"] >= 2 * fixed - 1
  skewed = salient_split.model_salient_budget({"a": (w, 100 * weight), "b": (w, weight)}, block_size=128,
                                              scale_block=256, salient_rows="search")
  assert skewed["a"] > 1.5 * fixed > skewed["b"] and skewed["a"] + skewed["b"] <= 2 * fixed


def test_a_layer_with_no_salient_rows():
  """The model budget may give a layer none: one sign plane with its scales, finite, exact parts."""
  w, _, stats = _layer()
  b = Sab(structured=True, scale_block=128).binarize_with_lambda(jnp.asarray(w), stats, jnp.ones(w.shape),
                                                                 salient_total=0)
  assert int(b.parts.salient_rows.sum()) == 0 and bool(jnp.all(jnp.isfinite(b.w_hat)))
  np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)
  assert b.error["output_rel"] < 1.0


def test_unstructured_layer_total_replaces_the_per_block_count():
  """A fixed fraction with a plan's total: that many salient rows in the layer, spread over the
  blocks where a residual plane helps most, and counted block by block."""
  w, _, stats = _layer()
  h, lam = fisher_objective(stats)
  b = Sab(salient_rows=0.08).binarize_with_lambda(jnp.asarray(w), stats, lam, h=h, salient_total=31)
  sal = np.asarray(b.parts.salient_rows)
  per_block = [int(sal[:128].sum()), int(sal[128:].sum())]
  assert sum(per_block) == 31 and per_block != [10, 10]
  c = bits_core.salient_split_bits(N_IN, N_OUT, block_rows=[128, 128], salient_per_block=per_block, mode="rc",
                                   split=True, salient_groups=True)
  assert b.stored_bits == c.stored_bits
  np.testing.assert_array_equal(base.dequantize(b.parts), b.w_hat)
  with pytest.raises(ValueError, match="fixed salient_rows"):
    salient_split.model_salient_budget({"a": (w, np.ones_like(w))}, block_size=128, scale_block=None,
                                       salient_rows="search")
  searched = Sab(salient_rows="search", salient_budget="layer")
  assert searched.plan({"a": w}, {"a": stats.sensitivity}) == {"a": None}  # searched per block: nothing ahead
  planned = Sab(salient_rows=0.08).plan({"a": w, "b": 2 * w}, {"a": stats.sensitivity, "b": stats.sensitivity})
  assert planned["b"] > planned["a"] and planned["a"] + planned["b"] <= 2 * 20


def test_uniform_ablation_is_arb_rc_on_one_layer():
  """Every output felt alike: the count-weighted Hessian and Λ ≡ 1, i.e. ARB-RC (up to the
  float rounding of the re-weighted Hessian); only its whole-model allocation differs."""
  w, _, stats = _layer()
  uni = Sab(significance="uniform", salient_rows="search", salient_budget="layer")(jnp.asarray(w), stats)
  arb = _run("arb_rc")
  np.testing.assert_array_equal(np.asarray(uni.parts.salient_rows), np.asarray(arb.parts.salient_rows))
  assert uni.error["output_rel"] == pytest.approx(arb.error["output_rel"], rel=1e-3)
