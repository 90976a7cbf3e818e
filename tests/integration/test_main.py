"""The entry point as a user runs it: results.json contract, resume, and clear failures."""

import json
import os
import subprocess
import sys

import pytest

import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "experiments", "configs", "demo.py")


def _config(arg="smoke", **fields):
  """The demo config as main builds it from `--config=demo.py:arg --config.key=value`."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", DEMO)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config(arg)
  c.update(fields)
  return c


def _run(tmp_path, *args):
  """`python -m sab_jax.main` as README's first command runs it: one CPU device (the
  multi-device pipelines: test_pod_config.py, test_qwen_pod_config.py, test_multiprocess.py)."""
  env = xla_env.environ(TFDS_DATA_DIR=str(tmp_path / "tfds"))
  return subprocess.run([sys.executable, "-m", "sab_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_smoke_retrain_writes_results_and_resumes(tmp_path):
  wd = tmp_path / "wd"
  p = _run(tmp_path, f"--config={DEMO}:smoke,retrain", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.load(open(wd / "results.json"))
  fp = res["methods"]["fp"]
  assert 0.0 <= fp["accuracy"] <= 1.0
  assert fp["model_bytes"] > 0 and fp["bits_per_weight"] == 32.0
  assert res["dataset"] == "synthetic_vqa/tiny" and res["split"] == "test"
  assert set(res["majority_baseline"]) >= {"overall", "count", "relation"}
  assert os.path.exists(wd / "teacher" / "meta.json")
  for name in ("xnor", "pbllm", "billm", "arb_rc", "sab"):
    m = res["methods"][name]
    assert 0.0 <= m["accuracy"] <= 1.0 and m["model_bytes"] > 0
    assert 1.0 <= m["nominal_bits"] <= m["bits_per_weight"] < 4.0
  assert res["variants"]["sab_structured"]["bits_per_weight"] < res["methods"]["sab"]["bits_per_weight"]
  for name, m in {**res["methods"], **res["variants"]}.items():  # evaluated from their packed exports
    if name != "fp":
      assert os.path.exists(wd / m["export_dir"] / "manifest.json") and 0.0 <= m["accuracy"] <= 1.0
      assert m["bits_per_weight"] >= m["formula_bits_per_weight"]
  kd = res["methods"]["sab_kd"]  # quantization-aware distillation from the sab export
  assert kd["distilled_from"] == "sab" and kd["final_loss"] == res["final_loss"] > 0
  assert kd["bits_per_weight"] == res["methods"]["sab"]["bits_per_weight"]
  stepped = res["variants"]["sab_kd_significance"]  # the same source, weights stepped by the significance map
  assert stepped["distilled_from"] == "sab" and stepped["distill_options"]["significance_power"] == 0.5
  assert stepped["bits_per_weight"] == kd["bits_per_weight"] and stepped["final_loss"] != kd["final_loss"]
  # the run ends with its report: the table printed, report.md and report.png written
  report = (wd / "report.md").read_text()
  table = [line for line in report.splitlines() if line.startswith("|")]  # header, rule, one row per model
  assert table[0].split("|")[2].strip() == "method" and "Δ fp" in table[0]
  assert len(table) == 2 + len(res["methods"]) + len(res["variants"])
  assert "\n".join(table) in p.stdout and (wd / "report.png").read_bytes()[:4] == b"\x89PNG"
  again = _run(tmp_path, f"--config={DEMO}:smoke,retrain", f"--workdir={wd}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already trained" in again.stdout and "already in results.json" in again.stdout
  assert "[binarize] sab already in results.json" in again.stdout
  # eval alone on a workdir whose results.json lists exports is a legitimate resume
  from sab_jax import errors, stages
  before = json.load(open(wd / "results.json"))
  assert stages.run(_config("smoke,retrain", stages=("eval",)), str(wd)) == before
  # a significance-stepped distillation needs the map, i.e. this run's calibration batches
  c = _config("smoke,retrain", stages=("teacher", "distill"))
  c.distill.variants = {"sab_kd_p1": {"source": "sab", "significance_power": 1.0}}
  with pytest.raises(errors.MissingPrerequisite, match="stage 'calibrate'"):
    stages.run(c, str(wd))
  assert json.load(open(wd / "results.json")) == before  # nothing lost

  # Step 2 of the shipped teacher's recipe on this step-1 teacher: image coordinates (new,
  # randomly initialised) + the relation curriculum, warm-started from it.
  wd2 = tmp_path / "wd2"
  p = _run(tmp_path, f"--config={DEMO}:smoke,relations", f"--workdir={wd2}", f"--config.teacher.init={wd}/teacher",
           "--config.stages=('data', 'teacher', 'eval_fp')")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "not in it (random init): ['image_coordinate_embedding']" in p.stdout
  meta = json.load(open(wd2 / "teacher" / "meta.json"))
  assert meta["init"] == f"{wd}/teacher" and meta["train"]["phases"][0][1] == {"relation": 0.75, "compare": 0.25}
  assert meta["model"]["variant"] == "demo" and "image_coordinates" not in meta["model"]


@pytest.mark.slow
def test_shipped_teacher_answers_the_test_split(tmp_path):
  """The embedded default: the teacher shipped in the repo loads and answers the first 64
  test questions, spatial relations included (>= 90% on every type on the whole split)."""
  wd = tmp_path / "wd"
  p = _run(tmp_path, f"--config={DEMO}:smoke", f"--workdir={wd}", "--config.stages=('data', 'teacher', 'eval_fp')",
           "--config.data.config=small", "--config.eval.max_examples=64")
  assert p.returncode == 0, p.stderr[-3000:]
  fp = json.load(open(wd / "results.json"))["methods"]["fp"]
  assert fp["accuracy"] >= 0.85  # a random model scores ~0.35
  assert fp["per_type"]["relation"]["count"] >= 8 and fp["per_type"]["relation"]["accuracy"] >= 0.75


def test_unknown_config_key_is_an_error(tmp_path):
  p = _run(tmp_path, f"--config={DEMO}:smoke", f"--workdir={tmp_path / 'wd'}", "--config.train.nmu_steps=3")
  assert p.returncode != 0
  assert "nmu_steps" in p.stderr


def test_unknown_config_argument_is_an_error(tmp_path):
  p = _run(tmp_path, f"--config={DEMO}:smok", f"--workdir={tmp_path / 'wd'}")
  assert p.returncode != 0 and "smok" in p.stderr


@pytest.mark.slow
def test_missing_teacher_names_the_fix(tmp_path):
  p = _run(tmp_path, f"--config={DEMO}:smoke", f"--workdir={tmp_path / 'wd'}",
           f"--config.teacher.init={tmp_path / 'nowhere'}")
  assert p.returncode != 0
  assert "retrain" in p.stderr and "nowhere" in p.stderr


def test_eval_alone_on_an_empty_workdir_is_one_line_naming_the_export_stage(tmp_path):
  wd = tmp_path / "wd"
  p = _run(tmp_path, f"--config={DEMO}:smoke", f"--workdir={wd}", "--config.stages=('eval',)")
  assert p.returncode == 1, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "stage 'eval' needs exports from stage 'export'" in errors[0] and "results.json" in errors[0]
  assert "'binarize', 'export', 'eval'" in errors[0]  # the stages to run instead
  assert not (wd / "results.json").exists()  # not a results.json of nothing, as before


def test_eval_with_no_exports_raises_missing_prerequisite(tmp_path):
  from sab_jax import errors, stages
  with pytest.raises(errors.MissingPrerequisite, match="stage 'export'"):
    stages.run(_config(stages=("eval",)), str(tmp_path))


@pytest.mark.parametrize("order, missing", [
    (("binarize", "export"), "stage 'teacher'"),
    (("data", "teacher", "binarize", "export", "eval"), "the calibration batches from stage 'calibrate'"),
    (("teacher", "binarize", "calibrate"), "stage 'calibrate'"),  # too late
    (("export", "eval"), "the binarized models from stage 'binarize'"),
    (("eval_fp", "teacher"), "stage 'teacher'"),
    (("data", "distill", "eval"), "stage 'teacher'"),
])
def test_a_stage_order_missing_a_prerequisite_is_refused_before_any_work(tmp_path, order, missing):
  from sab_jax import errors, stages
  wd = tmp_path / "wd"
  with pytest.raises(errors.MissingPrerequisite, match=missing) as e:
    stages.run(_config(stages=order), str(wd))
  assert not wd.exists()  # nothing was built, written or trained
  suggested = eval(str(e.value).split("--config.stages=")[1].strip('"'))
  stages.check_order(suggested)  # the order the message proposes is complete
  assert set(order) <= set(suggested)


def test_complete_orders_and_resumable_stages_pass_the_check():
  from sab_jax import stages
  stages.check_order(_config().stages)
  for order in [("data", "teacher", "eval_fp"), ("eval",), ("teacher", "distill", "eval"), ("data",),
                ("teacher", "calibrate", "binarize", "export")]:
    stages.check_order(order)


def test_a_distill_variant_names_its_source_and_known_settings():
  from sab_jax import errors, stages
  dc = _config().distill
  runs = stages._distill_runs(dc)
  assert runs[0][:2] == ("sab_kd", "sab") and runs[0][3] == "methods"
  assert runs[1][0] == "sab_kd_significance" and runs[1][2]["significance_power"] == 0.5
  assert runs[1][2]["clip"] == dc.clip and runs[1][3] == "variants"  # the rest as the sources'
  assert runs[1][2]["train"] == dc.train.to_dict()
  dc.variants = {"fast": {"source": "sab", "train": {"lr": 5e-4}}}
  (_, _, options, _), = stages._distill_runs(dc)[1:]
  assert options["train"] == dict(dc.train.to_dict(), lr=5e-4)
  for bad in ({"source": "sab", "significance_powr": 1.0}, {"significance_power": 1.0},
              {"source": "sab", "train": {"learning_rate": 1.0}}):
    dc.variants = {"x": bad}
    with pytest.raises(errors.UserError, match="config.distill.variants.x"):
      stages._distill_runs(dc)


def test_config_parse_arg_types():
  from sab_jax import config_utils
  a = config_utils.parse_arg("smoke,steps=7,name=x,lr=0.5", smoke=False, steps=1, name="a", lr=1.0)
  assert (a.smoke, a.steps, a.name, a.lr) == (True, 7, "x", 0.5)
  with pytest.raises(ValueError, match="steps"):
    config_utils.parse_arg("steps", steps=1)
