"""Export -> load of binarized models: exact kernels and logits, honest bytes, clear refusals."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sab_jax import sharding
from sab_jax.calib import calibrate
from sab_jax.export import checkpoint, packing
from sab_jax.models import layers, llava
from sab_jax.quant import providers, rules

# Two decoder layers of one shape keep the calibration pass short (compiling each method per
# kernel shape is what costs); every other Dense layer stays in full precision and goes through
# the export in bf16. Other shapes: the 256x256 test below and tests/export/test_packing.py.
RULES = ((r"language_model\.layers\.[01]\.self_attn\.q_proj", True), (r".*", False))
CASES = {"xnor": providers.Xnor(), "pbllm": providers.PbLlm(), "billm": providers.BiLLM(),
         "arb_rc": providers.ArbRc(), "sab": providers.Sab(), "sab_structured": providers.Sab(structured=True)}


def _calibration(cfg, n_batches=1, batch=8, text_len=5, seed=0):
  """Batches shaped like the pipeline's: [pad, bos, image placeholders..., text...]."""
  r = np.random.default_rng(seed)
  n_img = cfg.num_image_tokens
  length = 2 + n_img + text_len
  out = []
  for _ in range(n_batches):
    ids = np.full((batch, length), 0, np.int32)
    ids[:, 1] = 1
    ids[:, 2:2 + n_img] = cfg.image_token_id
    ids[:, 2 + n_img:] = r.integers(5, cfg.text.vocab_size, (batch, text_len))
    mask = np.ones((batch, length), np.int32)
    mask[:, 0] = 0
    ids[:, 0] = 0
    out.append({"input_ids": ids, "attention_mask": mask,
                "pixel_values": r.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
                .astype(np.float32)})
  return out


@functools.cache
def _model(seed):
  """Built once per seed (building is eager and slow); callers get a fresh clone."""
  return llava.Model("test", rngs=nnx.Rngs(seed))


def _template():
  """A test model with other initial values: everything `load` returns must come from the export."""
  return nnx.clone(_model(123))


@functools.cache
def _binarized(case):
  model = nnx.clone(_model(0))
  batches = _calibration(model.cfg)
  results = calibrate.binarize_model(model, batches, CASES[case], RULES,
                                     sharding.make_mesh({"data": 8}), progress=False)
  return model, results, batches


@functools.cache
def _exported(case, directory):
  model, results, _ = _binarized(case)
  out = checkpoint.export(model, results, case, CASES[case], directory, config={"case": case, "seed": 0})
  return out


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


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("exports"))


@pytest.mark.parametrize("case", list(CASES))
def test_export_load_gives_the_in_memory_model(case, export_root):
  model, results, batches = _binarized(case)
  directory = os.path.join(export_root, case)
  out = _exported(case, directory)
  template = _template()
  loaded, manifest = checkpoint.load(directory, template)
  assert manifest["method"] == case and manifest["provider"]["fields"] == json.loads(
      json.dumps(checkpoint.provider_spec(CASES[case])["fields"]))
  assert manifest["config"] == {"case": case, "seed": 0}

  # Binarized kernels: bitwise the in-memory ones.
  got, want = dict(rules.dense_layers(loaded)), dict(rules.dense_layers(model))
  for path in results:
    np.testing.assert_array_equal(np.asarray(got[path].kernel[...]), np.asarray(want[path].kernel[...]))
  # Everything: bitwise the in-memory model with its non-binarized params through bf16.
  ref = _bf16_rounded_reference(model, results)
  ref_params = dict(checkpoint._params(ref))
  for p, var in checkpoint._params(loaded).items():
    assert var.get_value().dtype == ref_params[p].get_value().dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref_params[p].get_value()), err_msg=p)
  b = batches[0]
  args = (jnp.asarray(b["input_ids"]), jnp.asarray(b["pixel_values"]), jnp.asarray(b["attention_mask"]))
  logits = np.asarray(_logits(loaded, *args))
  np.testing.assert_array_equal(logits, np.asarray(_logits(ref, *args)))
  assert not np.allclose(logits, np.asarray(_logits(template, *args)))  # the template's values are gone

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


class _OneDense(nnx.Module):
  def __init__(self, n_in, n_out):
    self.proj = layers.Dense(n_in, n_out, rngs=nnx.Rngs(0))


