"""Import parity: our Flax LLaVA loaded from a transformers checkpoint gives transformers' logits."""

import json
import os
import struct

import jax
import numpy as np
import pytest

from models.hf_fixture import random_inputs, reference_logits, save_tiny_llava
from models.model_forward import logits
from sab_jax import sharding
from sab_jax.models import hf

CASES = {
    "gqa_untied_default_m2": dict(num_kv_heads=2, tie=False, strategy="default", feature_layer=-2),
    "mha_tied_full_m1": dict(num_kv_heads=4, tie=True, strategy="full", feature_layer=-1),
    "mqa_untied_full_multi": dict(num_kv_heads=1, tie=False, strategy="full", feature_layer=[-3, -1]),
    "gqa_tied_default_m1": dict(num_kv_heads=2, tie=True, strategy="default", feature_layer=-1),
}


@pytest.mark.parametrize("name", [n if n == "gqa_tied_default_m1" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CASES)])
def test_logits_match_transformers(tmp_path, name):
  info = save_tiny_llava(str(tmp_path), **CASES[name])
  ids, pixels = random_inputs(info)
  ref = reference_logits(info, ids, pixels)
  model = hf.from_pretrained(str(tmp_path))
  out = np.asarray(logits(model, ids, pixels))
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() < 1e-4


def _rewrite_keys(path, rename):
  """Rewrites model.safetensors with renamed keys (the other layout transformers uses)."""
  st = hf.SafetensorsFile(os.path.join(path, "model.safetensors"))
  header, blobs, offset = {}, [], 0
  for k in st.keys():
    data = np.ascontiguousarray(st.get(k)).tobytes()
    header[rename(k)] = {"dtype": st.header[k]["dtype"], "shape": st.header[k]["shape"],
                         "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  raw = json.dumps(header).encode()
  del st
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _new_layout(k):
  k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
  k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
  return k.replace("multi_modal_projector.", "model.multi_modal_projector.")


@pytest.mark.slow
def test_new_key_layout_and_sharded_index(tmp_path):
  a, b = tmp_path / "new", tmp_path / "sharded"
  info = save_tiny_llava(str(a))
  _rewrite_keys(str(a), _new_layout)
  save_tiny_llava(str(b), max_shard_size="20KB")
  assert os.path.exists(b / "model.safetensors.index.json")
  ids, pixels = random_inputs(info, seed=3)
  ref = reference_logits(info, ids, pixels)
  for path in (a, b):
    out = np.asarray(hf.from_pretrained(str(path))(ids, pixels))
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.slow
def test_loads_onto_mesh(tmp_path):
  """Each tensor is placed on its sharding straight from the memory map; logits unchanged."""
  info = save_tiny_llava(str(tmp_path))
  ids, pixels = random_inputs(info)
  ref = reference_logits(info, ids, pixels)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  model = hf.from_pretrained(str(tmp_path), mesh=mesh)
  q = model.language_model.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert len(q.addressable_shards) == 8
  assert np.abs(np.asarray(logits(model, ids, pixels)) - ref).max() < 1e-4


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
  save_tiny_llava(str(tmp_path))

  def rename(k):
    if k.endswith("layers.1.mlp.up_proj.weight"):
      return k.replace("up_proj", "upp_proj")          # -> missing up_proj and unexpected upp_proj
    return k

  _rewrite_keys(str(tmp_path), rename)
  cfg = json.load(open(tmp_path / "config.json"))
  cfg["text_config"]["intermediate_size"] = 50         # every MLP tensor now mis-shaped
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError) as e:
    hf.from_pretrained(str(tmp_path))
  msg = str(e.value)
  assert "missing: language_model.layers.1.mlp.up_proj.kernel" in msg
  assert "unexpected: language_model.model.layers.1.mlp.upp_proj.weight" in msg
  assert "mis-shaped: language_model.model.layers.0.mlp.gate_proj.weight" in msg


def test_corrupt_or_truncated_file(tmp_path):
  save_tiny_llava(str(tmp_path))
  f = tmp_path / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    hf.from_pretrained(str(tmp_path))
  f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ValueError, match="corrupt safetensors header"):
    hf.from_pretrained(str(tmp_path))


def test_missing_directory_and_unsupported_rope(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.from_pretrained(str(tmp_path))
  cfg = {"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}
  with pytest.raises(NotImplementedError, match="yarn"):
    hf.config_from_hf(cfg)
