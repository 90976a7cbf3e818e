"""experiments/benchmarks/distill_speed.py: runs end to end on the GPU image's packages."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "benchmarks", "distill_speed.py")
# The GPU machine has jax/flax/optax but not these (tests/test_gpu_imports.py).
BLOCK = ("import sys\n"
         "for m in ('ml_collections', 'tensorflow_datasets', 'grain'):\n"
         "  sys.modules[m] = None  # any import of them now fails\n")


# Records each trace of the library's train step (loss, teacher type): the benchmark must time
# `train.train_step` itself, not a copy of it.
SPY = ("import json\n"
       "from sab_jax.train import train as train_lib\n"
       "traced, library_step = [], train_lib.train_step\n"
       "def spy(model, optimizer, teacher, batch, *, loss_fn, wrt, **kw):\n"
       "  name = getattr(loss_fn, 'func', loss_fn).__name__\n"
       "  traced.append([name, type(teacher).__name__, getattr(wrt, '__name__', type(wrt).__name__)])\n"
       "  return library_step(model, optimizer, teacher, batch, loss_fn=loss_fn, wrt=wrt, **kw)\n"
       "train_lib.train_step = spy\n")


@pytest.mark.slow
def test_runs_without_ml_collections_tfds_grain_and_writes_the_timings(tmp_path):
  out = tmp_path / "speed.json"
  code = (BLOCK + SPY + "import runpy\n"
          f"sys.argv = ['distill_speed.py', '--variant', 'test', '--batch', '4', '--steps', '3', '--warmup', '1', "
          f"'--source', 'xnor', '--out', {str(out)!r}]\n"
          f"runpy.run_path({os.path.abspath(SCRIPT)!r}, run_name='__main__')\n"
          f"json.dump(traced, open({str(tmp_path / 'traced.json')!r}, 'w'))\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  # (a) CE, no teacher; (b) the student's latents and scales and (c) every Param, KD against the
  # fixed teacher; (d) the student against the real teacher
  traced = {tuple(t) for t in json.loads((tmp_path / "traced.json").read_text())}
  assert traced == {("answer_cross_entropy", "NoneType", "Param"), ("kd_loss", "FixedTeacher", "Any"),
                    ("kd_loss", "FixedTeacher", "Param"), ("kd_loss", "Llava", "Any")}, traced
  info = json.loads(out.read_text())
  for name in ("fp_ce", "student_kd", "fp_kd", "distill"):
    row = info["rows"][name]
    assert row["median_s"] > 0 and row["tokens_per_s"] > 0, name
    assert len(row["times_s"]) == 3
    assert np.isfinite(row["last_loss"]), name
  assert info["tokens_per_step"] == 4 * 34
  for key in ("student_kd/fp_kd", "distill/fp_ce"):
    assert info["ratios"][key] > 0
  # the student trains only latents and scales, fewer than every Param of the FP model
  assert 0 < info["rows"]["student_kd"]["trained_params"] < info["rows"]["fp_kd"]["trained_params"]
  assert "| (b)/(c) binarization overhead |" in p.stdout


def _script():
  from experiments.benchmarks import distill_speed
  return distill_speed


def test_the_batch_has_the_pipeline_layout():
  from sab_jax.models import llava
  ds = _script()
  cfg = llava.VARIANTS["test"]
  batch = ds.synthetic_batch(cfg, 5, 32, 2)
  assert batch["input_ids"].shape == (5, 34) and batch["pixel_values"].shape == (5, 32, 32, 3)
  ids, mask, lm = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
  assert ((ids == cfg.image_token_id).sum(1) == cfg.num_image_tokens).all()
  assert (ids[:, 32] >= ds.FIRST_WORD).all() and (ids[:, 33] == ds.EOS).all()  # answer word, then eos
  np.testing.assert_array_equal(lm[:, 31:33], 1.0)  # predicts the answer word and eos
  assert lm.sum() == 10 and ((ids != ds.PAD) == (mask == 1)).all()
