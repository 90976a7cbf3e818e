"""reader.read / reader.load: what they return, and one clear line for every export they refuse."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from export.export_fixture import INT8, ManyDense, binarized, edit_manifest, exported, template
from sab_jax.errors import DamagedExport, UserError
from sab_jax.export import manifest as manifest_lib
from sab_jax.export import reader, writer
from sab_jax.models import llava, paths
from sab_jax.quant import providers


@pytest.fixture
def xnor_export(export_root, tmp_path):
  src = os.path.join(export_root, "xnor_base")
  exported("xnor", src)
  dst = str(tmp_path / "copy")
  shutil.copytree(src, dst)
  return dst


@pytest.fixture(params=["load", "read"])
def loader(request):
  """Every refusal of `load` comes from `read`, so both must raise it."""
  return {"load": reader.load, "read": reader.read}[request.param]


def _refusal(loader, directory, error, match, model_template=None):
  """Calls `loader`, checks it raises `error` matching `match` as one line naming `directory`."""
  with pytest.raises(error, match=match) as e:
    loader(directory, model_template if model_template is not None else template())
  message = str(e.value)
  assert "\n" not in message and directory in message, message
  return message


# --- read -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["pbllm", pytest.param("sab_structured", marks=pytest.mark.slow)])
def test_read_gives_the_providers_parts_and_the_bf16_params(case, export_root):
  model, results, _ = binarized(case)
  directory = os.path.join(export_root, case)
  exported(case, directory)
  tmpl = template()
  before = {p: np.asarray(v.get_value()) for p, v in paths.params(tmpl).items()}
  manifest, parts_by_layer, values = reader.read(directory, tmpl)
  assert manifest == manifest_lib.read_manifest(directory)
  # Parts: exactly what the provider produced, part for part (dtype included).
  assert set(parts_by_layer) == set(results)
  for path, r in results.items():
    want = r.binarized.parts.map(np.asarray).arrays()
    assert type(parts_by_layer[path]) is type(r.binarized.parts)
    assert parts_by_layer[path].meta() == r.binarized.parts.meta()
    got = parts_by_layer[path].arrays()
    assert set(got) == set(want)
    for k in want:
      assert isinstance(got[k], np.ndarray) and got[k].dtype == want[k].dtype, (path, k)
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{path}.{k}")
  # Params: every non-binarized one, its stored bf16 value.
  kernels = {f"{p}.kernel" for p in results}
  src = paths.params(model)
  assert set(values) == set(src) - kernels
  for p, a in values.items():
    assert a.dtype == manifest_lib.PARAM_DTYPE
    np.testing.assert_array_equal(a, np.asarray(src[p].get_value()).astype(manifest_lib.PARAM_DTYPE), err_msg=p)
  # The template is only read, and an abstract one does as well.
  for p, v in paths.params(tmpl).items():
    np.testing.assert_array_equal(np.asarray(v.get_value()), before[p])
  abstract = nnx.eval_shape(lambda: llava.Model("test", rngs=nnx.Rngs(0)))
  _, parts2, values2 = reader.read(directory, abstract)
  assert set(parts2) == set(parts_by_layer) and set(values2) == set(values)


def test_format_version_1_is_read_without_checksums(xnor_export):
  """Exports written before checksums existed still load (and are then not verified)."""
  want, _ = reader.load(xnor_export, template())

  def to_v1(m):
    m["format_version"] = 1
    del m["checksums"]
  edit_manifest(xnor_export, to_v1)
  got, manifest = reader.load(xnor_export, template())
  assert manifest["format_version"] == 1
  for p, v in paths.params(got).items():
    np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(paths.params(want)[p].get_value()))


# --- refusals of exports that do not fit the template or this version -----------------------

def test_unknown_format_version_is_refused(xnor_export, loader):
  edit_manifest(xnor_export, lambda m: m.update(format_version=99))
  _refusal(loader, xnor_export, UserError, r"unknown format_version 99.*reads format_version 2.*re-export")


def test_template_of_another_shape_is_refused(xnor_export, loader):
  cfg = llava.VARIANTS["test"]
  other = llava.Model(llava.config_from_dict({"variant": "test", "text": {"hidden_size": 48}}),
                      rngs=nnx.Rngs(0))
  assert other.cfg != cfg
  _refusal(loader, xnor_export, UserError, r"config differs .*text.hidden_size", other)
  edit_manifest(xnor_export, lambda m: m.update(model_config=None))  # now only shapes can tell
  _refusal(loader, xnor_export, UserError, r"shape \(32, 32\) in the manifest but \(48, 48\) in the template", other)


def test_unknown_provider_is_refused(xnor_export, loader):
  edit_manifest(xnor_export, lambda m: m["provider"].update(name="nope"))
  with pytest.raises(UserError, match="provider 'nope'"):
    loader(xnor_export, template())


# --- refusals of damaged or edited exports --------------------------------------------------

def test_missing_manifest_is_refused(xnor_export, loader):
  os.remove(os.path.join(xnor_export, manifest_lib.MANIFEST))
  _refusal(loader, xnor_export, DamagedExport, "manifest.json is missing.*not a finished export")


@pytest.mark.parametrize("damage", [lambda s: s[:len(s) // 2], lambda s: b"\xff\xfe" + s],
                         ids=["truncated", "not_utf8"])
def test_manifest_that_is_not_json_is_refused(xnor_export, loader, damage):
  path = os.path.join(xnor_export, manifest_lib.MANIFEST)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(damage(data))
  with pytest.raises(DamagedExport) as e:
    loader(xnor_export, template())
  message = str(e.value)
  assert "\n" not in message and message.startswith(path) and "not valid JSON" in message and "re-export" in message
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_manifest_without_a_field_is_refused(xnor_export, loader):
  edit_manifest(xnor_export, lambda m: m["layers"][0]["parts"]["signs"].pop("stored_shape"))
  _refusal(loader, xnor_export, DamagedExport, r"manifest.json: layers\[0\].parts.signs.stored_shape is missing, "
                                               r"expected a list of integers.*re-export")


def test_missing_layer_is_refused(xnor_export, loader):
  edit_manifest(xnor_export, lambda m: m["layers"].pop(1))
  _refusal(loader, xnor_export, DamagedExport,
           r"manifest vs the checkpoint: missing \[\], extra \['language_model")


def test_extra_layer_is_refused(xnor_export, loader):
  def add(m):
    layer = json.loads(json.dumps(m["layers"][0]))
    layer["path"] = "multi_modal_projector.linear_1"
    m["layers"].append(layer)
  edit_manifest(xnor_export, add)
  _refusal(loader, xnor_export, DamagedExport, r"missing \['multi_modal_projector.linear_1.alpha_out'")


def test_stored_shape_disagreeing_with_manifest_is_refused(xnor_export, loader):
  def edit(m):
    m["layers"][0]["parts"]["signs"]["stored_shape"][0] += 1
  edit_manifest(xnor_export, edit)
  _refusal(loader, xnor_export, DamagedExport,
           r"part 'signs' of layer .* is stored as uint32\[\d+, \d+\] but the manifest")


def test_declared_shape_disagreeing_with_packed_bits_is_refused(xnor_export, loader):
  def edit(m):
    m["layers"][0]["parts"]["signs"]["shape"][0] += 40
    m["layers"][0]["parts"]["signs"]["compact_shape"][0] += 40
  edit_manifest(xnor_export, edit)
  _refusal(loader, xnor_export, DamagedExport, "does not decode.*cannot hold")


def test_int8_param_with_a_damaged_scale_is_refused(tmp_path, loader):
  model, results, _ = binarized("xnor")
  directory = str(tmp_path / "e")
  writer.export(model, results, "xnor", providers.Xnor(), directory, int8_params=INT8)

  def edit(m):
    m["params"]["lm_head.kernel"]["scale"]["axis"] = 1
  edit_manifest(directory, edit)
  _refusal(loader, directory, DamagedExport, r"int8 param 'lm_head.kernel' is stored as int8\[32, 64\] with "
                                             r"scales bfloat16\[1, 64\].*damaged")
  edit_manifest(directory, lambda m: m["params"]["lm_head.kernel"].update(dtype="bfloat16"))
  _refusal(loader, directory, DamagedExport, r"int8 params of the manifest vs the checkpoint: missing \[\], "
                                             r"extra \['lm_head.kernel'\]")


def _largest_data_file(directory):
  """The OCDBT data file of DIR/state that holds the arrays (the largest one)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, manifest_lib.STATE)) for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["first_byte", "truncated"])
