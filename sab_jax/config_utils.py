"""Configs in the big_vision style: `demo.py:smoke,retrain=True` and the loader the tests use.

`python -m sab_jax.main --config=PATH[:ARG]` loads a config through ml_collections;
`load_config` gives code the same `get_config(ARG)` without the flag machinery, importing a
config under experiments/configs as the module `experiments.configs.NAME` (so a config can
import another, as llava7b_pod.py imports demo.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from typing import Any

import ml_collections

from sab_jax.errors import UserError

# The checkout this package lives in (experiments/ is a sibling of sab_jax/, never installed).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _bad(key: str, value: str, accepted: str) -> UserError:
  return UserError(f"config argument {key}={value!r}: expected {accepted}")


def _parse_value(key: str, value: str, default: Any) -> Any:
  """`value` read as the type of `default`; anything else names the key and what is accepted."""
  if isinstance(default, bool):  # before int: bool is an int subclass
    if value.lower() in _TRUE or value.lower() in _FALSE:
      return value.lower() in _TRUE
    raise _bad(key, value, f"a boolean: true/false, 1/0, yes/no (any case) or the bare flag `{key}`")
  if isinstance(default, str):
    return value
  if isinstance(default, float):
    try:  # float() also reads inf and nan; "True" is not a number
      return float(value)
    except ValueError:
      raise _bad(key, value, "a number (e.g. 0.5, 1e-3, 2)") from None
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value  # not a literal: rejected below unless the default is None
  if isinstance(default, int):
    if type(parsed) is not int:  # no 1.5 -> 1 truncation, no True -> 1
      raise _bad(key, value, "an integer literal (e.g. 8, -1, 1_000)")
    return parsed
  if default is not None and not isinstance(parsed, type(default)):
    raise _bad(key, value, f"a Python literal of type {type(default).__name__}")
  return parsed


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `key=value,flag` into fields typed as their defaults; anything else is a UserError.

  A bare `flag` sets a boolean to True; booleans read only true/false, 1/0, yes/no; integers
  only integer literals; floats numbers; strings take the value as written. Strict, so that
  a typo (`smoke=ture`) stops the run instead of silently selecting another variant.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults) or 'none'}")
    default = defaults[key]
    if has_value:
      out[key] = _parse_value(key, value, default)
    elif isinstance(default, bool):
      out[key] = True
    else:
      raise UserError(f"config argument {key!r} needs a value ({key}=...)")
  return out


def _config_path(name: str) -> str:
  """A config file path: `demo` is experiments/configs/demo.py of this checkout; paths stay."""
  if os.sep in name or "/" in name or name.endswith(".py"):
    return os.path.abspath(name)
  return os.path.join(_REPO, "experiments", "configs", name + ".py")


def _import_file(path: str):
  """The module of a .py file, imported under its package's dotted name when it has one.

  A file in a package (`experiments/configs/demo.py`, with __init__.py up to `experiments`)
  is imported as `experiments.configs.demo`, the package's root appended to sys.path if it is
  not there; a loose file is executed from its path as a module of its own.
  """
  if not os.path.isfile(path):
    raise UserError(f"config file {path} not found")
  parts, root = [os.path.splitext(os.path.basename(path))[0]], os.path.dirname(path)
  while os.path.isfile(os.path.join(root, "__init__.py")):
    parts.insert(0, os.path.basename(root))
    root = os.path.dirname(root)
  if len(parts) == 1:
    spec = importlib.util.spec_from_file_location(parts[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  if not any(os.path.realpath(p or os.curdir) == os.path.realpath(root) for p in sys.path):
    sys.path.append(root)
  module = importlib.import_module(".".join(parts))
  if os.path.realpath(module.__file__) != os.path.realpath(path):
    raise UserError(f"config {path} is shadowed by {module.__file__} (another checkout on sys.path)")
  return module


def load_config(config: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config, as `--config=` would load it.

  `config`: `NAME[:ARG]` (experiments/configs/NAME.py of this checkout) or `PATH[:ARG]`;
  `load_config("demo", "smoke")`, `load_config("demo:smoke")` and
  `load_config("experiments/configs/demo.py:smoke")` are the same config.
  """
  name, has_arg, inline = config.partition(":")
  if has_arg and arg is not None:
    raise UserError(f"config {config!r} given an argument twice (also arg={arg!r})")
  return _import_file(_config_path(name)).get_config(inline if has_arg else arg)
