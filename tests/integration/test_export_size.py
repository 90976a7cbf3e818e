"""experiments/benchmarks/export_size.py: its synthetic parts are the structured-SAB layout, and it runs."""

import functools
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.benchmarks import export_size
from sab_jax import export as export_lib
from sab_jax.export import packing
from sab_jax.models import layers, paths
from sab_jax.quant import providers
from sab_jax.quant.core import bits_core
from quant.sensitivity_fixture import with_sensitivity

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "export_size.py")

# The synthetic parts put the same salient-row count in every group; the provider's default
# spreads that total over the groups (salient_budget="layer"), which writes the same bytes
# (checked below), so the layout comparison pins the per-group budget.
SAB = providers.Sab(structured=True, salient_budget="group")


class _OneDense(nnx.Module):
  def __init__(self, n_in, n_out):
    self.proj = layers.Dense(n_in, n_out, rngs=nnx.Rngs(0))


@functools.cache
def _real(shape, provider=SAB):
  """`provider` on a random kernel with random LayerStats (as tests/quant builds them)."""
  r = np.random.default_rng(0)
  n_in = shape[0]
  x_t = r.normal(size=(512, n_in)) * r.lognormal(0, 1, n_in)
  x_v = r.normal(size=(256, n_in)) * r.lognormal(0, 1, n_in)
  stats = providers.LayerStats(jnp.asarray(2 / len(x_t) * x_t.T @ x_t, jnp.float32),
                               jnp.asarray(2 / len(x_v) * x_v.T @ x_v, jnp.float32), len(x_t), len(x_v))
  w = jnp.asarray(r.normal(size=shape) / np.sqrt(n_in), jnp.float32)
  return provider(w, with_sensitivity(stats, shape[1]))


# 1024x768: two full 512-row groups. 588x64 (LLaVA's patch embedding rows): a full group and
# a partial one of 76 rows, and `in` not a multiple of 32.
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1024, 768), (588, 64)])
def test_synthetic_parts_have_the_providers_layout_and_bytes(shape, tmp_path):
  real = _real(shape)
  syn = export_size.synthetic_structured_sab(shape, SAB, np.random.default_rng(1))
  rp = real.parts.map(np.asarray)
  sp = syn.parts
  assert type(sp) is type(rp) and sp.meta() == rp.meta()
  sp.check()
  rp, sp = rp.arrays(), sp.arrays()
  assert set(sp) == set(rp) == {"signs", "residual_signs", "salient_rows", "alpha_in", "alpha_out"}
  for k in rp:
    assert (sp[k].shape, sp[k].dtype) == (rp[k].shape, rp[k].dtype), k
  n_in = shape[0]
  rows = bits_core.block_rows(n_in, SAB.scale_block)
  for typed, parts in ((real.parts.map(np.asarray), rp), (syn.parts, sp)):
    sal = parts["salient_rows"]
    # Salient rows per 512-row group: round(0.08 * 512) = 41, or all rows of a smaller group.
    assert [int(sal[i * 512:i * 512 + r].sum()) for i, r in enumerate(rows)] == [min(41, r) for r in rows]
    # Sparse fill: the residual plane only on salient rows, alpha_in[:, 1] == 1 elsewhere.
    assert not parts["residual_signs"][~sal].any() and parts["residual_signs"][sal].any()
    assert np.all(parts["alpha_in"][~sal, 1] == 1.0)  # (a salient row's may be 1.0 too, in bf16)
    assert np.all(parts["alpha_out"].astype(np.float32) != 0)
    assert set(packing.sparse_parts(typed)) == {"residual_signs", "alpha_in"}
    packing.compact_parts(typed)  # raises if a sparse part holds anything but its fill off its selection
  assert sp["signs"].mean() == pytest.approx(0.5, abs=0.02)
  assert (syn.stored_bits, syn.nominal_bits) == (real.stored_bits, real.nominal_bits)
  assert syn.w_hat.shape == real.w_hat.shape and syn.w_hat.dtype == real.w_hat.dtype

  # The same bytes and manifest entries from export (the real one verified bit-exactly).
  out_r = export_lib.export(_OneDense(*shape), {"proj": real}, "sab", SAB, str(tmp_path / "r"))
  out_s = export_lib.export(_OneDense(*shape), {"proj": syn}, "sab", SAB, str(tmp_path / "s"), verify=False)
  for k in ("binarized_bytes", "bits_per_weight", "formula_bits_per_weight", "nominal_bits", "binarized_weights"):
    assert out_s[k] == out_r[k], k
  lr = export_lib.read_manifest(str(tmp_path / "r"))["layers"]
  ls = export_lib.read_manifest(str(tmp_path / "s"))["layers"]
  assert ls == lr
  # The default, layer-wide budget: other counts per group, the same total and the same bytes.
  spread = _real(shape, providers.Sab(structured=True))
  sal = np.asarray(spread.parts.salient_rows)
  assert sal.sum() == rp["salient_rows"].sum()
  out_l = export_lib.export(_OneDense(*shape), {"proj": spread}, "sab", SAB, str(tmp_path / "l"))
  assert (out_l["binarized_bytes"], out_l["bits_per_weight"]) == (out_r["binarized_bytes"], out_r["bits_per_weight"])
  # The synthetic export loads (its parts decode and dequantize).
  loaded, _ = export_lib.load(str(tmp_path / "s"), _OneDense(*shape))
  assert np.all(np.isfinite(np.asarray(loaded.proj.kernel[...])))


