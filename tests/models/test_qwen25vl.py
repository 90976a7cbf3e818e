"""Qwen2.5-VL parity: our Flax model loaded from a transformers checkpoint gives transformers' logits,
mrope positions and greedy tokens; both key layouts load; keys and config.json round-trip."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf_fixture as F
from models.model_forward import logits
from models.test_hf import _rewrite_keys
from sab_jax import sharding
from sab_jax.models import decoding, families, hf, layers, llava, paths, qwen25vl

# Window sizes in pixels with patch 4, merge 2: 8 -> 1x1 merged tokens per window, 16 -> 2x2, 24 -> 3x3
# (partial windows on every image below), 64 -> 8x8 (one window per image: window attention = full).
CASES = {
    "gqa_untied_w16": dict(window_size=16, fullatt_block_indexes=(1,), tie=False, mrope_section=(2, 3, 3)),
    "mha_tied_w24": dict(window_size=24, fullatt_block_indexes=(0, 2), tie=True, mrope_section=(4, 2, 2),
                         num_kv_heads=4),
    "mqa_untied_w8_nofull": dict(window_size=8, fullatt_block_indexes=(), tie=False, mrope_section=(1, 3, 4),
                                 num_kv_heads=1),
    "gqa_tied_w64": dict(window_size=64, fullatt_block_indexes=(2,), tie=True, mrope_section=(2, 2, 4), seed=3),
}
# (H, W) in pixels: merged grids 3x2, 2x5, 5x3; image 1 and 2 share row 1 of the prompts.
SIZES = [(24, 16), (16, 40), (40, 24)]
ROWS = [[3, "image", 4], [2, "image", 1, "image", 5], [6]]


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s + (3,)).astype(np.float32) for s in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The fast case's checkpoint, shared by the tests that only read it."""
  path = str(tmp_path_factory.mktemp("qwen"))
  info = F.save_tiny_qwen25vl(path, **CASES["gqa_untied_w16"])
  return path, info, hf.from_pretrained(path)


@pytest.mark.parametrize("name", [n if n == "gqa_untied_w16" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CASES)])
def test_logits_match_transformers_mixed_sizes(tmp_path, tiny, name):
  if name == "gqa_untied_w16":
    _, info, model = tiny
  else:
    info = F.save_tiny_qwen25vl(str(tmp_path), **CASES[name])
    model = hf.from_pretrained(str(tmp_path))
  assert isinstance(model, qwen25vl.Qwen25VL)
  pv, grid = F.qwen_pixel_values(info, _images(SIZES))
  ids, mask = F.qwen_prompts(info, ROWS, grid)
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  out = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(mask), image_grid_thw=grid))
  assert out.shape == ref.shape
  real = mask.astype(bool)  # padding rows attend to nothing: their logits are nobody's
  assert np.abs(out - ref)[real].max() < 1e-4


@pytest.mark.slow  # the fast tier keeps one mixed-size parity case, positions and decoding
def test_multi_frame_grid_matches_transformers(tiny):
  """A grid with t = 2 (two frames of one image entry): windows and full attention per frame, the
  temporal mrope component, next to a one-frame image of another size."""
  _, info, model = tiny
  grid = np.array([[2, 4, 6], [1, 6, 4]])
  pv = np.random.default_rng(7).normal(size=(int(np.prod(grid, axis=1).sum()), 96)).astype(np.float32)
  ids, mask = F.qwen_prompts(info, [[2, "image", 3], [1, "image", 1]], grid, seed=7)
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  out = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(mask), image_grid_thw=grid))
  real = mask.astype(bool)
  assert np.abs(out - ref)[real].max() < 1e-4
  pos, _ = F.qwen_rope_index(info, ids, mask, grid)
  ours = np.asarray(model.positions(jnp.asarray(ids), jnp.asarray(mask), None, grid))
  np.testing.assert_array_equal(ours[:, real], pos[:, real])


