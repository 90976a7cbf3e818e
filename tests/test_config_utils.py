"""Config arguments are parsed strictly, and configs load as modules by name or path."""

import os

import pytest

from sab_jax import config_utils
from sab_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(smoke=False, steps=1, lr=1.0, name="a")


@pytest.mark.parametrize("arg,smoke", [("smoke", True), ("smoke=True", True), ("smoke=yes", True), ("smoke=1", True),
                                       ("smoke=False", False), ("smoke=false", False), ("smoke=0", False),
                                       ("smoke=NO", False), ("", False), (None, False)])
def test_booleans(arg, smoke):
  assert config_utils.parse_arg(arg, **DEFAULTS).smoke is smoke


@pytest.mark.parametrize("value", ["ture", "2", "", "on", "None"])
def test_a_bad_boolean_names_the_argument_the_value_and_the_accepted_values(value):
  with pytest.raises(UserError) as e:
    config_utils.parse_arg(f"smoke={value}", **DEFAULTS)
  assert "smoke" in str(e.value) and repr(value) in str(e.value) and "true/false" in str(e.value)


def test_numbers_and_strings():
  a = config_utils.parse_arg("steps=-7,lr=3,name=x=y", **DEFAULTS)
  assert (a.steps, a.lr, a.name) == (-7, 3.0, "x=y") and type(a.lr) is float
  assert config_utils.parse_arg("steps=1_000,lr=1e-3", **DEFAULTS).to_dict() == dict(DEFAULTS, steps=1000, lr=1e-3)


@pytest.mark.parametrize("arg,expected", [("steps=1.5", "integer"), ("steps=True", "integer"), ("steps=x", "integer"),
                                          ("steps=", "integer"), ("lr=fast", "number"), ("lr=True", "number"),
                                          ("steps", "needs a value"), ("lr", "needs a value")])
def test_a_bad_number_is_an_error(arg, expected):
  with pytest.raises(UserError, match=expected) as e:
    config_utils.parse_arg(arg, **DEFAULTS)
  assert arg.partition("=")[0] in str(e.value)


def test_an_unknown_key_is_an_error_naming_the_known_ones():
  with pytest.raises(UserError, match=r"unknown config argument 'smok'.*\['lr', 'name', 'smoke', 'steps'\]"):
    config_utils.parse_arg("smok", **DEFAULTS)
  with pytest.raises(ValueError, match="unknown config argument"):  # UserError is a ValueError
    config_utils.parse_arg("x=1")


def test_load_config_by_name_or_path_with_an_argument():
  smoke = config_utils.load_config("demo", "smoke")
  assert smoke.data.config == "tiny" and smoke.train.num_steps == 4
  path = os.path.join(REPO, "experiments", "configs", "demo.py")
  for spec in ("demo:smoke", f"{path}:smoke", f"{os.path.relpath(path)}:smoke"):
    assert config_utils.load_config(spec).to_dict() == smoke.to_dict(), spec
  assert config_utils.load_config("demo").train.num_steps == 5000
  with pytest.raises(UserError, match="ture"):
    config_utils.load_config("demo:smoke=ture")
  with pytest.raises(UserError, match="twice"):
    config_utils.load_config("demo:smoke", "retrain")
  with pytest.raises(UserError, match="not found"):
    config_utils.load_config("no_such_config")


def test_configs_are_modules():
  from experiments.configs import demo, llava7b_pod
  assert llava7b_pod.demo is demo  # the pod config builds on the demo module, not a copy of it
  assert demo.get_config("smoke").to_dict() == config_utils.load_config("demo:smoke").to_dict()


def test_a_loose_config_file_loads_from_its_path(tmp_path):
  (tmp_path / "mine.py").write_text("from sab_jax import config_utils\n\n"
                                    "def get_config(arg=None):\n  return config_utils.parse_arg(arg, n=1)\n")
  assert config_utils.load_config(f"{tmp_path / 'mine.py'}:n=3").n == 3


def test_pod_config_runlocal_is_small():
  pod, local = config_utils.load_config("llava7b_pod"), config_utils.load_config("llava7b_pod", "runlocal")
  assert pod.mesh.to_dict() == {"data": -1, "fsdp": 8, "model": 1}
  assert local.mesh.to_dict() == {"data": 1, "fsdp": -1, "model": 1}  # FSDP over the local devices
  assert (local.data.max_prompt_len, local.data.max_answer_len) == (48, 4)
  assert local.eval.batch_size == 8 and local.eval.max_examples == 32
  assert (local.quant.calib_samples, local.quant.calib_batch_size) == (16, 8)
  assert local.distill.train.batch_size == 8 and local.distill.train.num_steps == 4
  assert local.train.num_steps == 4
  # Only sizes change: the same data, teacher, stages, methods and exports as the pod run.
  for key in ("stages", "data.name", "data.config", "teacher.format", "teacher.param_dtype", "quant.methods",
              "export.int8_params", "eval.split", "eval.metric"):
    a, b = pod, local
    for k in key.split("."):
      a, b = a[k], b[k]
    assert a == b, key
  assert local.teacher.init is None  # still given on the command line
  assert config_utils.load_config("llava7b_pod:runlocal=false").to_dict() == pod.to_dict()
  with pytest.raises(UserError, match="unknown config argument 'smoke'"):
    config_utils.load_config("llava7b_pod:smoke")
