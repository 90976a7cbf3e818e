"""Multi-process JAX start-up: one call, before any other JAX call, on every process.

Our launchers (`launch/local.sh`, `launch/tpu_pod.sh`, `launch/slurm.sbatch`) describe
the job through the environment, so the entry point needs no extra flags:

  SAB_COORDINATOR=host:port, SAB_NUM_PROCESSES, SAB_PROCESS_ID  explicit (local.sh)
  SAB_DISTRIBUTED=auto                    let JAX detect the cluster (tpu_pod.sh, slurm.sbatch)
  SAB_DISTRIBUTED=off                     never (e.g. a single-task run inside an allocation)
  SAB_LOCAL_DEVICE_IDS=0,1,...            with any of the above: this process's devices
  SLURM_NTASKS > 1 inside an srun step    detected by JAX (Slurm)
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES naming several hosts, or MEGASCALE_*
                                          detected by JAX (TPU pods and multislice)

Anything else is a single process and initializes nothing. On GCE TPU VMs the worker
list lives in the metadata server, not the environment, hence SAB_DISTRIBUTED=auto.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator, Mapping

_EXPLICIT = ("SAB_COORDINATOR", "SAB_NUM_PROCESSES", "SAB_PROCESS_ID")


def detect(env: Mapping[str, str] | None = None) -> dict | None:
  """The `jax.distributed.initialize` kwargs this environment asks for; None: single process.

  Pure (reads only `env`), so the rules are testable without starting anything.
  """
  env = os.environ if env is None else env
  kwargs = _cluster_kwargs(env)
  if kwargs is not None and env.get("SAB_LOCAL_DEVICE_IDS"):
    # The accelerators this process drives. Needed under Slurm with one process per
    # node: JAX would otherwise give each process only the GPU numbered SLURM_LOCALID.
    kwargs["local_device_ids"] = [int(i) for i in env["SAB_LOCAL_DEVICE_IDS"].split(",")]
  return kwargs


def _cluster_kwargs(env: Mapping[str, str]) -> dict | None:
  given = [k for k in _EXPLICIT if env.get(k)]
  if given:
    if len(given) != len(_EXPLICIT):
      missing = [k for k in _EXPLICIT if k not in given]
      raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing: a multi-process "
                       f"launch sets all of {', '.join(_EXPLICIT)} (see launch/local.sh)")
    num, pid = int(env["SAB_NUM_PROCESSES"]), int(env["SAB_PROCESS_ID"])
    if not 0 <= pid < num:
      raise ValueError(f"SAB_PROCESS_ID={pid} not in [0, SAB_NUM_PROCESSES={num})")
    if num == 1:
      return None
    return dict(coordinator_address=env["SAB_COORDINATOR"], num_processes=num, process_id=pid)
  mode = env.get("SAB_DISTRIBUTED", "").lower()
  if mode in ("0", "off", "none"):
    return None
  if mode == "auto":
    return {}
  if mode:
    raise ValueError(f"SAB_DISTRIBUTED={env['SAB_DISTRIBUTED']!r}: expected 'auto' or 'off'")
  # SLURM_STEP_NODELIST: inside an srun step (an sbatch script's own shell has no step).
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
    return {}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` when launched across processes; returns whether it did.

  Must run before anything touches a JAX backend (device lists, arrays, jit).
  """
  kwargs = detect(env)
  if kwargs is None:
    return False
  import jax
  # Cross-process collectives on CPU (tests, local.sh on a laptop); the CPU backend
  # otherwise refuses computations spanning processes. No effect on GPU / TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


@contextlib.contextmanager
def fail_fast(active: bool = True) -> Iterator[None]:
  """Ends this process at once on an error instead of raising.

  After `jax.distributed.initialize`, a raising process runs JAX's atexit shutdown, a
  barrier that waits for every other process: one that failed early (say, on a missing
  file) would hang until the others time out minutes later, and a launcher could not
  tell. `os._exit` skips the barrier; the launcher then stops the rest.
  """
  try:
    yield
  except BaseException as e:  # noqa: BLE001 - re-raised when inactive, reported otherwise
    if not active or (isinstance(e, SystemExit) and not e.code):
      raise
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


# --- within a multi-process run ------------------------------------------------------------
def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op with one process): files one process
  writes are complete before the others read them."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def spanning_leaf(tree):
  """A jax.Array leaf of `tree` with shards on other processes (FSDP over hosts), or None."""
  import jax
  return next((x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_fully_addressable), None)


def host_value(x):
  """`x` as a numpy array on every process, also when its shards live on other hosts
  (FSDP over hosts); the gather is collective, so every process must call it."""
  import jax
  import numpy as np
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
