"""What the pod-config tests share: VQAv2's words, running a config's pipeline, and checking that
a distilled export, written as a Hugging Face checkpoint, answers in transformers as it did."""

import json
import os
import subprocess
import sys

import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vqav2_texts(manual) -> list[str]:
  """Every question and answer of the VQAv2 fixture files under `manual` (for a tokenizer covering them)."""
  texts = []
  for f in manual.glob("*.json"):
    d = json.loads(f.read_text())
    texts += [q["question"] for q in d.get("questions", [])]
    texts += [a["answer"] for r in d.get("annotations", []) for a in r["answers"]]
  return texts


def run_pipeline(config, root, *overrides, workdir="wd"):
  """`python -m sab_jax.main --config=config` on 8 simulated CPU devices, data under root/tfds."""
  args = [sys.executable, "-m", "sab_jax.main", f"--config={config}", f"--workdir={root / workdir}",
          f"--config.data.data_dir={root / 'tfds'}", *overrides]
  env = xla_env.environ(devices=8, JAX_PLATFORMS="cpu")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def predictions(workdir, name) -> list[dict]:
  return [json.loads(line) for line in (workdir / "predictions" / f"{name}.jsonl").read_text().splitlines()]


def check_hf_export(tmp_path, results, architecture, answers):
  """The distilled binarized model as a Hugging Face checkpoint (sab_jax.export.hf): transformers
  loads it as `architecture` and `answers(model)` equals the pipeline's packed-export predictions."""
  import torch
  import transformers
  from sab_jax.export import hf as hf_export
  out = tmp_path / "sab_kd_hf"
  hf_export.export_hf(str(tmp_path / "wd" / results["methods"]["sab_kd"]["export_dir"]), str(out))
  binarized = getattr(transformers, architecture).from_pretrained(str(out), dtype=torch.float32).eval()
  assert [r["prediction"] for r in predictions(tmp_path / "wd", "sab_kd")] == answers(binarized)
