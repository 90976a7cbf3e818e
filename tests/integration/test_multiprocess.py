"""Multi-process runs: jax.distributed start-up, the launchers, and training across 2 real processes.

The children get XLA_FLAGS without simulated devices (conftest gives this process 8): each
child has one CPU device, so two processes form a 2-device global mesh. Tests that start real
JAX processes or time a launcher are `serial`: no other pytest-xdist worker runs meanwhile.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

import xla_env
from sab_jax import config_utils, distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
DEMO = os.path.join(REPO, "experiments", "configs", "demo.py")
POD = os.path.join(REPO, "experiments", "configs", "llava7b_pod.py")


def _child_env(**extra):
  env = {k: v for k, v in xla_env.environ().items() if not k.startswith(("SAB_", "SLURM_"))}  # one CPU device each
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _load_config(path, arg=None):
  return config_utils.load_config(path, arg)


@pytest.fixture(scope="module")
def tfds_dir(vqa_data_dir):
  """The `tiny` dataset, built beforehand (tests/conftest.py): processes building it at once collide in TFDS."""
  return vqa_data_dir


def _start(script, n):
  """`python -c script` as n processes joined through the SAB_* variables (as local.sh sets them)."""
  coordinator = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_child_env(SAB_COORDINATOR=coordinator,
                                                                  SAB_NUM_PROCESSES=str(n), SAB_PROCESS_ID=str(i)))
          for i in range(n)]


def _stop(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.communicate()


# --- sab_jax.distributed -------------------------------------------------------------------
def test_detect_reads_the_launchers_environment():
  assert distributed.detect({}) is None
  assert distributed.detect({"SAB_COORDINATOR": "h:1", "SAB_NUM_PROCESSES": "4", "SAB_PROCESS_ID": "3"}) == {
      "coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
  assert distributed.detect({"SAB_COORDINATOR": "h:1", "SAB_NUM_PROCESSES": "1", "SAB_PROCESS_ID": "0"}) is None
  with pytest.raises(ValueError, match="SAB_PROCESS_ID"):
    distributed.detect({"SAB_COORDINATOR": "h:1", "SAB_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="not in"):
    distributed.detect({"SAB_COORDINATOR": "h:1", "SAB_NUM_PROCESSES": "2", "SAB_PROCESS_ID": "2"})
  # Cluster environments: JAX detects the arguments itself.
  assert distributed.detect({"SAB_DISTRIBUTED": "auto"}) == {}
  assert distributed.detect({"SAB_DISTRIBUTED": "auto", "SAB_LOCAL_DEVICE_IDS": "0,1,2"}) == {
      "local_device_ids": [0, 1, 2]}
  assert distributed.detect({"SAB_DISTRIBUTED": "off", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-8]"}) is None
  assert distributed.detect({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-8]"}) == {}
  assert distributed.detect({"SLURM_NTASKS": "8"}) is None  # the sbatch shell itself, not an srun step
  assert distributed.detect({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
  assert distributed.detect({"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}) == {}
  with pytest.raises(ValueError, match="SAB_DISTRIBUTED"):
    distributed.detect({"SAB_DISTRIBUTED": "yes"})


@pytest.mark.serial
def test_failing_process_exits_at_once(tmp_path):
  """Without fail_fast a process that raises waits in JAX's shutdown barrier for the others (minutes)."""
  script = textwrap.dedent("""
      import os, time
      from sab_jax import distributed
      assert distributed.maybe_initialize()
      import jax
      with distributed.fail_fast():
        if os.environ["SAB_PROCESS_ID"] == "1":
          raise RuntimeError("process 1 fails on purpose")
        time.sleep(60)  # process 0 would go on working
      """)
  procs = _start(script, 2)
  try:
    t = time.time()
    _, err = procs[1].communicate(timeout=45)
    assert procs[1].returncode == 1 and "process 1 fails on purpose" in err, err[-2000:]
    assert time.time() - t < 40
  finally:
    _stop(procs)


