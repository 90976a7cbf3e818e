"""writer.export -> reader.load of binarized models: exact kernels and logits, honest bytes, checksums."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from export.export_fixture import CASES, INT8, OneDense, binarized, exported, int8_bound, template
from sab_jax.export import manifest as manifest_lib
from sab_jax.export import packing, reader, writer
from sab_jax.models import llava, paths
from sab_jax.quant import providers
from quant.sensitivity_fixture import with_sensitivity


@nnx.jit
def _logits(model, input_ids, pixel_values, attention_mask):
  return model(input_ids, pixel_values, attention_mask)


def _bf16_rounded_reference(model, binarized_paths):
  """The in-memory binarized model with every non-binarized Param rounded through bf16."""
  ref = nnx.clone(model)
  kernels = {f"{p}.kernel" for p in binarized_paths}
  for path, node in nnx.iter_graph(ref):
    name = ".".join(str(p) for p in path)
    if isinstance(node, nnx.Param) and name not in kernels:
      node.set_value(node.get_value().astype(jnp.bfloat16).astype(node.get_value().dtype))
  return ref


def _fast(cases, fast):
  """Parameters over `cases`, those not in `fast` marked slow."""
  return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in cases]


# Fast: the cases test_reader.py binarizes too (the cache of export_fixture.binarized).
@pytest.mark.parametrize("case", _fast(CASES, {"xnor", "pbllm", "sab_structured"}))
def test_export_load_gives_the_in_memory_model(case, export_root):
  model, results, batches = binarized(case)
  directory = os.path.join(export_root, case)
  out = exported(case, directory)
  tmpl = template()
  loaded, manifest = reader.load(directory, tmpl)
  assert manifest["method"] == case and manifest["provider"]["fields"] == json.loads(
      json.dumps(manifest_lib.provider_spec(CASES[case])["fields"]))
  assert manifest["config"] == {"case": case, "seed": 0}

  # Binarized kernels: bitwise the in-memory ones.
  got, want = dict(paths.dense_layers(loaded)), dict(paths.dense_layers(model))
  for path in results:
    np.testing.assert_array_equal(np.asarray(got[path].kernel[...]), np.asarray(want[path].kernel[...]))
  # Everything: bitwise the in-memory model with its non-binarized params through bf16.
  ref = _bf16_rounded_reference(model, results)
  ref_params = dict(paths.params(ref))
  for p, var in paths.params(loaded).items():
    assert var.get_value().dtype == ref_params[p].get_value().dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref_params[p].get_value()), err_msg=p)
  b = batches[0]
  args = (jnp.asarray(b["input_ids"]), jnp.asarray(b["pixel_values"]), jnp.asarray(b["attention_mask"]))
  logits = np.asarray(_logits(loaded, *args))
  np.testing.assert_array_equal(logits, np.asarray(_logits(ref, *args)))
  assert not np.allclose(logits, np.asarray(_logits(tmpl, *args)))  # the template's values are gone

  # Bit accounting: from the bytes written, and the formula.
  n = sum(r.binarized.w_hat.size for r in results.values())
  assert out["binarized_weights"] == n
  assert out["formula_bits_per_weight"] == pytest.approx(sum(r.binarized.stored_bits for r in results.values()) / n)
  for layer in manifest["layers"]:
    n_in = layer["shape"][0]
    extra = 8 * layer["bits"]["stored_bytes"] - layer["bits"]["formula_stored_bits"]
    # Bytes never undercount the formula; they exceed it only by the salient-row bitmap
    # (in bits, where the formula may count an index list) and < 32 padding bits per
    # compacted vector or packed 1-D flag array (dense planes: in is a multiple of 32 here).
    assert 0 <= extra <= n_in + 32 * len(layer["parts"]), (layer["path"], extra)
  assert out["bits_per_weight"] == pytest.approx(
      8 * sum(l["bits"]["stored_bytes"] for l in manifest["layers"]) / n)
  on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)
  assert out["model_bytes"] == on_disk
  assert manifest["totals"]["bits_per_weight"] == out["bits_per_weight"]


def test_manifest_checksums_every_stored_array(export_root):
  directory = os.path.join(export_root, "xnor_base")
  exported("xnor", directory)
  manifest = manifest_lib.read_manifest(directory)
  assert manifest["format_version"] == manifest_lib.FORMAT_VERSION == 2
  with ocp.StandardCheckpointer() as ckpt:
    state = manifest_lib.flatten(ckpt.restore(os.path.join(directory, manifest_lib.STATE)))
  assert set(manifest["checksums"]) == set(state)
  assert "layers.language_model.layers.0.self_attn.q_proj.signs" in state
  for name, a in state.items():
    assert manifest["checksums"][name] == manifest_lib.array_checksum(np.asarray(a)), name


# PB-LLM at 0.5% salient weights: its mask is written as a 16-bit position list.
CASES_256 = {**CASES, "pbllm_matched": providers.PbLlm(salient_fraction=0.005)}


@pytest.mark.parametrize("case", _fast(CASES_256, {"xnor", "sab_structured", "pbllm_matched"}))
def test_bits_from_bytes_match_the_formula_on_a_256_layer(case, tmp_path):
  n = 256
  model = OneDense(n, n)
  r = np.random.default_rng(1)
  x = (r.normal(size=(512, n)) * r.lognormal(0, 1, n)).astype(np.float32)
  h = jnp.asarray(2 / len(x) * x.T @ x)
  b = CASES_256[case](model.proj.kernel[...], with_sensitivity(providers.LayerStats(h, h, len(x), len(x)), n))
  out = writer.export(model, {"proj": b}, case, CASES_256[case], str(tmp_path / "e"))
  # The bytes counted are those of the arrays orbax holds for the layer.
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(str(tmp_path / "e" / manifest_lib.STATE))
  assert out["binarized_bytes"] == sum(a.nbytes for a in state["layers"]["proj"].values())
  assert out["bits_per_weight"] == 8 * out["binarized_bytes"] / n ** 2
  assert out["formula_bits_per_weight"] == b.stored_bits / n ** 2
  assert out["bits_per_weight"] == pytest.approx(out["formula_bits_per_weight"], rel=0.01)
  assert out["bits_per_weight"] >= out["formula_bits_per_weight"]
  # Dense bit planes are [ceil(in/32), out] uint32 words.
  stored = packing.encode_parts(b.parts.map(np.asarray))
  if "salient_mask" not in b.parts.arrays():
    assert stored["signs"].shape == (n // 32, n) and stored["signs"].nbytes == n // 32 * n * 4
  loaded, _ = reader.load(str(tmp_path / "e"), OneDense(n, n))
  np.testing.assert_array_equal(np.asarray(loaded.proj.kernel[...]), np.asarray(b.w_hat))


def test_export_refuses_bad_inputs(tmp_path):
  model, results, _ = binarized("xnor")

  class Custom(providers.Xnor):
    pass

  with pytest.raises(ValueError, match="not one of"):
    writer.export(model, results, "xnor", Custom(), str(tmp_path / "a"))
  first = next(iter(results.values()))
  with pytest.raises(ValueError, match="not a Dense layer"):
    writer.export(model, {"language_model.norm": first}, "xnor", providers.Xnor(), str(tmp_path / "b"))
  os.makedirs(tmp_path / "c")
  (tmp_path / "c" / "x").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    writer.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "c"))


# --- int8 params ----------------------------------------------------------------------------

def test_int8_embeddings_and_head_round_trip(export_root, tmp_path):
  model, results, _ = binarized("xnor")
  base = exported("xnor", os.path.join(export_root, "xnor_base"))
  out = writer.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "e"), int8_params=INT8)
  src = {p: np.asarray(v.get_value()) for p, v in paths.params(model).items()}
  emb, head = src["language_model.embed_tokens.embedding"], src["lm_head.kernel"]  # [vocab, embed], [embed, vocab]

  manifest = manifest_lib.read_manifest(str(tmp_path / "e"))
  assert manifest["int8_params"] == list(INT8)
  assert manifest["params"]["language_model.embed_tokens.embedding"]["dtype"] == "int8"
  assert manifest["params"]["language_model.embed_tokens.embedding"]["scale"] == {
      "dtype": "bfloat16", "shape": [emb.shape[0], 1], "axis": 1}  # one scale per vocabulary row
  assert manifest["params"]["lm_head.kernel"]["scale"] == {
      "dtype": "bfloat16", "shape": [1, head.shape[1]], "axis": 0}  # one per output channel (logit)
  assert manifest["params"]["language_model.norm.scale"]["dtype"] == "bfloat16"
  assert {"int8_params.lm_head.kernel", "int8_scales.lm_head.kernel"} <= set(manifest["checksums"])

  # Bytes: 1 per entry + 2 per scale instead of 2 per entry; the binarized layers are untouched.
  saved = sum(2 * a.size - (a.size + 2 * n_scales) for a, n_scales in ((emb, emb.shape[0]), (head, head.shape[1])))
  assert out["params_bytes"] == base["params_bytes"] - saved
  assert out["binarized_bytes"] == base["binarized_bytes"]

  # read: float32 values within half a scale step of the originals, per row / output channel.
  _, _, values = reader.read(str(tmp_path / "e"), template())
  for p, a, axis in (("language_model.embed_tokens.embedding", emb, 1), ("lm_head.kernel", head, 0)):
    got = values[p]
    assert got.dtype == np.float32 and got.shape == a.shape
    err = np.max(np.abs(got.astype(np.float64) - a), axis=axis)
    absmax = np.max(np.abs(a.astype(np.float64)), axis=axis)
    assert np.all(err <= int8_bound(absmax)), p
    assert np.all(err > 0)  # really quantized
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(str(tmp_path / "e" / manifest_lib.STATE))
  q = np.asarray(state["int8_params"]["lm_head"]["kernel"])
  scale = np.asarray(state["int8_scales"]["lm_head"]["kernel"])
  assert q.dtype == np.int8 and scale.dtype == manifest_lib.PARAM_DTYPE and np.abs(q).max() == 127
  np.testing.assert_array_equal(values["lm_head.kernel"], q.astype(np.float32) * scale.astype(np.float32))
  assert "lm_head" not in state.get("params", {})

  # load: the dequantized values, cast to the template's dtype.
  loaded, _ = reader.load(str(tmp_path / "e"), template())
  lp = paths.params(loaded)
  for p in ("language_model.embed_tokens.embedding", "lm_head.kernel"):
    np.testing.assert_array_equal(np.asarray(lp[p].get_value()), values[p])
  np.testing.assert_array_equal(np.asarray(lp["language_model.norm.scale"].get_value()),
                                src["language_model.norm.scale"].astype(manifest_lib.PARAM_DTYPE).astype(np.float32))


def test_int8_regex_that_matches_nothing_is_an_error(tmp_path):
  model, results, _ = binarized("xnor")
  with pytest.raises(ValueError, match=r"int8_params regex 'lm_hed\\\\.kernel' matches no non-binarized param"):
    writer.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "a"),
                  int8_params=(INT8[0], r"lm_hed\.kernel"))
  q_proj = next(iter(results))
  with pytest.raises(ValueError, match="matches binarized kernels"):
    writer.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "b"),
                  int8_params=(f"{q_proj}.kernel".replace(".", r"\."),))
  assert not os.path.exists(tmp_path / "a" / manifest_lib.MANIFEST)


# --- abstract kernels -----------------------------------------------------------------------

def test_export_of_an_abstract_model_with_abstract_w_hat(export_root, tmp_path):
  """Only the non-binarized params need values: the bytes, manifest and loaded model match."""
  model, results, _ = binarized("sab_structured")
  concrete = exported("sab_structured", os.path.join(export_root, "sab_structured"))
  abstract = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  kernels = {f"{p}.kernel" for p in results}
  src = paths.params(model)
  for p, var in paths.params(abstract).items():
    if p not in kernels:
      var.set_value(np.asarray(src[p].get_value()))
  assert all(isinstance(paths.params(abstract)[k].get_value(), jax.ShapeDtypeStruct) for k in kernels)
  shaped = {p: dataclasses.replace(r.binarized, w_hat=jax.ShapeDtypeStruct(r.binarized.w_hat.shape, jnp.float32))
            for p, r in results.items()}
  with pytest.raises(ValueError, match="w_hat is abstract.*verify=False"):
    writer.export(abstract, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "v"))
  out = writer.export(abstract, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "e"),
                      verify=False, config={"case": "sab_structured", "seed": 0})
  for k in ("binarized_bytes", "params_bytes", "bits_per_weight", "formula_bits_per_weight", "binarized_weights"):
    assert out[k] == concrete[k], k
  m1 = manifest_lib.read_manifest(str(tmp_path / "e"))
  m0 = manifest_lib.read_manifest(concrete["directory"])
  assert m1["layers"] == m0["layers"] and m1["params"] == m0["params"] and m1["checksums"] == m0["checksums"]
  loaded, _ = reader.load(str(tmp_path / "e"), template())
  got, want = dict(paths.dense_layers(loaded)), dict(paths.dense_layers(model))
  for path in results:
    np.testing.assert_array_equal(np.asarray(got[path].kernel[...]), np.asarray(want[path].kernel[...]))
  # A non-binarized param without a value is refused.
  empty = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="is abstract.*only binarized kernels may be"):
    writer.export(empty, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "x"), verify=False)


def test_a_layer_without_salient_rows_exports_and_loads(tmp_path):
  """Its residual plane is empty: declared in the manifest, not saved (orbax saves no
  zero-size array), and rebuilt on load."""
  n = 128
  model = OneDense(n, n)
  r = np.random.default_rng(2)
  x = r.normal(size=(256, n)).astype(np.float32)
  h = jnp.asarray(2 / len(x) * x.T @ x)
  provider = providers.Sab(structured=True)
  b = provider.binarize_with_lambda(model.proj.kernel[...], providers.LayerStats(h, h, len(x), len(x)),
                                    jnp.ones((n, n)), salient_total=0)
  writer.export(model, {"proj": b}, "sab_structured", provider, str(tmp_path / "e"))
  with open(tmp_path / "e" / manifest_lib.MANIFEST) as f:
    parts = json.load(f)["layers"][0]["parts"]
  assert 0 in parts["residual_signs"]["stored_shape"]
  loaded, _ = reader.load(str(tmp_path / "e"), OneDense(n, n))
  np.testing.assert_array_equal(np.asarray(loaded.proj.kernel[...]), np.asarray(b.w_hat))
