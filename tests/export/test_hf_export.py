"""Hugging Face export of a packed export (`sab_jax.export.hf`): transformers loads it as the
binarized model.

One tiny random LLaVA saved by transformers, imported with `hf.from_pretrained`, two decoder
linears binarized (SAB) and lm_head stored int8, exported packed and then to Hugging Face.
The bound on logits: every tensor that is not already bf16 in the export (the two binarized
kernels Ŵ, float32 products of bf16 scales, and the int8 head's `q · scale`) is rounded to
bf16 in OUT, i.e. moved by at most 2⁻⁹ of itself; on this model that moves the logits by
~1e-3 of their range, so 2⁻⁷ of the largest logit is a bound with room, and far below what a
wrong transpose or a missing tensor does (O(1)).
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from export.export_fixture import calibration, edit_manifest
from models.hf_fixture import LLAVA_PROMPT_WORDS, random_inputs, save_tiny_llava, save_word_tokenizer
from sab_jax import sharding
from sab_jax.calib import calibrate
from sab_jax.errors import UserError
from sab_jax.export import hf as hf_export
from sab_jax.export import reader, writer
from sab_jax.models import decoding, hf, llava
from sab_jax.quant import providers
from sab_jax.quant.providers.base import dequantize
from sab_jax.serve import packed

RULES = ((r"language_model\.layers\.[01]\.self_attn\.q_proj", True), (r".*", False))
EXTRA_FILES = {"preprocessor_config.json": '{"crop_size": 32}', "chat_template.jinja": "{{ messages }}"}
EOS, PAD = 2, 3  # save_word_tokenizer's </s> and <pad>


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """The checkpoint, its binarized packed export and that export's Hugging Face export (via the CLI)."""
  root = tmp_path_factory.mktemp("hf_export")
  ckpt = root / "ckpt"
  ckpt.mkdir()
  vocab = save_word_tokenizer(ckpt, LLAVA_PROMPT_WORDS)
  info = save_tiny_llava(str(ckpt), image_token_id=len(vocab))
  for name, text in EXTRA_FILES.items():
    (ckpt / name).write_text(text)
  model = hf.from_pretrained(str(ckpt))
  provider = providers.Sab()
  results = calibrate.binarize_model(model, calibration(model.cfg), provider, RULES, sharding.make_mesh({"data": 8}),
                                     progress=False)
  export_dir = root / "exports" / "sab"
  writer.export(model, results, "sab", provider, str(export_dir), int8_params=(r"lm_head\.kernel",),
                config={"teacher": {"format": "hf", "init": str(ckpt)}})
  out = root / "out"
  written = hf_export.main([f"--export={export_dir}", f"--out={out}"])
  return {"root": root, "ckpt": ckpt, "info": info, "cfg": model.cfg, "export": export_dir, "out": out,
          "written": written}


def _transformers(path) -> transformers.LlavaForConditionalGeneration:
  model, loading = transformers.LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                                              output_loading_info=True)
  assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
  return model.eval()


def _logits(model, ids, pixels) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
                 ).logits.numpy()


@nnx.jit
def _forward(model, ids, pixels):
  return model(ids, pixels)


def _packed_logits(export_dir, cfg, ids, pixels):
  """The packed model of an export (dequant mode) and its logits (template abstract, forward jitted: seconds less)."""
  template = nnx.eval_shape(lambda: llava.Llava(cfg, rngs=nnx.Rngs(1)))
  model = packed.from_export(str(export_dir), template, mode="dequant")[0]
  return model, np.asarray(_forward(model, ids, pixels))


def _tensors(path) -> dict[str, np.ndarray]:
  return {k: np.asarray(st.get(k)) for k, st in hf.open_checkpoint(str(path)).items()}


def _rewrite(src, dst, rename, extra=()):
  """A copy of checkpoint `src` in `dst` with its tensors renamed (and `extra` (name, array) added)."""
  shutil.copytree(src, dst)
  for f in os.listdir(dst):
    if f.endswith(".safetensors"):
      os.remove(os.path.join(dst, f))
  arrays = [(rename(k), a) for k, a in _tensors(src).items()] + list(extra)
  codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
  hf_export.write_safetensors(os.path.join(dst, "model.safetensors"), [
      hf_export.Tensor(k, codes[a.dtype], a.shape, lambda a=a: a) for k, a in arrays])


def _new_layout(k):
  k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
  return k.replace("vision_tower.", "model.vision_tower.vision_model.").replace("multi_modal_projector.",
                                                                                "model.multi_modal_projector.")


