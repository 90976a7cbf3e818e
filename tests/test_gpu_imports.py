"""The GPU machine has jax/flax/optax/orbax but not ml-collections, tfds or grain."""

import subprocess
import sys

GPU_SIDE = ["sab_jax.models.llava", "sab_jax.models.hf", "sab_jax.models.decoding", "sab_jax.calib.calibrate",
            "sab_jax.quant.providers", "sab_jax.train.checkpointing"]


def test_gpu_code_paths_import_without_ml_collections_tfds_grain():
  code = ("import sys\n"
          "for m in ('ml_collections', 'tensorflow_datasets', 'grain'):\n"
          "  sys.modules[m] = None  # any import of them now fails\n"
          + "".join(f"import {m}\n" for m in GPU_SIDE))
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]


def test_speed_benchmark_imports_without_them():
  code = ("import sys, runpy\n"
          "for m in ('ml_collections', 'tensorflow_datasets', 'grain'):\n"
          "  sys.modules[m] = None\n"
          "sys.argv = ['x', '--help']\n"
          "try:\n  runpy.run_path('experiments/benchmarks/binarize_speed.py', run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code == 0\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
