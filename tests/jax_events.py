"""Which functions JAX traced, lowered or compiled while a block ran (jax.monitoring events)."""

import contextlib

import jax

TRACED = "/jax/core/compile/jaxpr_trace_duration"
LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # also when the persistent cache then hits


@contextlib.contextmanager
def recorded(event: str):
  """Yields the list of `fun_name`s of `event` recorded inside the block."""
  names = []

  def listener(name, _duration, fun_name=None, **_):
    if name == event:
      names.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