@pytest.mark.serial
def test_pipeline_reads_a_different_shard_in_each_process(tfds_dir):
  """`pipeline.make_dataset` shards by jax.process_index()/process_count() by default."""
  script = textwrap.dedent(f"""
      import json
      from sab_jax import distributed
      assert distributed.maybe_initialize()
      import jax
      from sab_jax.data import pipeline, synthetic_vqa, tokenizer
      src = synthetic_vqa.build("tiny", {str(tfds_dir)!r}).as_data_source()["train"]
      ds = pipeline.make_dataset(src, tokenizer.WordTokenizer.for_synthetic_vqa(), num_image_tokens=16,
                                 image_mean=pipeline.CLIP_MEAN, image_std=pipeline.CLIP_STD, batch_size=8,
                                 max_prompt_len=32, max_answer_len=2, shuffle=True, num_epochs=1)
      ids = [int(i) for b in ds for i in b["example_id"]]
      print("RESULT", json.dumps({{"process": jax.process_index(), "count": jax.process_count(),
                                   "devices": jax.device_count(), "ids": ids, "n": len(src)}}))
      """)
  procs = _start(script, 2)
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    _stop(procs)
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["count"] == 2 and r["devices"] == 2 for r in results)
  a, b = (set(r["ids"]) for r in results)
  n = results[0]["n"]
  assert len(a) == len(b) == len(results[0]["ids"]) == n // 2  # each reads half, no repeats
  assert not a & b  # and not the same half


# --- launchers -----------------------------------------------------------------------------
def test_launch_scripts_parse():
  for name in ("local.sh", "tpu_pod.sh", "slurm.sbatch"):
    p = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True, text=True)
    assert p.returncode == 0, f"{name}: {p.stderr}"
  if shutil.which("shellcheck"):
    p = subprocess.run(["shellcheck", *(os.path.join(LAUNCH, n) for n in ("local.sh", "tpu_pod.sh", "slurm.sbatch"))],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
  for args in ([], ["tpu", "zone", "project"], ["tpu", "zone", "project", "--"]):
    p = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], capture_output=True, text=True)
    assert p.returncode != 0 and "usage:" in p.stderr, (args, p.stderr)
  p = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh")], capture_output=True, text=True)
  assert p.returncode != 0 and "usage:" in p.stderr


