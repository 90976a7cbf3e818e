"""Greedy generation with a key/value cache.

Short VQA answers from a 7B model must not recompute the ~600-token image+question
prefix at every step: the prompt is run once (prefill) into a cache of length
`prompt_len + max_new_tokens`, then one token per step inside a `lax.while_loop`.
Prompts are left-padded; positions come from the model (`model.positions`: the attention
mask's running count for LLaVA, transformers' 3D mrope positions for Qwen2.5-VL), so padding
never shifts the rotary phase of real tokens. Every new token is text: it sits one position
after the largest position of its row so far.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sab_jax.models import llama


# graph_updates=False: the model is only read, and nnx.jit would otherwise write its whole state back
# from the program's outputs, committed to the devices of any committed input (a teacher, a
# sharded batch); a model loaded from host arrays then reached its next call with other input
# shardings and compiled the same program again.
@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "image_grid_thw"), graph_updates=False)
def greedy_generate(model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array, pixel_values: jax.Array | None,
                    *, max_new_tokens: int, eos_id: int, pad_id: int = 0,
                    image_grid_thw: tuple[tuple[int, int, int], ...] | None = None) -> jax.Array:
  """Greedy continuation of left-padded prompts.

  Args:
    model: an LVLM (`models.families`).
    prompt_ids: `[B, P]` left-padded prompt tokens (image placeholders included).
    prompt_mask: `[B, P]` 1 on real tokens.
    pixel_values: `[B, H, W, 3]`, a Qwen2.5-VL's `[num_patches, C*T*P*P]` with
      `image_grid_thw`, or None.
    max_new_tokens: tokens to generate at most.
    eos_id: generation of a row stops after it emits this token.
    pad_id: written after a row has stopped.
    image_grid_thw: `((t, h, w), ...)` per image, with transformers' patch layout (static).
  Returns:
    `[B, max_new_tokens]` generated tokens (eos included, `pad_id` after it).
  """
  b, p = prompt_ids.shape
  cfg = model.cfg.text
  cache = llama.init_cache(cfg, b, p + max_new_tokens, model.dtype)
  cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), prompt_mask.dtype)], axis=1)
  grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
  positions = model.positions(prompt_ids, prompt_mask, pixel_values, **grid)
  x = model.embed(prompt_ids, pixel_values, **grid)
  logits, cache = model.decode_step(x, positions, cache, jnp.int32(0), cache_mask)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  real = prompt_mask.astype(bool)
  if positions.ndim == 3:  # [3, B, P] mrope components
    real = jnp.broadcast_to(real, positions.shape)
    next_pos = jnp.max(jnp.where(real, positions, -1), axis=(0, 2)) + 1
  else:
    next_pos = jnp.max(jnp.where(real, positions, -1), axis=-1) + 1
  next_pos = next_pos.astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, token, cache, cache_mask, done, out = state
    col = p + i - 1                                        # cache column of `token`
    cache_mask = cache_mask.at[:, col].set(1)
    x = model.language_model.embed_tokens(token[:, None])
    logits, cache = model.decode_step(x, (next_pos + i - 1)[:, None], cache, col, cache_mask)
    new = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    new = jnp.where(done, pad_id, new)
    out = out.at[:, i].set(new)
    return i + 1, new, cache, cache_mask, done | (new == eos_id), out

  state = (jnp.int32(1), first, cache, cache_mask, first == eos_id, out)
  return jax.lax.while_loop(cond, body, state)[-1]