# PB-LLM at 0.5% salient weights: its mask is written as a 16-bit position list.
CASES_256 = {**CASES, "pbllm_matched": providers.PbLlm(salient_fraction=0.005)}


@pytest.mark.parametrize("case", list(CASES_256))
def test_bits_from_bytes_match_the_formula_on_a_256_layer(case, tmp_path):
  n = 256
  model = _OneDense(n, n)
  r = np.random.default_rng(1)
  x = (r.normal(size=(512, n)) * r.lognormal(0, 1, n)).astype(np.float32)
  h = jnp.asarray(2 / len(x) * x.T @ x)
  b = CASES_256[case](model.proj.kernel[...], providers.LayerStats(h, h, len(x), len(x)))
  out = checkpoint.export(model, {"proj": b}, case, CASES_256[case], str(tmp_path / "e"))
  # The bytes counted are those of the arrays orbax holds for the layer.
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(str(tmp_path / "e" / checkpoint.STATE))
  assert out["binarized_bytes"] == sum(a.nbytes for a in state["layers"]["proj"].values())
  assert out["bits_per_weight"] == 8 * out["binarized_bytes"] / n ** 2
  assert out["formula_bits_per_weight"] == b.stored_bits / n ** 2
  assert out["bits_per_weight"] == pytest.approx(out["formula_bits_per_weight"], rel=0.01)
  assert out["bits_per_weight"] >= out["formula_bits_per_weight"]
  # Dense bit planes are [ceil(in/32), out] uint32 words.
  stored = packing.encode_parts({k: np.asarray(v) for k, v in b.parts.items()})
  if "salient_mask" not in b.parts:
    assert stored["signs"].shape == (n // 32, n) and stored["signs"].nbytes == n // 32 * n * 4
  loaded, _ = checkpoint.load(str(tmp_path / "e"), _OneDense(n, n))
  np.testing.assert_array_equal(np.asarray(loaded.proj.kernel[...]), np.asarray(b.w_hat))


# --- refusals -------------------------------------------------------------------------------

@pytest.fixture
def xnor_export(export_root, tmp_path):
  src = os.path.join(export_root, "xnor_base")
  _exported("xnor", src)
  dst = str(tmp_path / "copy")
  shutil.copytree(src, dst)
  return dst


def _edit_manifest(directory, edit):
  path = os.path.join(directory, checkpoint.MANIFEST)
  with open(path) as f:
    m = json.load(f)
  edit(m)
  with open(path, "w") as f:
    json.dump(m, f)


@pytest.fixture(params=["load", "read"])
def loader(request):
  """Every refusal of `load` comes from `read`, so both must raise it."""
  return {"load": checkpoint.load, "read": checkpoint.read}[request.param]


def test_unknown_format_version_is_refused(xnor_export, loader):
  _edit_manifest(xnor_export, lambda m: m.update(format_version=2))
  with pytest.raises(ValueError, match=r"unknown format_version 2.*reads format_version 1.*re-export"):
    loader(xnor_export, _template())


def test_missing_manifest_is_refused(xnor_export, loader):
  os.remove(os.path.join(xnor_export, checkpoint.MANIFEST))
  with pytest.raises(ValueError, match="not a finished export"):
    loader(xnor_export, _template())


def test_missing_layer_is_refused(xnor_export, loader):
  _edit_manifest(xnor_export, lambda m: m["layers"].pop(1))
  with pytest.raises(ValueError, match=r"manifest vs the checkpoint: missing \[\], extra \['language_model"):
    loader(xnor_export, _template())


def test_extra_layer_is_refused(xnor_export, loader):
  def add(m):
    layer = json.loads(json.dumps(m["layers"][0]))
    layer["path"] = "multi_modal_projector.linear_1"
    m["layers"].append(layer)
  _edit_manifest(xnor_export, add)
  with pytest.raises(ValueError, match=r"missing \['multi_modal_projector.linear_1.alpha_out'"):
    loader(xnor_export, _template())


def test_stored_shape_disagreeing_with_manifest_is_refused(xnor_export, loader):
  def edit(m):
    m["layers"][0]["parts"]["signs"]["stored_shape"][0] += 1
  _edit_manifest(xnor_export, edit)
  with pytest.raises(ValueError, match=r"part 'signs' of layer .* is stored as uint32\[\d+, \d+\] but the manifest"):
    loader(xnor_export, _template())


def test_declared_shape_disagreeing_with_packed_bits_is_refused(xnor_export, loader):
  def edit(m):
    m["layers"][0]["parts"]["signs"]["shape"][0] += 40
    m["layers"][0]["parts"]["signs"]["compact_shape"][0] += 40
  _edit_manifest(xnor_export, edit)
  with pytest.raises(ValueError, match="does not decode.*cannot hold"):
    loader(xnor_export, _template())


def test_template_of_another_shape_is_refused(xnor_export, loader):
  cfg = llava.VARIANTS["test"]
  other = llava.Model(llava.config_from_dict({"variant": "test", "text": {"hidden_size": 48}}),
                      rngs=nnx.Rngs(0))
  assert other.cfg != cfg
  with pytest.raises(ValueError, match=r"config differs .*text.hidden_size"):
    loader(xnor_export, other)
  _edit_manifest(xnor_export, lambda m: m.update(model_config=None))  # now only shapes can tell
  with pytest.raises(ValueError, match=r"shape \(32, 32\) in the manifest but \(48, 48\) in the template"):
    loader(xnor_export, other)


def test_unknown_provider_is_refused(xnor_export, loader):
  _edit_manifest(xnor_export, lambda m: m["provider"].update(name="nope"))
  with pytest.raises(ValueError, match="provider 'nope'"):
    loader(xnor_export, _template())


def test_export_refuses_bad_inputs(tmp_path):
  model, results, _ = _binarized("xnor")

  class Custom(providers.Xnor):
    pass

  with pytest.raises(ValueError, match="not one of"):
    checkpoint.export(model, results, "xnor", Custom(), str(tmp_path / "a"))
  first = next(iter(results.values()))
  with pytest.raises(ValueError, match="not a Dense layer"):
    checkpoint.export(model, {"language_model.norm": first}, "xnor", providers.Xnor(), str(tmp_path / "b"))
  os.makedirs(tmp_path / "c")
  (tmp_path / "c" / "x").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    checkpoint.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "c"))


