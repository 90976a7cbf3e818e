"""The XLA flags of the suite's processes, the pipelines and jax processes its tests start included.

On 2 cores most of the suite's time is XLA compiling hundreds of small programs once each,
and LLVM's optimisation of the CPU code is most of that; it pays back only on programs
that run long. At -O0 the fast tier takes 3:01 instead of 3:59 (5.4 vs 7.3 min of CPU),
the Qwen pod test's pipeline compiles in 50 s instead of 74; the one test that mostly
executes (greedy answers to the whole 2000-question split, twice) takes 66 s instead of
31. Only code generation changes: the HLO and what it computes are the same programs, and
every test compares runs made under the same flags.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process with `devices` simulated CPU devices (None: the one real device)."""
  simulated = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  return " ".join([*simulated, FAST_COMPILE])


def environ(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child with `devices` simulated CPU devices, plus `extra`."""
  return dict(os.environ, XLA_FLAGS=flags(devices), **extra)