def test_tpu_pod_copies_installs_and_runs_on_all_workers(tmp_path):
  """With a stand-in `gcloud` that records its arguments."""
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$GCLOUD_LOG"; printf "\\n" >> "$GCLOUD_LOG"\n')
  fake.chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", GCLOUD_LOG=str(log), TFDS_DATA_DIR="/mnt/d s")
  p = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "my-tpu", "us-central2-b", "my-proj", "--",
                      f"--config={POD}", "--workdir=/mnt/shared/w", "--config.stages=('data', 'teacher')"],
                     capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0, p.stderr
  calls = [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"]] + [["compute", "tpus", "tpu-vm", "ssh"]] * 2
  for c in calls:
    assert {"--worker=all", "--zone=us-central2-b", "--project=my-proj"} <= set(c)
  assert "--recurse" in calls[0] and calls[0][-1] == "my-tpu:~/"
  install = next(a for a in calls[1] if a.startswith("--command="))
  assert "pip install" in install and "-e ." in install
  run = next(a for a in calls[2] if a.startswith("--command="))[len("--command="):]
  assert "SAB_DISTRIBUTED=auto" in run and "worker_$(hostname).log" in run
  # The remote shell sees the arguments exactly as given here.
  echo = run.replace("python -m sab_jax.main", "printf '<%s>\\n'").replace("cd ~/sab_jax", f"cd {tmp_path}")
  echo = echo.replace("~/sab_logs", str(tmp_path / "logs"))
  out = subprocess.run(["bash", "-c", echo], capture_output=True, text=True).stdout
  assert out.splitlines() == [f"<--config={POD}>", "<--workdir=/mnt/shared/w>", "<--config.stages=('data', 'teacher')>"]


@pytest.mark.serial
def test_local_sh_stops_the_others_when_one_process_fails(tmp_path):
  """With a stand-in `python -m`: process 1 fails at once, process 0 would run a minute."""
  fake = tmp_path / "bin" / "python"
  fake.parent.mkdir()
  fake.write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      if [ "$1" != "-m" ]; then exec {sys.executable} "$@"; fi
      echo "process $SAB_PROCESS_ID of $SAB_NUM_PROCESSES via $SAB_COORDINATOR"
      if [ "$SAB_PROCESS_ID" = 1 ]; then exit 3; fi
      echo $$ > {tmp_path}/sleeper.pid
      exec sleep 60
      """))
  fake.chmod(0o755)
  env = dict(_child_env(), PATH=f"{fake.parent}:{os.environ['PATH']}", NUM_PROCESSES="2")
  t = time.time()
  p = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "--config=c.py", f"--workdir={tmp_path / 'wd'}"],
                     capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 3, p.stderr
  assert time.time() - t < 30
  logs = tmp_path / "wd" / "logs"
  assert re.match(r"process 1 of 2 via 127\.0\.0\.1:\d+", (logs / "process_1.log").read_text())
  assert "process 0 of 2" in (logs / "process_0.log").read_text()
  with pytest.raises(ProcessLookupError):
    os.kill(int((tmp_path / "sleeper.pid").read_text()), 0)


# --- two real processes training the smoke teacher -------------------------------------------
@pytest.mark.slow
@pytest.mark.serial
def test_two_processes_train_one_model(tmp_path, tfds_dir):
  wd, logs = tmp_path / "wd", tmp_path / "logs"
  env = dict(_child_env(TFDS_DATA_DIR=str(tfds_dir)), NUM_PROCESSES="2", LOG_DIR=str(logs))
  p = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), f"--config={DEMO}:smoke,retrain", f"--workdir={wd}",
                      "--config.stages=('data', 'teacher')"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=300)
  text = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  diag = "".join(f"\n--- process {i}:\n{t[-2500:]}" for i, t in enumerate(text)) + p.stderr[-1000:]
  if "results.json.tmp" in diag:
    diag += ("\nKNOWN: every process writes results.json through the same results.json.tmp "
             "(stages.Context.save_results); only process 0 should")
  assert p.returncode == 0, diag
  losses = [re.findall(r"\[teacher\] step (\d+)/4 loss ([\d.]+)", t) for t in text]
  assert [s for s, _ in losses[0]] == ["2", "4"]
  assert losses[0] == losses[1]  # one global computation, seen from both processes
  # One checkpoint tree, written together: each process added its own shard metadata.
  ckpts = wd / "checkpoints"
  assert [d for d, _, _ in os.walk(wd) if os.path.basename(d) == "checkpoints"] == [str(ckpts)]
  assert os.listdir(ckpts) == ["teacher"]
  assert sorted(os.listdir(ckpts / "teacher")) == ["2", "4"]
  assert (ckpts / "teacher" / "4" / "commit_success.txt").exists()
  assert sorted(os.listdir(ckpts / "teacher" / "4" / "params" / "array_metadatas")) == ["process_0", "process_1"]
  assert sorted(os.listdir(wd / "teacher" / "params" / "array_metadatas")) == ["process_0", "process_1"]
  try:
    meta = json.load(open(wd / "teacher" / "meta.json"))
  except json.JSONDecodeError as e:
    pytest.fail(f"teacher/meta.json is damaged ({e}): KNOWN: every process writes it "
                f"(train.checkpointing.save_params), with different train_minutes_this_run; only process 0 should")
  assert meta["final_loss"] == pytest.approx(float(losses[0][-1][1]), abs=1e-4)
  assert json.load(open(wd / "results.json"))["dataset"] == "synthetic_vqa/tiny"


@pytest.mark.slow
@pytest.mark.serial
def test_two_processes_fsdp_pipeline_matches_one_process(tmp_path, tfds_dir):
  """The shipped teacher FSDP-sharded over 2 processes (one CPU device each: fsdp=2), then
  calibrate, binarize, export, distil and evaluate: the teacher answers exactly as in one process, on 25 questions split 13/12
  (unequal shards; evaluation pads them so both processes run the same steps)."""
  # sab only (its structured variant is the same export path; the pod tests run it)
  args = [f"--config={DEMO}:smoke", "--config.quant.methods=('sab',)", "--config.quant.variants={}",
          "--config.distill.variants={}", "--config.eval.batch_size=4",
          "--config.eval.max_examples=25", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
  env = _child_env(TFDS_DATA_DIR=str(tfds_dir))
  # The reference: the teacher's answers from one process, run beside the two (the cores
  # would idle while each process waits for the other).
  one = subprocess.Popen([sys.executable, "-m", "sab_jax.main", f"--workdir={tmp_path / 'one'}", *args,
                          "--config.stages=('data', 'teacher', 'eval_fp', 'calibrate')"], cwd=REPO,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    two = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), f"--workdir={tmp_path / 'two'}", *args,
                          "--config.stages=('data', 'teacher', 'eval_fp', 'calibrate', 'binarize', 'export', "
                          "'distill', 'eval')"], cwd=REPO,
                         env=dict(env, NUM_PROCESSES="2", LOG_DIR=str(tmp_path / "logs")), capture_output=True,
                         text=True, timeout=600)
    _, one_err = one.communicate(timeout=600)
  finally:
    if one.poll() is None:  # the two-process run failed or timed out first
      one.kill()
      one.communicate()
  assert one.returncode == 0, one_err[-3000:]
  logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text()[-2500:] for i in range(2))
  assert two.returncode == 0, logs
  rows = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
  reference = rows(tmp_path / "one" / "predictions" / "fp.jsonl")
  shards = [rows(tmp_path / "two" / "predictions" / f"fp.process{i}.jsonl") for i in range(2)]
  assert [len(s) for s in shards] == [13, 12]
  assert shards[0] == reference[0::2] and shards[1] == reference[1::2]
  results = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("one", "two")}
  assert results["two"]["methods"]["fp"]["accuracy"] == results["one"]["methods"]["fp"]["accuracy"]
  # Both processes drew calibration batches; the Hessians saw all of them.
  assert results["two"]["calibration"]["samples"] == 2 * results["one"]["calibration"]["samples"]
  assert results["two"]["methods"]["sab_kd"]["distilled_from"] == "sab"
  assert not results["two"].get("variants")
  for bucket, name in (("methods", "sab"), ("methods", "sab_kd")):
    entry = results["two"][bucket][name]
    assert entry["count"] == 25 and 0 < entry["bits_per_weight"] < 3.5  # 128-wide layers: sab stores ~3.05
    assert (tmp_path / "two" / entry["export_dir"] / "manifest.json").exists()


# --- the pod config ---------------------------------------------------------------------------
def test_llava7b_pod_config_loads():
  c = _load_config(POD)
  assert isinstance(c, ml_collections.ConfigDict)
  assert set(c.keys()) >= set(_load_config(DEMO).keys())
  assert c.model.variant == "llava-1.5-7b"
  from sab_jax.data import vqav2
  assert c.data.name == vqav2.Vqav2.name and c.eval.split in vqav2.VQAV2_FILES
  assert c.data.config in [b.name for b in vqav2.Vqav2.BUILDER_CONFIGS]
  # To be given on the command line (the run stops with an error naming it otherwise; tests/integration/test_pod_config.py).
  assert c.teacher.init is None and c.data.tokenizer is None and c.teacher.format == "hf"
  c.teacher.init = "/ckpt/llava-1.5-7b-hf"
  assert c.to_dict()["teacher"]["init"] == "/ckpt/llava-1.5-7b-hf"
  from sab_jax.models import llava
  cfg = llava.config_from_dict(c.model.to_dict())
  assert cfg.text.hidden_size == 4096 and cfg.num_image_tokens == 576
  assert c.data.max_prompt_len > cfg.num_image_tokens
  with pytest.raises(ValueError, match="unknown config argument"):
    _load_config(POD, "smoke")