def test_transformers_serves_the_packed_model(case):
  """Logits within the bf16 bound of the packed model's, the same greedy answers; our import reads OUT too."""
  ids, pixels = random_inputs(case["info"], batch=3, seed=1)
  served, ref = _packed_logits(case["export"], case["cfg"], ids, pixels)
  model = _transformers(case["out"])
  got = _logits(model, ids, pixels)
  assert np.abs(got - ref).max() <= 2 ** -7 * np.abs(ref).max()
  ours = np.asarray(_forward(hf.from_pretrained(str(case["out"])), ids, pixels))
  assert np.abs(ours - got).max() < 1e-4  # import parity on OUT

  mask = np.ones_like(ids)
  want = np.asarray(decoding.greedy_generate(served, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                                             max_new_tokens=5, eos_id=EOS, pad_id=PAD))
  with torch.no_grad():
    gen = model.generate(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                         attention_mask=torch.from_numpy(mask), do_sample=False, max_new_tokens=5,
                         eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:].numpy()
  gen = np.pad(gen, ((0, 0), (0, 5 - gen.shape[1])), constant_values=PAD)  # it stops once every row has ended
  assert gen.tolist() == want.tolist()


def test_tensors_are_the_exports_values_in_the_sources_names(case):
  """Binarized kernels: the parts' dequantize() rounded to bf16, exactly; other params: the export's values."""
  cfg = case["cfg"]
  template = nnx.eval_shape(lambda: llava.Llava(cfg, rngs=nnx.Rngs(0)))
  manifest, layers, params = reader.read(str(case["export"]), template)
  out, src = _tensors(case["out"]), hf.open_checkpoint(str(case["ckpt"]))
  assert list(out) == list(src)  # the source's names (transformers' own save layout), in its order
  bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16))
  for key, a in out.items():
    path = hf.map_key(key)[0]
    layer = path.removesuffix(".kernel")
    want = bf16(dequantize(layers[layer])) if layer in layers else bf16(params[path])
    assert a.dtype == jnp.bfloat16 and a.shape == src[key].shape(key), key
    assert np.array_equal(a.view(np.uint16), hf.to_hf(key, want, cfg).view(np.uint16)), key
  assert {hf.map_key(k)[0].removesuffix(".kernel") for k in out} >= set(layers) and len(layers) == 2
  assert manifest["params"]["lm_head.kernel"]["dtype"] == "int8"
  for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", *EXTRA_FILES):
    assert (case["out"] / name).read_bytes() == (case["ckpt"] / name).read_bytes()
  prov = json.loads((case["out"] / hf_export.PROVENANCE).read_text())
  assert prov["method"] == "sab" and prov["stored_bits_per_weight"] == manifest["totals"]["bits_per_weight"]
  assert prov["binarized_layers"] == 2 and "dequantize" in prov["kernels"] and prov["names"] == "source"
  assert case["written"]["bytes"] == sum(f.stat().st_size for f in case["out"].iterdir())


@pytest.mark.parametrize("layout", ["new", "hub", "config_only"])
def test_key_layouts_round_trip(case, tmp_path, layout):
  """The source's names are kept (new layout, the hub's old one); a source without weights gets the new layout."""
  src = tmp_path / "src"
  if layout == "config_only":
    src.mkdir()
    shutil.copy(case["ckpt"] / "config.json", src)
  else:
    rename = _new_layout if layout == "new" else lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")
    _rewrite(case["ckpt"], src, rename)
  out = tmp_path / "out"
  info = hf_export.export_hf(str(case["export"]), str(out), source=str(src))
  tensors, reference = _tensors(out), _tensors(case["out"])
  if layout == "config_only":
    assert list(tensors) == list(hf.hf_names(case["cfg"])) and info["names"] == "new layout"
    assert all(k.startswith(("model.language_model.", "model.vision_tower.vision_model.",
                             "model.multi_modal_projector.", "lm_head.")) for k in tensors)
  else:
    assert list(tensors) == list(_tensors(src))
  by_path = {hf.map_key(k)[0]: a for k, a in reference.items()}
  assert all(np.array_equal(a, by_path[hf.map_key(k)[0]]) for k, a in tensors.items())
  ids, pixels = random_inputs(case["info"], seed=2)
  assert np.array_equal(_logits(_transformers(out), ids, pixels), _logits(_transformers(case["out"]), ids, pixels))