@pytest.mark.slow  # the fast tier keeps one mixed-size parity case, positions and decoding
def test_nhwc_equals_processor_layout(tiny):
  """Same-size images: NHWC pixels (patchified in-model) == transformers' patches == transformers' logits."""
  _, info, model = tiny
  images = np.stack(_images([(16, 24)] * 3, seed=1))
  pv, grid = F.qwen_pixel_values(info, list(images))
  ids, mask = F.qwen_prompts(info, [[2, "image", 3], [5, "image"], ["image", 1]], grid, seed=1)
  feats = model.image_features(jnp.asarray(images))
  flat = model.image_features(jnp.asarray(pv), grid)
  assert feats.shape == (3, 6, 64) and flat.shape == (18, 64)
  np.testing.assert_array_equal(np.asarray(feats).reshape(18, 64), np.asarray(flat))
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  out = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.abs(out - ref)[real].max() < 1e-4
  assert model.cfg.num_image_tokens == (model.cfg.vision.image_size // 8) ** 2


def test_positions_match_get_rope_index(tiny):
  """Left padding, two images in a row, a text-only row; eagerly and under jit with traced ids and mask."""
  _, info, model = tiny
  pv, grid = F.qwen_pixel_values(info, _images(SIZES))
  ids, mask = F.qwen_prompts(info, ROWS, grid, seed=2)
  ref, delta = F.qwen_rope_index(info, ids, mask, grid)
  real = np.broadcast_to(mask.astype(bool), ref.shape)
  ours = np.asarray(model.positions(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), grid))
  assert ours.shape == ref.shape and ours.dtype == np.int32
  np.testing.assert_array_equal(ours[real], ref[real])
  # Generation continues at max + 1, transformers' rope delta past the attended length.
  next_pos = np.where(real, ours, -1).max(axis=(0, 2)) + 1
  np.testing.assert_array_equal(next_pos, delta[:, 0] + mask.sum(-1))
  jitted = jax.jit(lambda i, m: model.positions(i, m, None, grid))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(ids), jnp.asarray(mask))), ours)

  # Same-size images: the grid comes from NHWC pixels, or from cfg.vision.image_size without them.
  images = np.stack(_images([(24, 24)] * 2, seed=3))
  pv2, grid2 = F.qwen_pixel_values(info, list(images))
  ids2, mask2 = F.qwen_prompts(info, [[1, "image", 2, "image", 1]], grid2, seed=3)
  ref2, _ = F.qwen_rope_index(info, ids2, mask2, grid2)
  via_pixels = jax.jit(model.positions)(jnp.asarray(ids2), jnp.asarray(mask2), jnp.asarray(images))
  np.testing.assert_array_equal(np.asarray(via_pixels), ref2)
  sized = qwen25vl.Qwen25VL(dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, image_size=24)),
                            rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(sized.positions(jnp.asarray(ids2), jnp.asarray(mask2))), ref2)


def _plain(cfg):
  return dataclasses.asdict(cfg)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(tmp_path):
  info = F.save_tiny_qwen25vl(str(tmp_path), window_size=8, seed=0)
  model = hf.from_pretrained(str(tmp_path))
  images = np.stack(_images([(16, 24)] * 3))
  pv, grid = F.qwen_pixel_values(info, list(images))
  ids, mask = F.qwen_prompts(info, [[3, "image", 4], [1, "image", 9], [5, "image", 1]], grid)
  ref = F.qwen_reference_generate(info, ids, mask, pv, grid, 8)
  out = decoding.greedy_generate(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                 jnp.asarray(images), max_new_tokens=8, eos_id=10_000)
  assert len({tuple(r) for r in ref.tolist()}) > 1 and len(set(ref[0].tolist())) > 1  # not a degenerate model
  np.testing.assert_array_equal(np.asarray(out), ref)


def _new_layout(k):
  if k.startswith("model."):
    return "model.language_model." + k[len("model."):]
  return "model." + k if k.startswith("visual.") else k


