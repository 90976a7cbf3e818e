"""Test-wide setup: 8 simulated CPU devices for the multi-device tests and XLA's CPU backend at
-O0 (`xla_env.py`: the suite mostly compiles; must precede importing jax, and runs again in
every pytest-xdist worker), one JAX compilation cache for the session, the
synthetic VQA dataset built once per session, and the `serial` marker: such a test runs while
no other xdist worker runs one.

The compilation cache (`JAX_COMPILATION_CACHE_DIR`, a fresh temporary directory per run unless
it is set already, removed at the end) is shared by the xdist workers and by the pipelines
the CLI tests start as subprocesses, which compile the same programs again and again: XLA
compiles each once per run instead (on 2 cores most of the end-to-end tests' time was
compilation). Every executable is cached, not only those that took JAX's default of a second
to compile: a warm smoke pipeline then takes 69 s instead of 98 s. What runs is unchanged: a
cached executable is the one XLA would compile.

Parallel runs: setup.cfg's `addopts` give `--numprocesses=auto --maxprocesses=4 --dist=loadgroup`; `-n 0`
runs everything in this process, and so does `-p no:xdist` (setup.cfg's xdist options are
then accepted and ignored, see `pytest_addoption`).
"""

import contextlib
import fcntl
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import experiments...`
import xla_env  # noqa: E402  (tests/, just put on the path)

os.environ.setdefault("XLA_FLAGS", xla_env.flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set before jax is imported, here and (inherited) in every worker and subprocess.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sab_jax_tests_xla_cache_")
  # Every executable, not only those that took over a second to compile (JAX's default): the
  # pipelines compile hundreds of small programs per method, and the next run reads them back.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_addoption(parser, pluginmanager):
  if not pluginmanager.has_plugin("xdist"):  # `-p no:xdist` (or no xdist installed): one process
    group = parser.getgroup("xdist options of setup.cfg, ignored without xdist")
    group.addoption("--numprocesses", dest="numprocesses", default=None)
    group.addoption("--maxprocesses", dest="maxprocesses", default=None)
    group.addoption("--dist", dest="dist", default="no")
    group.addoption("--no-loadscope-reorder", dest="loadscopereorder", action="store_false")


def pytest_configure(config):
  if not config.pluginmanager.has_plugin("xdist"):
    config.addinivalue_line("markers", "xdist_group(name): tests that share one xdist worker (no-op here)")
  if "jax" in sys.modules:  # imported before this file set the variable (e.g. by a plugin)
    jax_config = sys.modules["jax"].config
    jax_config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    if _OWN_CACHE:
      jax_config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax_config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it, after the workers
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest tests start first (in this order), so that no xdist worker is left running one
# of them while the others are idle at the end, and `serial` tests come last, where they wait
# for no long test of another worker. Only the order changes; a prefix that matches nothing
# does no harm.
LONG_FIRST = (
    "integration/test_main.py::test_smoke_retrain_writes_results_and_resumes",
    "integration/test_qwen_pod_config.py::test_qwen_pod_config_runs_end_to_end",
    # after the smoke run: both binarize the demo's layers with the same one-device programs (shared cache)
    "integration/test_distill_resume.py::",
    "serve/test_packed.py::test_export_predictions_equal_in_memory",  # both share one fixture
    "integration/test_pod_config.py::test_pod_config_runs_end_to_end",
    "train/test_distill.py::test_distillation_on_8_devices",
    "integration/test_distill_speed.py::test_runs",
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    if item.get_closest_marker("serial"):
      return len(LONG_FIRST) + 1
    nodeid = item.nodeid.removeprefix("tests/")
    return next((i for i, prefix in enumerate(LONG_FIRST) if nodeid.startswith(prefix)), len(LONG_FIRST))

  items.sort(key=rank)


# --- `serial` tests: alone on the machine ---------------------------------------------------
# Every test of an xdist worker holds a shared lock on a file in the run's base temp
# directory, a `serial` test an exclusive one (setup, call and teardown, module fixtures
# included). A second file is the turnstile: a `serial` test waiting for the exclusive lock
# holds it, so the other workers start no new test meanwhile (no starvation).
_locks = None


def _lock_files(config):
  global _locks
  if _locks is None:
    root = pathlib.Path(config.option.basetemp).parent  # xdist gives worker gwN basetemp BASE/gwN
    _locks = tuple(open(root / name, "a+") for name in ("serial.turnstile", "serial.lock"))
  return _locks


@contextlib.contextmanager
def _machine_lock(item):
  if not hasattr(item.config, "workerinput"):  # not an xdist worker: nothing else runs
    yield
    return
  turnstile, lock = _lock_files(item.config)
  fcntl.flock(turnstile, fcntl.LOCK_EX)
  fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("serial") else fcntl.LOCK_SH)
  fcntl.flock(turnstile, fcntl.LOCK_UN)
  try:
    yield
  finally:
    fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  with _machine_lock(item):
    return (yield)


# --- the synthetic VQA dataset, built once per session (per xdist worker) --------------------
@pytest.fixture(scope="session")
def vqa_data_dir(tmp_path_factory):
  """A TFDS data_dir holding synthetic_vqa/tiny. Tests may build other configs into it
  (synthetic_vqa builds are deterministic); tests of the build itself use their own."""
  from sab_jax.data import synthetic_vqa
  d = tmp_path_factory.mktemp("synthetic_vqa")
  synthetic_vqa.build("tiny", d)
  return d


@pytest.fixture(scope="session")
def tiny_vqa(vqa_data_dir):
  """{split: data source} of synthetic_vqa/tiny (train 64, validation 32, test 32 records)."""
  from sab_jax.data import synthetic_vqa
  return synthetic_vqa.build("tiny", vqa_data_dir).as_data_source()
