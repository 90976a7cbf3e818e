"""checkpointing.save refuses parameters that are not finite, and writes nothing for them;
small replicated arrays are written whole, large ones spread over their replicas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jax_events

from sab_jax.train import checkpointing


class _Two(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(4, 2, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_save_refuses_non_finite_parameters(tmp_path, bad):
  model = _Two()
  if bad is not None:  # one entry of the second layer's bias
    model.b.bias[...] = model.b.bias[...].at[1].set(bad)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  mngr = checkpointing.manager(str(tmp_path / "ckpt"), save_every=1, keep=2)
  if bad is None:
    assert checkpointing.save(mngr, 1, model, optimizer, None)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
  else:
    with pytest.raises(FloatingPointError, match="step 1"):
      checkpointing.save(mngr, 1, model, optimizer, None)
    assert mngr.all_steps() == []
  assert bool(checkpointing._all_finite(nnx.state(model, nnx.Param))) == (bad is None)
  assert bool(checkpointing._all_finite({}))


class _Replicated(nnx.Module):
  """A small parameter (8 x `cols`) and, with `large`, one above the slice floor, replicated over 8 devices."""

  def __init__(self, mesh, cols, large=True):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    self.small = nnx.Param(put(jnp.arange(8 * cols, dtype=jnp.float32).reshape(8, cols)))
    if large:
      rows = 8 * (checkpointing.MIN_REPLICA_SLICE_BYTES // (4 * 1031) + 1)  # each replica's 1/8 above the floor
      self.large = nnx.Param(put(jnp.ones((rows, 1031), jnp.float32)))


def _save(directory, model):
  """The functions traced while `checkpointing.save` writes `model`."""
  mngr = checkpointing.manager(str(directory), save_every=1, keep=1)
  with jax_events.recorded(jax_events.TRACED) as traced:
    assert checkpointing.save(mngr, 1, model, None, None)
    mngr.wait_until_finished()
  return mngr, traced


def test_small_replicated_arrays_are_written_whole_and_large_ones_by_replica(tmp_path):
  """Orbax cuts each replica's share out on device (a slicing program per shape); below
  MIN_REPLICA_SLICE_BYTES that is only n copies instead of one. Both restore exactly."""
  mesh = jax.make_mesh((8,), ("data",))
  # Shapes no other test uses: a slicing program traced for them is this save's.
  _, traced = _save(tmp_path / "small", _Replicated(mesh, 137, large=False))
  assert not [n for n in traced if "slice" in n], traced
  model = _Replicated(mesh, 131)
  mngr, traced = _save(tmp_path / "both", model)
  assert [n for n in traced if "slice" in n], traced  # the large parameter: each replica wrote its rows
  fresh = _Replicated(mesh, 131)
  fresh.small[...] = jnp.zeros_like(fresh.small[...])
  fresh.large[...] = jnp.zeros_like(fresh.large[...])
  assert checkpointing.restore_latest(mngr, fresh, None)[0] == 1
  np.testing.assert_array_equal(fresh.small[...], model.small[...])
  np.testing.assert_array_equal(fresh.large[...], model.large[...])