def test_new_key_layout_loads(tmp_path, tiny):
  """transformers 5 writes `model.*` / `visual.*` (checked here); >= 4.52 in memory (and some exporters)
  `model.language_model.*` / `model.visual.*`: both load to the same logits."""
  path, info, _ = tiny
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  st = hf.SafetensorsFile(str(tmp_path / "model.safetensors"))
  assert any(k.startswith("visual.") for k in st.keys()) and any(k.startswith("model.layers.") for k in st.keys())
  del st
  _rewrite_keys(str(tmp_path), _new_layout)
  assert any(k.startswith("model.visual.") for k in hf.SafetensorsFile(str(tmp_path / "model.safetensors")).keys())
  pv, grid = F.qwen_pixel_values(info, _images(SIZES, seed=4))
  ids, mask = F.qwen_prompts(info, ROWS, grid, seed=4)
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  out = np.asarray(hf.from_pretrained(str(tmp_path))(jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(mask),
                                                     image_grid_thw=grid))
  assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4


@pytest.mark.slow
def test_sharded_index_and_mesh(tmp_path):
  info = F.save_tiny_qwen25vl(str(tmp_path), max_shard_size="30KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  pv, grid = F.qwen_pixel_values(info, _images(SIZES, seed=4))
  ids, mask = F.qwen_prompts(info, ROWS, grid, seed=4)
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  real = mask.astype(bool)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  for kw in ({}, {"mesh": mesh}):
    model = hf.from_pretrained(str(tmp_path), **kw)
    out = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(mask), image_grid_thw=grid))
    assert np.abs(out - ref)[real].max() < 1e-4
  q = model.language_model.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
  F.save_tiny_qwen25vl(str(tmp_path))

  def rename(k):
    if k == "visual.blocks.2.mlp.up_proj.weight":
      return "visual.blocks.2.mlp.upp_proj.weight"   # -> missing up_proj and unexpected upp_proj
    return k

  _rewrite_keys(str(tmp_path), rename)
  cfg = json.load(open(tmp_path / "config.json"))
  cfg["text_config"]["intermediate_size"] = 50       # every decoder MLP tensor now mis-shaped
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError) as e:
    hf.from_pretrained(str(tmp_path))
  msg = str(e.value)
  assert "missing: vision_tower.blocks.2.mlp.up_proj.kernel" in msg
  assert "unexpected: visual.blocks.2.mlp.upp_proj.weight" in msg
  assert "mis-shaped: model.layers.0.mlp.gate_proj.weight" in msg


# Parameter counts of the published checkpoints (Qwen/Qwen2.5-VL-{3B,7B}-Instruct).
PUBLISHED_PARAMS = {"qwen2.5-vl-3b": 3_754_622_976, "qwen2.5-vl-7b": 8_292_166_656}


@pytest.mark.parametrize("name", ["qwen2.5-vl-test"] + [pytest.param(n, marks=pytest.mark.slow) for n in PUBLISHED_PARAMS])
def test_keys_round_trip_and_match_transformers(name):
  """hf_names covers every param, map_key inverts hf_key, and the names and shapes are those of a
  transformers model built from config_to_hf (compared on the meta device: nothing allocated)."""
  import torch
  import transformers

  cfg = qwen25vl.VARIANTS[name]
  names = hf.hf_names(cfg)
  model = families.abstract(cfg)
  shapes = {paths.dotted(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
  assert sorted(names.values()) == sorted(shapes)
  assert all(hf.map_key(k, cfg)[0] == p and hf.hf_key(p, cfg) == k for k, p in names.items())
  assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in names)
  assert ("lm_head.weight" in names) == (not cfg.text.tie_word_embeddings)
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  with torch.device("meta"):
    theirs = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig.from_dict(hf.config_to_hf(cfg)))
  want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  if cfg.text.tie_word_embeddings:
    want.pop("lm_head.weight")
  assert {k: hf.hf_shape(k, shapes[p], cfg) for k, p in names.items()} == want
  if name in PUBLISHED_PARAMS:
    assert sum(int(np.prod(s)) for s in shapes.values()) == PUBLISHED_PARAMS[name]
  # The LLaVA default of the key functions is unchanged.
  assert hf.map_key("model.visual.blocks.0.attn.qkv.weight") is None
  assert hf.map_key("model.visual.blocks.0.attn.qkv.weight", "qwen2_5_vl")[0] == "vision_tower.blocks.0.attn.qkv.kernel"


