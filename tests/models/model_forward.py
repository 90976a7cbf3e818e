"""A model's logits as one compiled program, for the model tests (both families).

Called op by op, every op compiles a program of its own for each shape and sharding it
meets; one jitted forward took a third to a quarter of the time in these tests.
"""

import functools

import numpy as np
from flax import nnx


@functools.partial(nnx.jit, static_argnames="image_grid_thw")
def _logits(model, ids, pixels, mask, image_grid_thw):
  return model(ids, pixels, mask, **({} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}))


def logits(model, ids, pixels=None, mask=None, image_grid_thw=None):
  """`model(ids, pixels, mask, image_grid_thw=...)`, jitted (a Qwen2.5-VL grid made static)."""
  grid = None if image_grid_thw is None else tuple(tuple(int(v) for v in g) for g in np.asarray(image_grid_thw))
  return _logits(model, ids, pixels, mask, image_grid_thw=grid)
