"""The packed inference model (sab_jax/serve/packed.py): PackedDense is the dequantized layer,
and evaluation from an export answers exactly as the in-memory binarized model, on the shipped
teacher: 250 test questions in every serving mode, the whole 2000-question split (slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sab_jax import config_utils, stages
from sab_jax.data import synthetic_vqa
from sab_jax.eval import vqa
from sab_jax.export import writer
from sab_jax.serve import packed
from sab_jax.quant import providers
from quant.sensitivity_fixture import with_sensitivity


def _predictions(ctx, model, max_examples=None, answer_losses=True):
  preds = []
  batches = ctx.batches(ctx.config.data.config, "test", batch_size=250, train=False)
  table = vqa.evaluate(model, batches, ctx.tokenizer, question_types=synthetic_vqa.QUESTION_TYPES,
                       metric="exact_match", max_new_tokens=ctx.config.data.max_answer_len, predictions=preds,
                       max_examples=max_examples, answer_losses=answer_losses)
  return table, preds


@pytest.fixture(scope="module")
def binarized(vqa_data_dir, tmp_path_factory):
  """The shipped teacher binarized with BiLLM and structured SAB (calibrated on `tiny`), every
  non-binarized param through bf16 as the export stores them, and each one's export:
  {name: (model, layers, export directory)}. Evaluation reads the `small` test split (= default's)."""
  tmp = tmp_path_factory.mktemp("packed")
  config = config_utils.load_config("demo", "")
  config.data.data_dir = str(vqa_data_dir)
  config.data.config = "tiny"  # calibration data only; the test split below is 'small' (= default's)
  config.quant.calib_samples, config.quant.calib_batch_size, config.quant.progress = 64, 32, False
  config.quant.methods = ("billm",)
  config.quant.variants = {"sab_structured": {"method": "sab", "structured": True}}
  # on one device, as the served models run: the same programs for both, and 2000 questions decoded
  # in ~2 s instead of ~12 over the suite's 8 simulated devices
  ctx = stages.Context(config, str(tmp / "wd"), devices=jax.devices()[:1])
  stages.stage_teacher(ctx)
  stages.stage_calibrate(ctx)
  stages.stage_binarize(ctx)
  ctx.config.data.config = "small"
  out = {}
  for name, (model, layers, provider) in list(ctx.binarized.items()):
    assert {d for a in jax.tree.leaves(nnx.state(model)) for d in a.devices()} == {jax.devices()[0]}
    # the export stores every non-binarized param in bf16: so does the reference
    kernels = {f"{p}.kernel" for p in layers}
    for path, v in nnx.iter_graph(model):
      if isinstance(v, nnx.Param) and ".".join(map(str, path)) not in kernels:
        v.set_value(v.get_value().astype(jnp.bfloat16).astype(v.get_value().dtype))
    directory = str(tmp / name)
    writer.export(model, layers, name, provider, directory)
    out[name] = (model, layers, directory)
  return ctx, out


@pytest.mark.xdist_group("packed_test_split")  # one worker builds `binarized` for both
def test_export_predictions_equal_in_memory_on_250_test_questions(binarized):
  """The served export in every mode: dequantized, the Pallas kernels (interpret mode here)."""
  ctx, models = binarized
  for name, (model, layers, directory) in models.items():
    ref_table, ref = _predictions(ctx, model, max_examples=250)
    assert ref_table["count"] == 250
    served, _ = packed.from_export(directory, ctx.new_model(), mode="dequant")
    assert any(isinstance(m, packed.PackedDense) for _, m in nnx.iter_graph(served))
    table, got = _predictions(ctx, served, max_examples=250)
    assert got == ref, name
    ce, ref_ce = table.pop("answer_ce"), ref_table.pop("answer_ce")
    assert table == ref_table and ce == pytest.approx(ref_ce, rel=1e-5)
    if next(iter(layers.values())).binarized.parts.planes() is not None:
      fast, _ = packed.from_export(directory, ctx.new_model(), mode="kernel")  # answers only: no losses pass
      fast_table, got_fast = _predictions(ctx, fast, max_examples=250, answer_losses=False)
      assert got_fast == ref and fast_table == ref_table, name  # the same table, less answer_ce
      fused, _ = packed.from_export(directory, ctx.new_model(), mode="kernel", kernel="fused")
      _, got_fused = _predictions(ctx, fused, max_examples=250, answer_losses=False)
      assert got_fused == ref, name


@pytest.mark.slow
@pytest.mark.xdist_group("packed_test_split")
def test_export_predictions_equal_in_memory_on_the_whole_test_split(binarized):
  """The dequantized served export's answers to all 2000 questions (the kernels and the
  answer cross-entropy: the 250-question test)."""
  ctx, models = binarized
  for name, (model, layers, directory) in models.items():
    ref_table, ref = _predictions(ctx, model, answer_losses=False)
    assert ref_table["count"] == 2000
    served, _ = packed.from_export(directory, ctx.new_model(), mode="dequant")
    assert any(isinstance(m, packed.PackedDense) for _, m in nnx.iter_graph(served))
    table, got = _predictions(ctx, served, answer_losses=False)
    assert got == ref and table == ref_table, name


def _stats(rng, n_in, n_out):
  from sab_jax.quant.providers.base import LayerStats
  x = rng.standard_normal((256, n_in)).astype(np.float32)
  h = jnp.asarray(2 / 256 * x.T @ x)
  return with_sensitivity(LayerStats(h, h, 256, 256), n_out)


# Fast: one shape, a layout with bit planes (the kernels) and one without.
FAST_DENSE = {("xnor", 64, 48), ("billm", 64, 48)}


@pytest.mark.parametrize("name,n_in,n_out", [
    pytest.param(name, n_in, n_out, id=f"{name}-{n_in}-{n_out}",
                 marks=() if (name, n_in, n_out) in FAST_DENSE else pytest.mark.slow)
    for n_in, n_out in [(256, 96), (1100, 130), (64, 48)]
    for name in ["xnor", "sab_structured", "arb_rc_structured", "billm", "pbllm"]])
def test_packed_dense_matches_the_dequantized_kernel(name, n_in, n_out):
  rng = np.random.default_rng(n_in)
  provider = {"sab_structured": providers.Sab(structured=True),
              "arb_rc_structured": providers.ArbRc(structured=True)}.get(name) or providers.METHODS[name]()
  w = jnp.asarray(rng.standard_normal((n_in, n_out)).astype(np.float32))
  b = provider(w, _stats(rng, n_in, n_out))
  parts = b.parts.map(np.asarray)
  bias = rng.standard_normal(n_out).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((2, 3, n_in)).astype(np.float32))
  ref = jnp.dot(x, b.w_hat) + bias
  exact = packed.PackedDense(parts, bias=bias, dtype=jnp.float32, mode="dequant")
  assert exact.mode == "dequant" and not any(v.dtype == jnp.float32 and v.ndim == 2 and v.shape == (n_in, n_out)
                                             for v in jax_leaves(exact))
  np.testing.assert_array_equal(np.asarray(exact(x)), np.asarray(ref))
  if name in ("billm", "pbllm"):
    assert parts.planes() is None and packed.planes_for(parts) is None
    with pytest.raises(ValueError, match="do not cover"):
      packed.PackedDense(parts, bias=None, dtype=jnp.float32, mode="kernel")
    return
  for kernel in packed.KERNELS:
    fast = packed.PackedDense(parts, bias=bias, dtype=jnp.float32, mode="kernel", kernel=kernel)
    assert fast.mode == "kernel"
    y = np.asarray(fast(x))  # 6 rows: the dot variant
    assert np.abs(y - np.asarray(ref)).max() <= 1e-5 * np.abs(np.asarray(ref)).max(), kernel
    y2 = np.asarray(fast(x[:1, :2]))  # 2 rows: the multiply-add variant
    assert np.abs(y2 - np.asarray(ref[:1, :2])).max() <= 1e-5 * np.abs(np.asarray(ref)).max(), kernel
  # int8 activations: the popcount kernel (2 rows) and its XLA twin (6 rows) agree; both
  # are the exact layer up to 8-bit activations
  int8 = packed.PackedDense(parts, bias=bias, dtype=jnp.float32, mode="kernel", kernel="fused", activations="int8")
  y8 = np.asarray(int8(x))
  np.testing.assert_allclose(np.asarray(int8(x[:1, :2])), y8[:1, :2], rtol=0, atol=1e-5 * np.abs(y8).max())
  assert 0 < np.abs(y8 - np.asarray(ref)).max() <= 0.05 * np.abs(np.asarray(ref)).max()
  for bad in (dict(kernel="per_plane", mode="kernel"), dict(kernel="fused", mode="dequant")):
    with pytest.raises(ValueError, match="int8"):
      packed.PackedDense(parts, bias=None, dtype=jnp.float32, activations="int8", **bad)
  fast = packed.PackedDense(parts, bias=bias, dtype=jnp.float32, mode="kernel")
  # the bits read by the kernel: ~1 bit per weight for XNOR, + the gathered residual rows for SAB
  bits = sum(int(p["bits"][...].size) * 32 for p in fast.planes)
  assert bits >= n_in * n_out
  if n_in % 32 == 0 and name == "xnor":
    assert bits == n_in * n_out


def jax_leaves(module):
  import jax
  return jax.tree.leaves(nnx.state(module))
