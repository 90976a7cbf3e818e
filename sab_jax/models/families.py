"""Model families: the one place the pipeline learns which LVLM architecture a config names.

A family is a model class with the LVLM interface the stages use (`embed`, `positions`,
`forward`, `decode_step`, `logits`, `image_features`; `cfg.text`, `cfg.image_token_id`,
`cfg.num_image_tokens`, `cfg.vision.image_size`), how its config is rebuilt from a plain dict
(an ml_collections `config.model`, a manifest's `model_config`, a teacher's meta.json), the
token its tokenizer marks image positions with and its prompt templates. Its checkpoint
side (config type, model class, config.json, tensor names) is `models.hf`'s per-family spec,
which each family here holds; the image processor a checkpoint ships is
`data.images.processor_for`'s.

A config dict names its family with a `family` key (Qwen2.5-VL's configs carry one); a dict
without one is LLaVA's (every config written before there were two families).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from flax import nnx

from sab_jax.models import hf, layers, llava, prompts, qwen25vl


@dataclasses.dataclass(frozen=True)
class Family:
  checkpoint: hf.Family                          # config type, model class, Hugging Face config and names
  config_from_dict: Callable[[dict[str, Any]], Any]
  image_token: str                               # the tokenizer's image placeholder
  prompts: Mapping[str, str]                     # prompt kind ('vqa', 'chat') -> template
  # Whether the vision tower takes any image size (then `with_image_size` may change the
  # square size the pipeline feeds); False: a fixed-size tower (CLIP).
  dynamic_resolution: bool = False

  @property
  def name(self) -> str:  # config.json's model_type, and a config dict's `family`
    return self.checkpoint.model_type

  @property
  def config_type(self) -> type:
    return self.checkpoint.config_type

  @property
  def model(self) -> Callable[..., nnx.Module]:  # (cfg, *, dense, dtype, param_dtype, rngs)
    return self.checkpoint.model


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(hf.LLAVA, llava.config_from_dict, "<image>",
           {"vqa": prompts.LLAVA_PROMPT, "chat": prompts.LLAVA_CHAT_PROMPT}),
    Family(hf.QWEN2_5_VL, qwen25vl.config_from_dict, "<|image_pad|>",
           {"vqa": prompts.QWEN_VQA_PROMPT, "chat": prompts.QWEN_CHAT_PROMPT}, dynamic_resolution=True),
)}
PROMPT_KINDS = ("vqa", "chat")
# Every family's published and test shapes by name (`llava.VARIANTS`, `qwen25vl.VARIANTS`).
VARIANTS: dict[str, Any] = {**llava.VARIANTS, **qwen25vl.VARIANTS}


def of(cfg: Any) -> Family:
  """The family of a model config object."""
  for family in FAMILIES.values():
    if isinstance(cfg, family.config_type):
      return family
  raise TypeError(f"{type(cfg).__name__} is no model family's config; known: {sorted(FAMILIES)}")


def config_from_dict(d: Mapping[str, Any]) -> Any:
  """The config object of a plain dict (its `family` key; none: LLaVA)."""
  d = dict(d)
  name = d.get("family", "llava")
  if name not in FAMILIES:
    raise ValueError(f"model family {name!r} is not known; sab_jax builds {sorted(FAMILIES)}")
  if name == "llava":
    d.pop("family", None)
  return FAMILIES[name].config_from_dict(d)


def build(cfg: Any, **kw) -> nnx.Module:
  """The model of `cfg` (`kw`: dense, dtype, param_dtype, rngs as every family's constructor takes)."""
  return of(cfg).model(cfg, **kw)


def abstract(cfg: Any, **kw) -> nnx.Module:
  """`build`'s structure, shapes and dtypes, nothing initialised (a restore or import template)."""
  return layers.abstract(lambda: build(cfg, rngs=nnx.Rngs(0), **kw))


def with_image_size(cfg: Any, image_size: int | None) -> Any:
  """`cfg` fed `image_size`-square images (None: as it is); ValueError if its tower cannot take them."""
  if image_size is None or image_size == cfg.vision.image_size:
    return cfg
  if not of(cfg).dynamic_resolution:
    raise ValueError(f"the {of(cfg).name} vision tower takes {cfg.vision.image_size}x{cfg.vision.image_size} images "
                     f"only, not {image_size}")
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=int(image_size)))


def prompt_template(cfg: Any, kind: str = "vqa") -> str:
  """The template `tokenizer.prompt_ids` expands for a Hugging Face tokenizer of this family."""
  prompts = of(cfg).prompts
  if kind not in prompts:
    raise ValueError(f"prompt {kind!r}: use one of {sorted(prompts)}")
  return prompts[kind]
