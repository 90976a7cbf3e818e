"""`kill -9` in the middle of distillation, rerun the same command: it resumes and ends
where an uninterrupted run does."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "experiments", "configs", "demo.py")
ARGS = [f"--config={DEMO}:smoke", "--config.quant.methods=('sab',)", "--config.quant.variants={}",
        "--config.distill.variants={}",
        "--config.stages=('data','teacher','calibrate','binarize','export','distill')",
        "--config.distill.train.num_steps=30", "--config.distill.train.checkpoint_every=5",
        "--config.distill.train.log_every=5"]


def _cmd(workdir):
  return [sys.executable, "-m", "sab_jax.main", *ARGS, f"--workdir={workdir}"]


def _env(tmp_path):
  return xla_env.environ(TFDS_DATA_DIR=str(tmp_path / "tfds"))  # one CPU device


def _final_loss(workdir):
  return json.load(open(os.path.join(workdir, "results.json")))["methods"]["sab_kd"]["final_loss"]


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_matches(tmp_path):
  env = _env(tmp_path)
  # The stages before distillation once; both runs start from a copy of their workdir, as a
  # run killed during distillation would have it (the rerun still checks they are skipped).
  prefix = [*ARGS[:-4], "--config.stages=('data','teacher','calibrate','binarize','export')", *ARGS[-3:]]
  first = subprocess.run([sys.executable, "-m", "sab_jax.main", *prefix, f"--workdir={tmp_path / 'a'}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  full = subprocess.run(_cmd(tmp_path / "a"), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert full.returncode == 0, full.stderr[-3000:]

  ckpts = tmp_path / "b" / "checkpoints" / "distill_sab"
  p = subprocess.Popen(_cmd(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
    if any(s >= 10 for s in steps if s < 30):
      break
    time.sleep(0.2)
  assert p.poll() is None, "the run finished before it could be killed"
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  assert not (tmp_path / "b" / "exports" / "sab_kd").exists()

  again = subprocess.run(_cmd(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  m = re.search(r"\[distill_sab\] resuming from checkpoint step (\d+)", again.stdout)
  assert m and 10 <= int(m.group(1)) < 30, again.stdout[-3000:]
  assert "[binarize] sab already in results.json" in again.stdout
  assert _final_loss(tmp_path / "b") == pytest.approx(_final_loss(tmp_path / "a"), rel=0.01)
