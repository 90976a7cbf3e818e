"""checkpointing.save refuses parameters that are not finite, and writes nothing for them."""

import optax
import pytest
from flax import nnx

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
