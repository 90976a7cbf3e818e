"""Model behaviour beyond import parity: KV-cache decoding, padding, dtypes, sharding, the Dense seam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.model_forward import logits
from sab_jax import sharding
from sab_jax.models import decoding, families, layers, llava

IMG = 3  # image token id of the 'test' variant


def _prompt(model, batch, text_len, seed):
  rng = np.random.default_rng(seed)
  n = model.cfg.num_image_tokens
  text = rng.integers(5, model.cfg.text.vocab_size, size=(batch, text_len))
  ids = np.concatenate([np.ones((batch, 1), np.int32), np.full((batch, n), IMG), text], axis=1).astype(np.int32)
  pixels = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  return ids, pixels


@nnx.jit  # one program per length (op by op, every op compiled once per length: ~4x the time)
def _next_token(model, x):
  """The greedy next token after embeddings `x [1, T, D]`, recomputing the whole sequence."""
  hidden, _, _ = model.language_model(x, jnp.ones(x.shape[:2], jnp.int32), jnp.arange(x.shape[1])[None])
  return jnp.argmax(model.logits(hidden)[0, -1])


def _naive_greedy(model, ids, pixels, steps):
  """Recomputes the whole sequence at every step, feeding generated tokens as plain embeddings."""
  x = model.embed(jnp.asarray(ids[None]), jnp.asarray(pixels[None]))
  out = []
  for _ in range(steps):
    tok = int(_next_token(model, x))
    out.append(tok)
    x = jnp.concatenate([x, model.language_model.embed_tokens(jnp.array([[tok]]))], axis=1)
  return out


@pytest.mark.slow
def test_cached_generation_equals_recomputation_with_left_padding():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  ids, pixels = _prompt(model, 3, 6, seed=1)
  pads = [0, 2, 5]
  width = ids.shape[1] + max(pads)
  prompt = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), np.int32)
  for b, p in enumerate(pads):  # left-pad each row by a different amount
    prompt[b, width - ids.shape[1]:] = ids[b]
    mask[b, width - ids.shape[1]:] = 1
  out = decoding.greedy_generate(model, jnp.asarray(prompt), jnp.asarray(mask), jnp.asarray(pixels),
                                 max_new_tokens=7, eos_id=10_000)
  for b in range(3):
    assert list(np.asarray(out[b])) == _naive_greedy(model, ids[b], pixels[b], 7)


def test_generation_stops_at_eos_and_pads():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  ids, pixels = _prompt(model, 2, 4, seed=2)
  first = decoding.greedy_generate(model, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(pixels),
                                   max_new_tokens=5, eos_id=10_000)
  eos = int(first[0, 1])  # declare row 0's second token the eos
  out = np.asarray(decoding.greedy_generate(model, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
                                            jnp.asarray(pixels), max_new_tokens=5, eos_id=eos, pad_id=0))
  assert out[0, 1] == eos and np.all(out[0, 2:] == 0)
  np.testing.assert_array_equal(out[0, :2], np.asarray(first[0, :2]))


@pytest.mark.slow
def test_padding_does_not_change_logits_of_real_tokens():
  model = llava.Model("test", rngs=nnx.Rngs(1))
  ids, pixels = _prompt(model, 1, 5, seed=3)
  ref = logits(model, jnp.asarray(ids), jnp.asarray(pixels))
  padded = np.concatenate([np.zeros((1, 4), np.int32), ids], axis=1)
  mask = np.concatenate([np.zeros((1, 4), np.int32), np.ones_like(ids)], axis=1)
  out = logits(model, jnp.asarray(padded), jnp.asarray(pixels), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out[:, 4:]), np.asarray(ref), atol=1e-5)


def test_wrong_number_of_image_tokens_is_an_error():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  ids, pixels = _prompt(model, 1, 3, seed=0)
  with pytest.raises(ValueError, match="placeholders per image"):
    model(jnp.asarray(ids[:, 1:]), jnp.asarray(pixels))  # drops the BOS: fine
    model(jnp.asarray(np.delete(ids, 2, axis=1)), jnp.asarray(pixels))


@pytest.mark.slow
def test_bf16_compute_and_params_track_fp32():
  f32 = llava.Model("test", rngs=nnx.Rngs(0))
  bf16 = llava.Model("test", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  nnx.update(bf16, jax.tree.map(lambda v: v.astype(jnp.bfloat16), nnx.state(f32, nnx.Param)))
  assert bf16.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  ids, pixels = _prompt(f32, 2, 5, seed=4)
  a = logits(f32, jnp.asarray(ids), jnp.asarray(pixels))
  b = logits(bf16, jnp.asarray(ids), jnp.asarray(pixels))
  assert b.dtype == jnp.bfloat16
  assert np.abs(np.asarray(b, np.float32) - np.asarray(a)).max() < 0.05 * np.abs(np.asarray(a)).max()


def test_every_linear_goes_through_the_dense_factory():
  built = []

  def counting_dense(*args, **kw):
    d = layers.Dense(*args, **kw)
    built.append(d)
    return d

  model = llava.Model("test", rngs=nnx.Rngs(0), dense=counting_dense)
  cfg = model.cfg
  expected = 1 + cfg.vision.num_hidden_layers * 6 + 2 + cfg.text.num_hidden_layers * 7 + 1
  dense_modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Dense)]
  assert len(built) == expected == len(dense_modules)


@pytest.mark.slow
def test_every_parameter_has_logical_axes_and_shards_on_8_devices():
  model = llava.Model("test", rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.shape.__len__(), path
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  sharded = sharding.create_sharded(lambda: llava.Model("test", rngs=nnx.Rngs(0)), mesh)
  k = sharded.language_model.layers[0].mlp.gate_proj.kernel[...]
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  ids, pixels = _prompt(model, 4, 3, seed=5)
  ref = model(jnp.asarray(ids), jnp.asarray(pixels))
  x = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh, 2))
  out = nnx.jit(lambda m, i, p: m(i, p))(sharded, x, jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.slow
def test_variants_build_abstractly_at_7b_scale():
  model = families.abstract(llava.VARIANTS["llava-1.5-7b"])
  n = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 7.0e9 < n < 7.2e9  # LLaVA-1.5-7B: 6.74B Vicuna + 0.30B CLIP-L/14 + 21M projector
  assert model.cfg.num_image_tokens == 576


def test_image_coordinates_follow_the_patches_they_are_added_to():
  """With the projector zeroed, image feature k is row_k * e_r + col_k * e_c for the patch
  patchify puts at k: a test image whose patch (r, c) holds the value 10r + c tells."""
  cfg = llava.config_from_dict({"variant": "demo"})
  assert cfg.image_coordinates and not llava.VARIANTS["llava-1.5-7b"].image_coordinates
  model = llava.Llava(cfg, rngs=nnx.Rngs(0))
  for lin in (model.multi_modal_projector.linear_1, model.multi_modal_projector.linear_2):
    lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
    lin.bias[...] = jnp.zeros_like(lin.bias[...])
  e = np.zeros((2, cfg.text.hidden_size), np.float32)
  e[0, 0] = e[1, 1] = 1.0
  model.image_coordinate_embedding[...] = jnp.asarray(e)
  g, p = cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.patch_size
  img = np.kron(10 * np.arange(g)[:, None] + np.arange(g)[None], np.ones((p, p)))[None, ..., None].repeat(3, -1)
  patch_value = np.asarray(model.vision_tower.patchify(jnp.asarray(img, jnp.float32)))[0, :, 0]
  feats = np.asarray(model.image_features(jnp.asarray(img, jnp.float32)))[0]
  ramp = np.linspace(-1, 1, g)
  np.testing.assert_allclose(feats[:, 0], ramp[(patch_value // 10).astype(int)], atol=1e-6)
  np.testing.assert_allclose(feats[:, 1], ramp[(patch_value % 10).astype(int)], atol=1e-6)
  assert np.abs(feats[:, 2:]).max() == 0