@pytest.mark.slow  # the fast tier keeps one mixed-size parity case, positions and decoding
def test_exported_weights_give_transformers_our_logits():
  """to_hf inverts the import: our random model's tensors, loaded by transformers from config_to_hf's
  config, give our logits (NHWC in ours, the processor layout in theirs)."""
  import torch
  import transformers

  cfg = qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "text": {"tie_word_embeddings": False}})
  model = qwen25vl.Model(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  params = {}
  for p, var in paths.params(model).items():  # norms away from 1, biases away from 0
    params[p] = np.asarray(var.get_value()) + 0.05 * rng.normal(size=var.get_value().shape).astype(np.float32)
    var.set_value(jnp.asarray(params[p]))
  theirs = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_dict(
      hf.config_to_hf(cfg))).eval()
  state = {k: torch.from_numpy(np.ascontiguousarray(hf.to_hf(k, params[p], cfg))) for k, p in hf.hf_names(cfg).items()}
  missing, unexpected = theirs.load_state_dict(state, strict=False)
  assert not missing and not unexpected
  info = {"model": theirs, "image_token_id": cfg.image_token_id, "vision_start_token_id": cfg.vision_start_token_id,
          "vision_end_token_id": cfg.vision_end_token_id, "patch_size": 4, "merge_size": 2,
          "temporal_patch_size": 2, "pad_id": 0, "text_ids": (6, cfg.text.vocab_size)}
  images = np.stack(_images([(24, 24)] * 2, seed=5))
  pv, grid = F.qwen_pixel_values(info, list(images))
  ids, mask = F.qwen_prompts(info, [[2, "image", 3], ["image", 1]], grid, seed=5)
  ref = F.qwen_reference_logits(info, ids, mask, pv, grid)
  out = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask)))
  assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4


def test_config_round_trip_reads_flat_configs_and_rejects_what_it_cannot_build():
  cfg = qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "vision": {"image_size": 48, "tokens_per_second": 4,
                                                                 "fullatt_block_indexes": [0, 1]},
                                   "text": {"mrope_section": [1, 1, 2], "tie_word_embeddings": True}})
  assert cfg.vision.fullatt_block_indexes == (0, 1) and cfg.text.mrope_section == (1, 1, 2)
  d = hf.config_to_hf(cfg)
  assert hf.config_from_hf(json.loads(json.dumps(d))) == cfg
  assert qwen25vl.config_from_dict(json.loads(json.dumps(_plain(cfg)))) == cfg
  # The published config.json files are flat: text settings at the top, rope_scaling of type mrope.
  flat = {k: v for k, v in d.items() if k != "text_config"}
  flat.update({k: v for k, v in d["text_config"].items() if k not in ("rope_parameters", "model_type")})
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
  flat["vision_config"] = {("in_chans" if k == "in_channels" else k): v for k, v in d["vision_config"].items()
                           if k != "rope_parameters"}
  assert hf.config_from_hf(flat) == cfg
  with pytest.raises(NotImplementedError, match="use_sliding_window"):
    hf.config_from_hf({**d, "text_config": {**d["text_config"], "use_sliding_window": True}})
  with pytest.raises(NotImplementedError, match="yarn"):
    hf.config_from_hf({**d, "text_config": {**d["text_config"], "rope_parameters": {"rope_type": "yarn"}}})
  with pytest.raises(NotImplementedError, match="qwen2_vl"):
    hf.config_from_hf({"model_type": "qwen2_vl"})
  with pytest.raises(ValueError, match="family"):
    qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "family": "llava"})
  with pytest.raises(ValueError, match="image_size"):
    qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "vision": {"image_size": 20}})
  with pytest.raises(ValueError, match="mrope_section"):
    qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "text": {"mrope_section": [2, 2, 2]}})
  with pytest.raises(hf.UserError, match="attention_bias"):
    hf.config_to_hf(qwen25vl.config_from_dict({"variant": "qwen2.5-vl-test", "text": {"attention_bias": False}}))
  assert isinstance(hf.config_from_hf({"text_config": {"vocab_size": 32064}}), llava.LlavaConfig)  # no model_type


