"""The XLA flags of the suite's processes, the pipelines and jax processes its tests start included.

On 2 cores most of an end-to-end test's time is XLA compiling hundreds of small programs
once each; LLVM's optimisation of the CPU code is most of that and pays back only on
programs that run long. At `-O0` the pipelines compile about a third faster (the Qwen pod
test's pipeline: 74 -> 50 s of compilation, 101 -> 76 s in all) and run no slower at the
suite's sizes. Only code generation changes: the HLO and what it computes are the same
programs, and every test compares runs made under the same flags.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process with `devices` simulated CPU devices (None: the one real device)."""
  simulated = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  return " ".join([*simulated, FAST_COMPILE])
