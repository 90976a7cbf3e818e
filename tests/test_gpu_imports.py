"""The GPU machine has jax/flax/optax/orbax but not ml-collections, tfds or grain."""

import subprocess
import sys

import pytest

GPU_SIDE = ["sab_jax.models.llava", "sab_jax.models.hf", "sab_jax.models.decoding", "sab_jax.calib.calibrate",
            "sab_jax.quant.providers", "sab_jax.train.checkpointing",
            "sab_jax.export.writer", "sab_jax.export.reader", "sab_jax.export.hf", "sab_jax.serve.packed",
            "sab_jax.quant.binary_dense",
            "sab_jax.kernels.packed_matmul",
            "sab_jax.kernels.packed_layer"]
BLOCK = ("import sys\n"
         "for m in ('ml_collections', 'tensorflow_datasets', 'grain'):\n"
         "  sys.modules[m] = None  # any import of them now fails\n")


def test_gpu_code_paths_import_without_ml_collections_tfds_grain():
  code = BLOCK + "".join(f"import {m}\n" for m in GPU_SIDE)
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("script", ["binarize_speed.py", pytest.param("packed_matmul_speed.py", marks=pytest.mark.slow),
                                    pytest.param("export_size.py", marks=pytest.mark.slow)])
def test_gpu_benchmarks_import_without_them(script):
  code = (BLOCK + "import runpy\n"
          "sys.argv = ['x', '--help']\n"
          f"try:\n  runpy.run_path('experiments/benchmarks/{script}', run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code == 0\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