def test_manifest_round_trips_the_provider():
  for p in CASES.values():
    spec = json.loads(json.dumps(checkpoint.provider_spec(p)))
    assert checkpoint.provider_from_spec(spec) == p
    assert spec["class"] == type(p).__name__ and spec["repr"] == repr(p)


# --- read -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["pbllm", "sab_structured"])
def test_read_gives_the_providers_parts_and_the_bf16_params(case, export_root):
  model, results, _ = _binarized(case)
  directory = os.path.join(export_root, case)
  _exported(case, directory)
  template = _template()
  before = {p: np.asarray(v.get_value()) for p, v in checkpoint._params(template).items()}
  manifest, parts_by_layer, values = checkpoint.read(directory, template)
  assert manifest == checkpoint.read_manifest(directory)
  # Parts: exactly what the provider produced, part for part (dtype included).
  assert set(parts_by_layer) == set(results)
  for path, r in results.items():
    want = {k: np.asarray(v) for k, v in r.binarized.parts.items()}
    got = parts_by_layer[path]
    assert set(got) == set(want)
    for k in want:
      assert isinstance(got[k], np.ndarray) and got[k].dtype == want[k].dtype, (path, k)
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{path}.{k}")
  # Params: every non-binarized one, its stored bf16 value.
  kernels = {f"{p}.kernel" for p in results}
  src = checkpoint._params(model)
  assert set(values) == set(src) - kernels
  for p, a in values.items():
    assert a.dtype == checkpoint.PARAM_DTYPE
    np.testing.assert_array_equal(a, np.asarray(src[p].get_value()).astype(checkpoint.PARAM_DTYPE), err_msg=p)
  # The template is only read, and an abstract one does as well.
  for p, v in checkpoint._params(template).items():
    np.testing.assert_array_equal(np.asarray(v.get_value()), before[p])
  abstract = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  _, parts2, values2 = checkpoint.read(directory, abstract)
  assert set(parts2) == set(parts_by_layer) and set(values2) == set(values)


# --- int8 params ----------------------------------------------------------------------------

