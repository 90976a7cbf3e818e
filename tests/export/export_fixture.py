"""Small binarized test models and their exports, shared by the export tests (built once per session)."""

import functools
import json
import os

import numpy as np
from flax import nnx

from sab_jax import sharding
from sab_jax.calib import calibrate
from sab_jax.export import manifest as manifest_lib
from sab_jax.export import writer
from sab_jax.models import layers, llava
from sab_jax.quant import providers

# Two decoder layers of one shape keep the calibration pass short (compiling each method per
# kernel shape is what costs); every other Dense layer stays in full precision and goes through
# the export in bf16. Other shapes: the 256x256 test of test_writer.py and test_packing.py.
RULES = ((r"language_model\.layers\.[01]\.self_attn\.q_proj", True), (r".*", False))
CASES = {"xnor": providers.Xnor(), "pbllm": providers.PbLlm(), "billm": providers.BiLLM(),
         "arb_rc": providers.ArbRc(), "sab": providers.Sab(), "sab_structured": providers.Sab(structured=True)}
INT8 = (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")


def calibration(cfg, n_batches=1, batch=8, text_len=5, seed=0):
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
    loss_mask = np.zeros((batch, length), np.float32)
    loss_mask[:, -3:-1] = 1.0  # the last text tokens are the "answer" (SAB's significance pass)
    out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
                "pixel_values": r.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
                .astype(np.float32)})
  return out


@functools.cache
def _model(seed):
  """Built once per seed (building is eager and slow); callers get a fresh clone."""
  return llava.Model("test", rngs=nnx.Rngs(seed))


def template():
  """A test model with other initial values: everything `load` returns must come from the export."""
  return nnx.clone(_model(123))


@functools.cache
def binarized(case):
  """(model, {layer path: LayerResult}, calibration batches) of `CASES[case]` on the test model."""
  model = nnx.clone(_model(0))
  batches = calibration(model.cfg)
  results = calibrate.binarize_model(model, batches, CASES[case], RULES,
                                     sharding.make_mesh({"data": 8}), progress=False)
  return model, results, batches


@functools.cache
def exported(case, directory):
  """`writer.export`'s return of `binarized(case)` written to `directory` (once)."""
  model, results, _ = binarized(case)
  return writer.export(model, results, case, CASES[case], directory, config={"case": case, "seed": 0})


def edit_manifest(directory, edit):
  """Applies `edit(manifest_dict)` to DIR/manifest.json in place."""
  path = os.path.join(directory, manifest_lib.MANIFEST)
  with open(path) as f:
    m = json.load(f)
  edit(m)
  with open(path, "w") as f:
    json.dump(m, f)


class OneDense(nnx.Module):
  def __init__(self, n_in, n_out):
    self.proj = layers.Dense(n_in, n_out, rngs=nnx.Rngs(0))


def int8_bound(absmax):
  """Per entry: half a step of the bf16-rounded scale, ≤ absmax/254 · (1 + 2⁻⁸) (int8 module doc)."""
  return absmax / 254 * (1 + 2 ** -8) + 1e-6 * absmax


class ManyDense(nnx.Module):
  """Forty 256x256 Dense layers: a restore of many arrays, for damage in a data file."""

  def __init__(self, n=40, width=256):
    for i in range(n):
      setattr(self, f"dense_{i}", layers.Dense(width, width, rngs=nnx.Rngs(i)))