def test_synthetic_layers_are_lazy_and_deterministic():
  lay = export_size.SyntheticLayers({"a": (64, 32), "b": (96, 16)}, SAB, seed=3)
  assert list(lay) == ["a", "b"] and len(lay) == 2
  np.testing.assert_array_equal(lay["a"].parts.signs, lay["a"].parts.signs)
  assert not np.array_equal(lay["a"].parts.signs[:, :16], lay["b"].parts.signs[:64])
  with pytest.raises(ValueError, match="not a structured"):
    export_size.synthetic_structured_sab((64, 32), providers.Sab(), np.random.default_rng(0))


def test_benchmark_runs_on_the_test_variant(tmp_path):
  out = tmp_path / "size.json"
  report = export_size.main(["--variant", "test", "--out", str(out), "--workdir", str(tmp_path / "w"), "--keep"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  rows = {r["config"]: r for r in report["rows"]}
  assert list(rows) == ["a", "b", "c"]
  model = export_size.abstract_model(export_size.families.VARIANTS["test"])
  n_params = sum(int(np.prod(v.get_value().shape)) for v in paths.params(model).values())
  assert report["total_params"] == n_params
  for c, r in rows.items():
    d = tmp_path / "w" / c
    assert r["model_bytes"] == sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)
    assert r["fp16_bytes"] == 2 * n_params
    manifest = export_lib.read_manifest(str(d))
    assert r["binarized_bytes"] == sum(l["bits"]["stored_bytes"] for l in manifest["layers"])
    assert r["binarized_layers"] == len(manifest["layers"])
    assert manifest["totals"]["params_bytes"] == r["params_bytes"]
  assert rows["a"]["int8_params"] == [] and rows["b"]["int8_params"] == list(export_size.INT8)
  assert rows["a"]["binarized_bytes"] == rows["b"]["binarized_bytes"] < rows["c"]["binarized_bytes"]
  assert rows["a"]["params_bytes"] > rows["b"]["params_bytes"] > rows["c"]["params_bytes"]
  assert rows["a"]["decoder_bytes"] == rows["c"]["decoder_bytes"]
  assert all(p.startswith("language_model.layers.")
             for p in (l["path"] for l in export_lib.read_manifest(str(tmp_path / "w" / "a"))["layers"]))


def test_benchmark_imports_without_ml_collections_tfds_grain():
  code = ("import sys, runpy\n"
          "for m in ('ml_collections', 'tensorflow_datasets', 'grain'):\n"
          "  sys.modules[m] = None\n"
          "sys.argv = ['x', '--help']\n"
          f"try:\n  runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code == 0\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