def test_corrupted_data_file_names_the_array_in_one_line(xnor_export, loader, damage, capfd):
  """zstd frames that no longer decompress: the whole-tree restore fails, the array is found."""
  path = _largest_data_file(xnor_export)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  if damage == "first_byte":
    data[0] ^= 0x10  # the zstd magic number of the first chunk
  else:
    data = data[:len(data) // 2]
  with open(path, "wb") as f:
    f.write(data)
  capfd.readouterr()
  message = _refusal(loader, xnor_export, DamagedExport,
                     r"array '(layers|params)\.[\w.]+' of state/ cannot be read \(.+\); the export is damaged: "
                     r"re-export the model$")
  named = message.split("array '")[1].split("'")[0]
  assert named in manifest_lib.read_manifest(xnor_export)["checksums"]
  assert "Event loop is closed" not in capfd.readouterr().err


@pytest.mark.slow
def test_damaged_data_file_prints_one_error_and_no_asyncio_noise(tmp_path):
  """In a fresh process, as a user meets it: the reads still in flight when the restore fails
  used to print a "RuntimeError: Event loop is closed" traceback each (most runs)."""
  directory = str(tmp_path / "e")
  writer.export(ManyDense(), {}, "xnor", providers.Xnor(), directory)
  path = _largest_data_file(directory)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (f"import sys\nsys.path.insert(0, {tests_dir!r})\n"
          "from export.export_fixture import ManyDense\nfrom sab_jax.export import reader\n"
          f"reader.read({directory!r}, ManyDense())\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 1
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith(f"sab_jax.errors.DamagedExport: {directory}: array 'params.dense_"), p.stderr[-2000:]
  assert "Event loop is closed" not in p.stderr, p.stderr[-2000:]


def test_damaged_orbax_metadata_is_refused(xnor_export, loader):
  with open(os.path.join(xnor_export, manifest_lib.STATE, "_METADATA"), "w") as f:
    f.write("{not json")
  _refusal(loader, xnor_export, DamagedExport, r"state/ cannot be re(ad|stored) .*re-export the model$")


def test_missing_state_is_refused(xnor_export, loader):
  shutil.rmtree(os.path.join(xnor_export, manifest_lib.STATE))
  _refusal(loader, xnor_export, DamagedExport, r"state/ is missing.*re-export the model$")


def _rewrite_state(directory, edit):
  """Restores DIR/state, applies `edit({dotted path: numpy array})` and saves it back in place:
  a change that orbax reads without complaint, as a flipped bit that still decompresses."""
  state_dir = os.path.join(directory, manifest_lib.STATE)
  with ocp.StandardCheckpointer() as ckpt:
    flat = {k: np.array(v) for k, v in manifest_lib.flatten(ckpt.restore(state_dir)).items()}
  edit(flat)
  shutil.rmtree(state_dir)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(state_dir, manifest_lib.nest(flat))


@pytest.mark.parametrize("name", ["layers.language_model.layers.0.self_attn.q_proj.signs",
                                  "params.language_model.norm.scale"])
def test_flipped_bit_that_decompresses_fails_its_checksum(xnor_export, loader, name):
  def flip(flat):
    flat[name].reshape(-1).view(np.uint8)[3] ^= 0x04
  _rewrite_state(xnor_export, flip)
  _refusal(loader, xnor_export, DamagedExport,
           rf"array '{name}' \(\w+\[[\d, ]+\]\) does not match its checksum in manifest.json; the export is "
           r"damaged: re-export the model$")


def test_array_without_a_checksum_is_refused(xnor_export, loader):
  edit_manifest(xnor_export, lambda m: m["checksums"].pop("params.lm_head.kernel"))
  _refusal(loader, xnor_export, DamagedExport,
           r"arrays with a checksum in manifest.json vs arrays in the checkpoint: missing \[\], "
           r"extra \['params.lm_head.kernel'\]")
