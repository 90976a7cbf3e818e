"""The pipeline's one seam between model families: a config dict names its family (none: LLaVA,
every config written before Qwen2.5-VL), and only a dynamic-resolution tower takes another
square image size."""

import dataclasses

import jax
import pytest
from flax import nnx

from sab_jax.data import tokenizer as tokenizer_lib
from sab_jax.export import manifest
from sab_jax.models import families, layers, llava, qwen25vl


def test_config_dicts_round_trip_by_family():
  for name in ("test", "qwen2.5-vl-test", "qwen2.5-vl-7b", "llava-1.5-7b"):
    cfg = families.VARIANTS[name]
    d = manifest.jsonable(cfg)  # what an export's manifest and a teacher's meta.json hold
    assert families.config_from_dict(d) == cfg
  # A dict without a family (a demo config.model, any manifest written before there were two) is LLaVA's.
  assert families.config_from_dict({"variant": "demo", "vision": {}, "text": {}}) == llava.VARIANTS["demo"]
  assert isinstance(families.config_from_dict({"family": "qwen2_5_vl", "variant": "qwen2.5-vl-test"}),
                    qwen25vl.Qwen25VLConfig)
  with pytest.raises(ValueError, match="model family 'internvl' is not known"):
    families.config_from_dict({"family": "internvl"})


def test_each_family_builds_its_model_and_prompts():
  for name, kind in (("test", llava.Llava), ("qwen2.5-vl-test", qwen25vl.Qwen25VL)):
    cfg = families.VARIANTS[name]
    assert isinstance(families.abstract(cfg), kind)
  assert families.prompt_template(llava.VARIANTS["test"]) == tokenizer_lib.LLAVA_PROMPT
  assert families.prompt_template(qwen25vl.VARIANTS["qwen2.5-vl-test"], "chat") == tokenizer_lib.QWEN_CHAT_PROMPT
  with pytest.raises(ValueError, match="prompt 'free'"):
    families.prompt_template(llava.VARIANTS["test"], "free")
  # The image placeholder every family's templates carry is the one its tokenizer is opened with.
  for family in families.FAMILIES.values():
    assert all(t.count(family.image_token) == 1 for t in family.prompts.values())


def test_only_a_dynamic_resolution_tower_takes_another_image_size():
  qwen = qwen25vl.VARIANTS["qwen2.5-vl-test"]
  bigger = families.with_image_size(qwen, 48)
  assert bigger.vision.image_size == 48 and bigger.num_image_tokens == (48 // 8) ** 2
  assert dataclasses.replace(bigger, vision=qwen.vision) == qwen  # nothing else changed
  assert families.with_image_size(qwen, None) is qwen
  with pytest.raises(ValueError):  # not a multiple of patch x merge
    families.with_image_size(qwen, 50)
  clip = llava.VARIANTS["test"]
  assert families.with_image_size(clip, clip.vision.image_size) is clip
  with pytest.raises(ValueError, match="takes 32x32 images only"):
    families.with_image_size(clip, 64)


@pytest.mark.parametrize("name", ["test", "qwen2.5-vl-test"])
def test_abstract_templates_equal_nnx_eval_shape(name):
  """`layers.abstract` traces parameters as zeros instead of drawing them (linear, not quadratic,
  in the parameter count): the template must be the one `nnx.eval_shape` gives, in structure,
  shapes, dtypes and axis names."""
  cfg = families.VARIANTS[name]
  for kw in ({}, {"param_dtype": jax.numpy.bfloat16}):
    ours = nnx.split(families.abstract(cfg, **kw))
    theirs = nnx.split(nnx.eval_shape(lambda: families.build(cfg, rngs=nnx.Rngs(0), **kw)))
    assert ours[0] == theirs[0]
    a, b = list(nnx.to_flat_state(ours[1])), list(nnx.to_flat_state(theirs[1]))
    assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 50
    for (p, u), (_, v) in zip(a, b):
      assert type(u) is type(v) and u.get_value() == v.get_value() and u.get_metadata() == v.get_metadata(), p
  assert not layers._SHAPES_ONLY.get()  # only inside the template's trace: a real model draws its weights