def test_tied_head_and_foreign_buffers(tmp_path):
  """A tied lm_head saved anyway gets the embedding; a position_ids buffer is copied unchanged."""
  ckpt, src = tmp_path / "ckpt", tmp_path / "src"
  info = save_tiny_llava(str(ckpt), tie=True, seed=1)
  embed = _tensors(ckpt)["language_model.model.embed_tokens.weight"]
  position_ids = np.arange(info["num_image_tokens"] + 1, dtype=np.int64)[None]
  _rewrite(ckpt, src, lambda k: k, extra=[("language_model.lm_head.weight", embed),
                                           ("vision_tower.embeddings.position_ids", position_ids)])
  model = hf.from_pretrained(str(ckpt))
  export_dir, out = tmp_path / "export", tmp_path / "out"
  writer.export(model, {}, "fp", providers.Sab(), str(export_dir),
                config={"teacher": {"format": "hf", "init": str(src)}})
  hf_export.export_hf(str(export_dir), str(out))
  tensors = _tensors(out)
  assert tensors["vision_tower.embeddings.position_ids"].dtype == np.int64
  assert np.array_equal(tensors["vision_tower.embeddings.position_ids"], position_ids)
  assert np.array_equal(tensors["language_model.lm_head.weight"].view(np.uint16),
                        tensors["language_model.model.embed_tokens.weight"].view(np.uint16))
  assert np.array_equal(tensors["language_model.lm_head.weight"], embed.astype(jnp.bfloat16))
  ids, pixels = random_inputs(info, seed=3)
  _, ref = _packed_logits(export_dir, model.cfg, ids, pixels)
  got = _logits(transformers.LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval(),
                ids, pixels)
  assert np.abs(got - ref).max() < 1e-4  # every param of this export is bf16 already: nothing is rounded


def test_config_to_hf_round_trips_and_builds_transformers_model():
  for name in ("llava-1.5-7b", "llava-1.5-13b", "test"):
    cfg = llava.VARIANTS[name]
    assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(cfg)))) == cfg, name
  cfg = llava.VARIANTS["test"]
  model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**hf.config_to_hf(cfg)))
  theirs = {hf._canonical(k): tuple(v.shape) for k, v in model.state_dict().items()}
  names = hf.hf_names(cfg)
  shapes = {p: tuple(v.get_value().shape) for p, v in
            nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: llava.Llava(cfg, rngs=nnx.Rngs(0)))))}
  shapes = {".".join(map(str, p)): s for p, s in shapes.items()}
  assert {hf._canonical(k): hf.hf_shape(k, shapes[p], cfg) for k, p in names.items()} == theirs
  assert all(hf.map_key(k)[0] == p for k, p in names.items())
  with pytest.raises(UserError, match="image_coordinates"):
    hf.config_to_hf(llava.VARIANTS["demo"])


def _copy_export(case, tmp_path, edit):
  directory = tmp_path / "export"
  shutil.copytree(case["export"], directory)
  edit_manifest(str(directory), edit)
  return str(directory)


def test_refusals_name_the_fix(case, tmp_path, capsys):
  out = str(tmp_path / "out")
  orbax = _copy_export(case, tmp_path, lambda m: m["config"].update(teacher={"format": "orbax", "init": "x"}))
  with pytest.raises(UserError, match="no Hugging Face source.*--source="):
    hf_export.export_hf(orbax, out)
  shutil.rmtree(orbax)
  coords = _copy_export(case, tmp_path, lambda m: m["model_config"].update(image_coordinates=True))
  with pytest.raises(UserError, match="image_coordinates=True"):
    hf_export.export_hf(coords, out, source=str(case["ckpt"]))
  with pytest.raises(UserError, match="does not exist.*--source="):
    hf_export.export_hf(str(case["export"]), out, source=str(tmp_path / "nowhere"))
  other = tmp_path / "other"
  save_tiny_llava(str(other), num_kv_heads=4)
  with pytest.raises(UserError, match="another model.*num_key_value_heads"):
    hf_export.export_hf(str(case["export"]), out, source=str(other))
  with pytest.raises(UserError, match="would replace"):
    hf_export.export_hf(str(case["export"]), str(case["ckpt"]), overwrite=True)
  assert not os.path.exists(out)

  os.makedirs(out)
  open(os.path.join(out, "keep.txt"), "w").close()
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    hf_export.main([f"--export={case['export']}", f"--out={out}"])
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.count("\n") == 1 and "is not empty; pass --overwrite" in err


def test_a_failure_leaves_nothing_half_written(case, tmp_path, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  real = hf_export.write_safetensors

  def fail_after_writing(path, tensors):
    real(path, tensors)
    raise OSError("disk full")

  monkeypatch.setattr(hf_export, "write_safetensors", fail_after_writing)
  with pytest.raises(OSError, match="disk full"):
    hf_export.export_hf(str(case["export"]), str(out), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
  monkeypatch.setattr(hf_export, "write_safetensors", real)
  hf_export.export_hf(str(case["export"]), str(out), overwrite=True, max_shard_bytes=20_000)
  index = json.loads((out / hf_export.INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and all((out / f).stat().st_size <= 20_000 + 4096 for f in files)
  assert not (out / "old.txt").exists()
  tensors = _tensors(out)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
  assert all(np.array_equal(a, b) for a, b in zip(tensors.values(), _tensors(case["out"]).values()))