INT8 = (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")


def _int8_bound(absmax):
  """Per entry: half a step of the bf16-rounded scale, ≤ absmax/254 · (1 + 2⁻⁸) (module doc)."""
  return absmax / 254 * (1 + 2 ** -8) + 1e-6 * absmax


def test_int8_embeddings_and_head_round_trip(export_root, tmp_path):
  model, results, _ = _binarized("xnor")
  base = _exported("xnor", os.path.join(export_root, "xnor_base"))
  out = checkpoint.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "e"), int8_params=INT8)
  src = {p: np.asarray(v.get_value()) for p, v in checkpoint._params(model).items()}
  emb, head = src["language_model.embed_tokens.embedding"], src["lm_head.kernel"]  # [vocab, embed], [embed, vocab]

  manifest = checkpoint.read_manifest(str(tmp_path / "e"))
  assert manifest["int8_params"] == list(INT8)
  assert manifest["params"]["language_model.embed_tokens.embedding"]["dtype"] == "int8"
  assert manifest["params"]["language_model.embed_tokens.embedding"]["scale"] == {
      "dtype": "bfloat16", "shape": [emb.shape[0], 1], "axis": 1}  # one scale per vocabulary row
  assert manifest["params"]["lm_head.kernel"]["scale"] == {
      "dtype": "bfloat16", "shape": [1, head.shape[1]], "axis": 0}  # one per output channel (logit)
  assert manifest["params"]["language_model.norm.scale"]["dtype"] == "bfloat16"

  # Bytes: 1 per entry + 2 per scale instead of 2 per entry; the binarized layers are untouched.
  saved = sum(2 * a.size - (a.size + 2 * n_scales) for a, n_scales in ((emb, emb.shape[0]), (head, head.shape[1])))
  assert out["params_bytes"] == base["params_bytes"] - saved
  assert out["binarized_bytes"] == base["binarized_bytes"]

  # read: float32 values within half a scale step of the originals, per row / output channel.
  _, _, values = checkpoint.read(str(tmp_path / "e"), _template())
  for p, a, axis in (("language_model.embed_tokens.embedding", emb, 1), ("lm_head.kernel", head, 0)):
    got = values[p]
    assert got.dtype == np.float32 and got.shape == a.shape
    err = np.max(np.abs(got.astype(np.float64) - a), axis=axis)
    absmax = np.max(np.abs(a.astype(np.float64)), axis=axis)
    assert np.all(err <= _int8_bound(absmax)), p
    assert np.all(err > 0)  # really quantized
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(str(tmp_path / "e" / checkpoint.STATE))
  q = np.asarray(state["int8_params"]["lm_head"]["kernel"])
  scale = np.asarray(state["int8_scales"]["lm_head"]["kernel"])
  assert q.dtype == np.int8 and scale.dtype == checkpoint.PARAM_DTYPE and np.abs(q).max() == 127
  np.testing.assert_array_equal(values["lm_head.kernel"], q.astype(np.float32) * scale.astype(np.float32))
  assert "lm_head" not in state.get("params", {})

  # load: the dequantized values, cast to the template's dtype.
  loaded, _ = checkpoint.load(str(tmp_path / "e"), _template())
  lp = checkpoint._params(loaded)
  for p in ("language_model.embed_tokens.embedding", "lm_head.kernel"):
    np.testing.assert_array_equal(np.asarray(lp[p].get_value()), values[p])
  np.testing.assert_array_equal(np.asarray(lp["language_model.norm.scale"].get_value()),
                                src["language_model.norm.scale"].astype(checkpoint.PARAM_DTYPE).astype(np.float32))


def test_int8_regex_that_matches_nothing_is_an_error(tmp_path):
  model, results, _ = _binarized("xnor")
  with pytest.raises(ValueError, match=r"int8_params regex 'lm_hed\\\\.kernel' matches no non-binarized param"):
    checkpoint.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "a"),
                      int8_params=(INT8[0], r"lm_hed\.kernel"))
  q_proj = next(iter(results))
  with pytest.raises(ValueError, match="matches binarized kernels"):
    checkpoint.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "b"),
                      int8_params=(f"{q_proj}.kernel".replace(".", r"\."),))
  assert not os.path.exists(tmp_path / "a" / checkpoint.MANIFEST)