def test_input_errors(tiny):
  _, info, model = tiny
  images = np.stack(_images([(16, 16)] * 2))
  pv, grid = F.qwen_pixel_values(info, list(images))
  ids, _ = F.qwen_prompts(info, [["image", 2], [3]], grid)
  with pytest.raises(ValueError, match="image tokens"):
    model.embed(jnp.asarray(ids), jnp.asarray(images))  # two images, placeholders for one
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda p, g: model.image_features(p, g))(jnp.asarray(pv), jnp.asarray(grid))
  with pytest.raises(ValueError, match="multiples"):
    model.image_features(jnp.zeros((1, 12, 16, 3)))
  with pytest.raises(ValueError, match="image_grid_thw"):
    model.image_features(jnp.asarray(pv))
  llava_model = llava.Model("test", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="image_grid_thw"):
    llava_model.positions(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32), None, [[1, 2, 2]])


def test_decode_step_and_layers_take_either_position_layout():
  """Text positions [B, T] equal the same positions on all three mrope components; a decoder layer
  runs alone (as calibration calls it) and the cache comes from llama.init_cache."""
  model = qwen25vl.Model("qwen2.5-vl-test", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, model.cfg.text.hidden_size))
  pos = jnp.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
  pos3 = jnp.broadcast_to(pos, (3, 2, 5))
  mask = jnp.ones((2, 5), jnp.int32)
  cache = qwen25vl.llama.init_cache(model.cfg.text, 2, 8, jnp.float32)
  cache_mask = jnp.concatenate([mask, jnp.zeros((2, 3), jnp.int32)], axis=1)
  a, _ = model.decode_step(x, pos, cache, jnp.int32(0), cache_mask)
  b, _ = model.decode_step(x, pos3, cache, jnp.int32(0), cache_mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  causal = qwen25vl.llama.causal_mask(mask)
  layer = model.language_model.layers[0]
  np.testing.assert_array_equal(np.asarray(layer(x, pos, causal, None, None)[0]),
                                np.asarray(layer(x, pos3, causal, None, None)[0]))
  shifted = jnp.stack([pos, pos + 1, pos])  # another height component: another rotation
  assert not np.allclose(np.asarray(layer(x, shifted, causal, None, None)[0]),
                         np.asarray(layer(x, pos3, causal, None, None)[0]))
  logits, aux = model.forward(jnp.array([[5, 6, 7]]))
  assert logits.shape == (1, 3, 64) and len(aux["layer_inputs"]) == 2


def test_every_linear_goes_through_the_dense_factory_with_logical_axes():
  built = []

  def counting_dense(*args, **kw):
    built.append(layers.Dense(*args, **kw))
    return built[-1]

  model = qwen25vl.Model("qwen2.5-vl-test", rngs=nnx.Rngs(0), dense=counting_dense)
  cfg = model.cfg
  expected = 1 + cfg.vision.depth * 5 + 2 + cfg.text.num_hidden_layers * 7 + 1  # patch, blocks, merger, decoder, head
  assert len(built) == expected == len(paths.dense_layers(model))
  for path, var in paths.params(model).items():
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path
    assert all(a is None or a in dict(sharding.DEFAULT_RULES) for a in axes), (path, axes)


@pytest.mark.slow
def test_sharded_and_bf16_forward_track_fp32():
  model = qwen25vl.Model("qwen2.5-vl-test", rngs=nnx.Rngs(0))
  cfg = model.cfg
  images = np.stack(_images([(24, 24)] * 4, seed=6))
  n = cfg.num_image_tokens
  ids = np.concatenate([np.full((4, 1), 7), np.full((4, 1), 4), np.full((4, n), 3), np.full((4, 1), 5),
                        np.arange(8, 12)[:, None]], axis=1).astype(np.int32)
  ref = logits(model, jnp.asarray(ids), jnp.asarray(images))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  sharded = sharding.create_sharded(lambda: qwen25vl.Model("qwen2.5-vl-test", rngs=nnx.Rngs(0)), mesh)
  assert sharded.language_model.layers[0].mlp.gate_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "model")
  x = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh, 2))
  out = logits(sharded, x, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  bf16 = qwen25vl.Model("qwen2.5-vl-test", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  nnx.update(bf16, jax.tree.map(lambda v: v.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
  b = logits(bf16, jnp.asarray(ids), jnp.asarray(images))
  assert b.dtype == jnp.bfloat16
  assert np.abs(np.asarray(b, np.float32) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()
