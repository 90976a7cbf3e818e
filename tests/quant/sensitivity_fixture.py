"""A layer's `OutputSensitivity` for tests that call a provider on hand-made statistics.

SAB's default ("fisher") significance needs the loss sensitivity the calibration pass
measures; here the outputs' gradients are drawn lognormal (spread over a decade, text and image
unlike), so Λ varies within rows as it does on a real model.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from sab_jax.quant.providers.base import LayerStats, OutputSensitivity


def with_sensitivity(stats: LayerStats, n_out: int, seed: int = 0) -> LayerStats:
  r = np.random.default_rng(seed)
  g_t = r.lognormal(0, 1, n_out).astype(np.float32)
  g_v = (0.3 * r.lognormal(0, 1, n_out)).astype(np.float32)
  sens = OutputSensitivity(jnp.asarray(g_t), jnp.asarray(g_v), jnp.diag(stats.h_text), jnp.diag(stats.h_vis))
  return dataclasses.replace(stats, sensitivity=sens)