def test_int8_quantizer_edge_cases():
  r = np.random.default_rng(0)
  # Rows spanning decades of magnitude, a zero row, a vector (one scale), bf16 input.
  x = (r.normal(size=(50, 300)) * np.logspace(-6, 3, 50)[:, None]).astype(np.float32)
  x[7] = 0
  for a, axis in ((x, 1), (x, 0), (x[3], 0), (x.astype(checkpoint.PARAM_DTYPE), 1)):
    q, s = checkpoint.quantize_int8(a, axis)
    want = list(a.shape)
    want[axis] = 1
    assert q.dtype == np.int8 and s.dtype == checkpoint.PARAM_DTYPE and list(s.shape) == want
    back = checkpoint.dequantize_int8(q, s)
    a64 = np.asarray(a, np.float64)
    absmax = np.max(np.abs(a64), axis=axis, keepdims=True)
    assert np.all(np.abs(back - a64) <= _int8_bound(absmax))
    assert np.all(np.abs(back - a64) <= np.asarray(s, np.float64) / 2 + 1e-6 * absmax)  # nothing clipped further
  assert not checkpoint.quantize_int8(x, 1)[0][7].any()
  x[2, 5] = np.nan
  with pytest.raises(ValueError, match="finite"):
    checkpoint.quantize_int8(x, 1)


# --- abstract kernels -----------------------------------------------------------------------

def test_export_of_an_abstract_model_with_abstract_w_hat(export_root, tmp_path):
  """Only the non-binarized params need values: the bytes, manifest and loaded model match."""
  model, results, _ = _binarized("sab_structured")
  concrete = _exported("sab_structured", os.path.join(export_root, "sab_structured"))
  abstract = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  kernels = {f"{p}.kernel" for p in results}
  src = checkpoint._params(model)
  for p, var in checkpoint._params(abstract).items():
    if p not in kernels:
      var.set_value(np.asarray(src[p].get_value()))
  assert all(isinstance(checkpoint._params(abstract)[k].get_value(), jax.ShapeDtypeStruct) for k in kernels)
  shaped = {p: dataclasses.replace(r.binarized, w_hat=jax.ShapeDtypeStruct(r.binarized.w_hat.shape, jnp.float32))
            for p, r in results.items()}
  with pytest.raises(ValueError, match="w_hat is abstract.*verify=False"):
    checkpoint.export(abstract, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "v"))
  out = checkpoint.export(abstract, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "e"),
                          verify=False, config={"case": "sab_structured", "seed": 0})
  for k in ("binarized_bytes", "params_bytes", "bits_per_weight", "formula_bits_per_weight", "binarized_weights"):
    assert out[k] == concrete[k], k
  m1 = checkpoint.read_manifest(str(tmp_path / "e"))
  m0 = checkpoint.read_manifest(concrete["directory"])
  assert m1["layers"] == m0["layers"] and m1["params"] == m0["params"]
  loaded, _ = checkpoint.load(str(tmp_path / "e"), _template())
  got, want = dict(rules.dense_layers(loaded)), dict(rules.dense_layers(model))
  for path in results:
    np.testing.assert_array_equal(np.asarray(got[path].kernel[...]), np.asarray(want[path].kernel[...]))
  # A non-binarized param without a value is refused.
  empty = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="is abstract.*only binarized kernels may be"):
    checkpoint.export(empty, shaped, "sab_structured", CASES["sab_structured"], str(tmp_path / "x"), verify=False)


def test_int8_param_with_a_damaged_scale_is_refused(tmp_path, loader):
  model, results, _ = _binarized("xnor")
  checkpoint.export(model, results, "xnor", providers.Xnor(), str(tmp_path / "e"), int8_params=INT8)

  def edit(m):
    m["params"]["lm_head.kernel"]["scale"]["axis"] = 1
  _edit_manifest(str(tmp_path / "e"), edit)
  with pytest.raises(ValueError, match=r"int8 param 'lm_head.kernel' is stored as int8\[32, 64\] with scales "
                                       r"bfloat16\[1, 64\].*damaged"):
    loader(str(tmp_path / "e"), _template())
  _edit_manifest(str(tmp_path / "e"), lambda m: m["params"]["lm_head.kernel"].update(dtype="bfloat16"))
  with pytest.raises(ValueError, match=r"int8 params of the manifest vs the checkpoint: missing \[\], "
                                       r"extra \['lm_head.kernel'\]"):
    loader(str(tmp_path / "e"), _template())
