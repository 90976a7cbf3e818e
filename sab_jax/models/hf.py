"""Exact import of Hugging Face LLaVA and Qwen2.5-VL checkpoints (config.json + *.safetensors), no torch.

The safetensors files are memory-mapped and read one tensor (or, on a mesh, one
device's slice of a tensor) at a time, so a 7B checkpoint never needs two full
copies in host memory. config.json's `model_type` picks the family (`FAMILIES`): a
`Family` holds everything that differs between them (config reader and writer, the
key canonicaliser, one rule table, the new-layout prefixes, the architecture check);
the functions below are shared. Both key layouts seen in the wild are accepted:

  * LLaVA: transformers < 4.52 (`language_model.model.*`, `language_model.lm_head`) and
    later (`model.language_model.*`, `lm_head`), with the vision tower under
    `vision_tower.vision_model.*` or `vision_tower.*`.
  * Qwen2.5-VL: `model.*` (decoder), `visual.*`, `lm_head` (what transformers < 4.52 and,
    converting back on save, 5.x write) and `model.language_model.*`, `model.visual.*`,
    `lm_head` (transformers >= 4.52 in memory).

The same rule table read backwards serves the Hugging Face export (`sab_jax.export.hf`):
`to_hf` turns our value of a param into the tensor an HF key names, `hf_key` / `hf_names`
give the new-layout names where no source checkpoint gives them, and `config_to_hf` writes a
config.json for a model shape that has none.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sab_jax import sharding as sharding_lib
from sab_jax.errors import UserError
from sab_jax.models import clip, layers, llama, paths, qwen25vl
from sab_jax.models.llava import Llava, LlavaConfig
from sab_jax.models.qwen25vl import Qwen25VL, Qwen25VLConfig

SAFETENSORS_DTYPES = {  # safetensors dtype code -> numpy dtype
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# Keys that carry no weights of ours (buffers some exporters wrote).
_IGNORED = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")

ModelConfig = Any  # LlavaConfig | Qwen25VLConfig


# --- safetensors ------------------------------------------------------------------
class SafetensorsFile:
  """Lazy reader: the header is parsed, tensors are views into a read-only memory map."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (truncated header)")
      (n,) = struct.unpack("<Q", raw)
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    self.offset = 8 + n
    self.header = header
    size = os.path.getsize(path)
    for name, h in header.items():
      if h["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
      if self.offset + h["data_offsets"][1] > size:
        raise ValueError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if header else None

  def keys(self):
    return self.header.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    h = self.header[name]
    start, end = h["data_offsets"]
    buf = self._mmap[self.offset + start: self.offset + end]
    return buf.view(SAFETENSORS_DTYPES[h["dtype"]]).reshape(h["shape"])


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
  """Maps every tensor name to the file that holds it (single file or sharded index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
    out = {}
    for key, fn in weight_map.items():
      if key not in files[fn].header:
        raise ValueError(f"{index} says {key} is in {fn}, but that file does not hold it")
      out[key] = files[fn]
    return out
  single = os.path.join(path, "model.safetensors")
  candidates = [single] if os.path.exists(single) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
  if not candidates:
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or *.safetensors in {path}")
  out = {}
  for fn in candidates:
    st = SafetensorsFile(fn)
    out.update({k: st for k in st.keys()})
  return out


# --- the parts every family shares ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Transform:
  """One rule's array transform both ways: HF tensor -> our array (calling it, what the import
  applies) and our array -> HF tensor (`to_hf`, what the Hugging Face export applies)."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

  def __call__(self, w: np.ndarray) -> np.ndarray:
    return self.to_ours(w)


_linear = _Transform(lambda w: w.T, lambda w, cfg: w.T)  # torch Linear [out, in] <-> Flax kernel [in, out]
_same = _Transform(lambda w: w, lambda w, cfg: w)

Rule = tuple[str, str, _Transform]  # (regex over canonical HF names, our path template, transform)


def _inverted(pattern: str, target: str) -> tuple[re.Pattern, list[str]]:
  """A rule read backwards: a regex over our paths (the target with the pattern's groups put
  back) and the literal pieces of the canonical HF name between those groups."""
  groups = re.findall(r"\(([^()]*)\)", pattern)  # the rules' groups do not nest
  pieces = re.split(r"\\(\d)", target)           # literal, group number, literal, ...
  regex = "".join(re.escape(x) if i % 2 == 0 else f"(?P<g{x}>{groups[int(x) - 1]})" for i, x in enumerate(pieces))
  literals = [re.sub(r"\\(.)", r"\1", x) for x in re.split(r"\([^()]*\)", pattern)]
  return re.compile(regex), literals


@dataclasses.dataclass(frozen=True)
class Family:
  """What differs between two checkpoint families; `FAMILIES` holds one per config.json `model_type`."""
  model_type: str                                  # config.json's `model_type`
  title: str                                       # for messages
  architecture: str                                # transformers' class, config.json's `architectures`
  config_type: type
  model: Callable[..., nnx.Module]                 # builds the Flax model: model(cfg, rngs=..., **kw)
  read: Callable[[dict[str, Any]], ModelConfig]    # config.json -> our config
  write: Callable[[ModelConfig], dict[str, Any]]   # our config -> config.json (after `check`)
  check: Callable[[ModelConfig], None]             # raises UserError where transformers has no such model
  # (prefix, replacement) applied in order: one canonical name per tensor whatever the layout.
  canonical_prefixes: tuple[tuple[str, str], ...]
  rules: tuple[Rule, ...]                          # first match wins
  # Canonical prefix -> the layout transformers >= 4.52 names its modules with (`hf_key`).
  new_layout: tuple[tuple[str, str], ...]

  def canonical(self, key: str) -> str:
    for old, new in self.canonical_prefixes:
      if key.startswith(old):
        key = new + key[len(old):]
    return key

  @functools.cached_property
  def inverted(self) -> list[tuple[re.Pattern, list[str]]]:
    """`rules` read backwards (derived, not a second table)."""
    return [_inverted(pattern, target) for pattern, target, _ in self.rules]

  def map_key(self, hf_key: str) -> tuple[str, _Transform] | None:
    key = self.canonical(hf_key)
    for pattern, target, fn in self.rules:
      if re.fullmatch(pattern, key):
        return re.sub(pattern, target, key), fn
    return None

  def hf_key(self, path: str) -> str | None:
    for regex, literals in self.inverted:
      m = regex.fullmatch(path)
      if m:
        name = literals[0] + "".join(m.group(f"g{i}") + lit for i, lit in enumerate(literals[1:], 1))
        for old, new in self.new_layout:
          if name.startswith(old):
            return new + name[len(old):]
        return name
    return None


def _rope_theta(tc: dict[str, Any]) -> float:
  params = tc.get("rope_parameters") or {}
  scaling = tc.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise NotImplementedError(f"rope type {kind!r} is not supported (only default RoPE, as in LLaVA-1.5)")
  return float(params.get("rope_theta", tc.get("rope_theta", 10000.0)))


# --- LLaVA ----------------------------------------------------------------------------
def _llava_config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
  tc, vc = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
  if tc.get("model_type", "llama") != "llama":
    raise NotImplementedError(f"text model_type {tc['model_type']!r}: only llama decoders are supported")
  if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise NotImplementedError(f"vision model_type {vc['model_type']!r}: only CLIP vision towers are supported")
  heads = tc.get("num_attention_heads", 32)
  text = llama.TextConfig(
      vocab_size=tc.get("vocab_size", 32000), hidden_size=tc.get("hidden_size", 4096),
      intermediate_size=tc.get("intermediate_size", 11008), num_hidden_layers=tc.get("num_hidden_layers", 32),
      num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads") or heads,
      head_dim=tc.get("head_dim"), rms_norm_eps=tc.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(tc),
      max_position_embeddings=tc.get("max_position_embeddings", 2048), hidden_act=tc.get("hidden_act", "silu"),
      attention_bias=tc.get("attention_bias", False), mlp_bias=tc.get("mlp_bias", False),
      initializer_range=tc.get("initializer_range", 0.02),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings") or tc.get("tie_word_embeddings", False)))
  vision = clip.VisionConfig(
      hidden_size=vc.get("hidden_size", 1024), intermediate_size=vc.get("intermediate_size", 4096),
      num_hidden_layers=vc.get("num_hidden_layers", 24), num_attention_heads=vc.get("num_attention_heads", 16),
      image_size=vc.get("image_size", 336), patch_size=vc.get("patch_size", 14),
      num_channels=vc.get("num_channels", 3), hidden_act=vc.get("hidden_act", "quick_gelu"),
      layer_norm_eps=vc.get("layer_norm_eps", 1e-5), initializer_range=vc.get("initializer_range", 0.02))
  layer = hf.get("vision_feature_layer", -2)
  return LlavaConfig(
      vision=vision, text=text,
      image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
      projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
      vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
      vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
      multimodal_projector_bias=hf.get("multimodal_projector_bias", True))


def _llava_check(cfg: LlavaConfig) -> None:
  if cfg.image_coordinates:
    raise UserError("the model has image_coordinates=True (a learned image_coordinate_embedding that transformers' "
                    "LlavaForConditionalGeneration does not have), so it has no Hugging Face form; serve it "
                    "from its packed export (sab_jax.serve.packed)")


def _llava_config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
  t, v = cfg.text, cfg.vision
  text = {
      "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
      "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
      "rope_theta": t.rope_theta,  # transformers < 5 reads this one
      "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
      "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias, "initializer_range": t.initializer_range,
      "tie_word_embeddings": t.tie_word_embeddings}
  if t.head_dim is not None:  # else transformers derives it as we do (hidden_size // heads)
    text["head_dim"] = t.head_dim
  vision = {
      "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
      "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
      "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
      "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps, "initializer_range": v.initializer_range}
  layer = cfg.vision_feature_layer
  return {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": "bfloat16",
      "image_token_index": cfg.image_token_id, "image_seq_length": v.num_patches,
      "projector_hidden_act": cfg.projector_hidden_act,
      "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
      "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
      "multimodal_projector_bias": cfg.multimodal_projector_bias, "tie_word_embeddings": t.tie_word_embeddings,
      "text_config": text, "vision_config": vision}


def _clip_patch_to_hf(w: np.ndarray, cfg: LlavaConfig) -> np.ndarray:
  p, c = cfg.vision.patch_size, cfg.vision.num_channels  # Dense [(p, p, C), D] -> Conv2d [D, C, p, p]
  return w.reshape(p, p, c, w.shape[-1]).transpose(3, 2, 0, 1)


_clip_patch = _Transform(lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),  # Conv2d -> Dense on patches
                         _clip_patch_to_hf)

# The Llama-style decoder (LLaVA's Llama, Qwen2.5-VL's Qwen2) and head, in canonical names. A bias the
# model does not have (Qwen2's o_proj; LLaVA's without attention_bias) maps to no param: reported unexpected.
_DECODER_RULES = (
    (r"language_model\.embed_tokens\.weight", "language_model.embed_tokens.embedding", _same),
    (r"language_model\.norm\.weight", "language_model.norm.scale", _same),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"language_model.layers.\1.\2.scale", _same),
    (r"language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight",
     r"language_model.layers.\1.\2.\3.kernel", _linear),
    (r"language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", r"language_model.layers.\1.\2.\3.bias",
     _same),
    (r"lm_head\.weight", "lm_head.kernel", _linear),
)

LLAVA = Family(
    model_type="llava", title="LLaVA", architecture="LlavaForConditionalGeneration", config_type=LlavaConfig,
    model=Llava, read=_llava_config_from_hf, write=_llava_config_to_hf, check=_llava_check,
    canonical_prefixes=(("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
                        ("language_model.lm_head.", "lm_head."), ("model.vision_tower.", "vision_tower."),
                        ("vision_tower.vision_model.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector.")),
    rules=(
        *_DECODER_RULES,
        (r"vision_tower\.embeddings\.class_embedding", "vision_tower.class_embedding", _same),
        (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision_tower.patch_embedding.kernel", _clip_patch),
        (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower.position_embedding", _same),
        (r"vision_tower\.(pre_layrnorm|post_layernorm)\.weight", r"vision_tower.\1.scale", _same),
        (r"vision_tower\.(pre_layrnorm|post_layernorm)\.bias", r"vision_tower.\1.bias", _same),
        (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm\d)\.weight", r"vision_tower.layers.\1.\2.scale", _same),
        (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm\d)\.bias", r"vision_tower.layers.\1.\2.bias", _same),
        (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.weight",
         r"vision_tower.layers.\1.self_attn.\2.kernel", _linear),
        (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.bias",
         r"vision_tower.layers.\1.self_attn.\2.bias", _same),
        (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc\d)\.weight", r"vision_tower.layers.\1.\2.kernel", _linear),
        (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc\d)\.bias", r"vision_tower.layers.\1.\2.bias", _same),
        (r"multi_modal_projector\.(linear_\d)\.weight", r"multi_modal_projector.\1.kernel", _linear),
        (r"multi_modal_projector\.(linear_\d)\.bias", r"multi_modal_projector.\1.bias", _same),
    ),
    new_layout=(("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower.vision_model."),
                ("multi_modal_projector.", "model.multi_modal_projector.")))


# --- Qwen2.5-VL -------------------------------------------------------------------------
# Our vision.image_size is not transformers' (its processor sizes every image): config_to_hf
# writes it under this key of vision_config, which transformers keeps as an unused attribute.
QWEN_IMAGE_SIZE_KEY = "sab_jax_image_size"


def _qwen_config_from_hf(hf: dict[str, Any]) -> Qwen25VLConfig:
  """transformers' defaults; the text settings either flat at the top (the published Qwen
  config.json files) or nested in `text_config` (what transformers >= 4.52 writes)."""
  nested = dict(hf.get("text_config") or {})
  tc = {**{k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}, **nested}
  vc = dict(hf.get("vision_config") or {})
  if tc.get("use_sliding_window"):
    raise NotImplementedError("use_sliding_window=True is not supported (the published Qwen2.5-VL checkpoints "
                              "use full attention)")
  rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
  kind = rope.get("rope_type") or rope.get("type") or "default"
  if kind not in ("default", "mrope"):
    raise NotImplementedError(f"rope type {kind!r} is not supported (only Qwen2.5-VL's default mrope)")
  heads = tc.get("num_attention_heads", 64)
  text = qwen25vl.TextConfig(
      vocab_size=tc.get("vocab_size", 152064), hidden_size=tc.get("hidden_size", 8192),
      intermediate_size=tc.get("intermediate_size", 29568), num_hidden_layers=tc.get("num_hidden_layers", 80),
      num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads") or heads,
      rms_norm_eps=tc.get("rms_norm_eps", 1e-5),
      rope_theta=float(rope.get("rope_theta", tc.get("rope_theta", 1000000.0))),
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
      max_position_embeddings=tc.get("max_position_embeddings", 32768), hidden_act=tc.get("hidden_act", "silu"),
      initializer_range=tc.get("initializer_range", 0.02),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings") or nested.get("tie_word_embeddings", False)))
  vrope = dict(vc.get("rope_parameters") or {})
  if vrope.get("rope_type", "axial") != "axial":
    raise NotImplementedError(f"vision rope type {vrope['rope_type']!r} is not supported (only axial)")
  unit = vc.get("patch_size", 14) * vc.get("spatial_merge_size", 2)
  vision = qwen25vl.VisionConfig(
      depth=vc.get("depth", 32), hidden_size=vc.get("hidden_size", 3584),
      intermediate_size=vc.get("intermediate_size", 3420), num_heads=vc.get("num_heads", 16),
      in_channels=vc.get("in_channels", vc.get("in_chans", 3)), patch_size=vc.get("patch_size", 14),
      spatial_merge_size=vc.get("spatial_merge_size", 2), temporal_patch_size=vc.get("temporal_patch_size", 2),
      window_size=vc.get("window_size", 112), fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes",
                                                                                 (7, 15, 23, 31))),
      out_hidden_size=vc.get("out_hidden_size", 3584), hidden_act=vc.get("hidden_act", "silu"),
      rope_theta=float(vrope.get("rope_theta", 10000.0)), tokens_per_second=vc.get("tokens_per_second", 4),
      initializer_range=vc.get("initializer_range", 0.02),
      image_size=vc.get(QWEN_IMAGE_SIZE_KEY) or max(unit, 336 // unit * unit))
  return Qwen25VLConfig(
      vision=vision, text=text, image_token_id=hf.get("image_token_id", 151655),
      video_token_id=hf.get("video_token_id", 151656),
      vision_start_token_id=hf.get("vision_start_token_id", 151652),
      vision_end_token_id=hf.get("vision_end_token_id", 151653))


def _qwen_check(cfg: Qwen25VLConfig) -> None:
  t, v = cfg.text, cfg.vision
  if not t.attention_bias or t.mlp_bias or v.rms_norm_eps != 1e-6:
    raise UserError(f"the model has attention_bias={t.attention_bias}, mlp_bias={t.mlp_bias}, vision rms_norm_eps="
                    f"{v.rms_norm_eps}; transformers' Qwen2_5_VLForConditionalGeneration fixes them at True, False, "
                    f"1e-6, so it has no Hugging Face form; serve it from its packed export (sab_jax.serve.packed)")


def _qwen_config_to_hf(cfg: Qwen25VLConfig) -> dict[str, Any]:
  t, v = cfg.text, cfg.vision
  section = list(t.mrope_section)
  text = {
      "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
      "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
      "initializer_range": t.initializer_range, "use_sliding_window": False,
      "tie_word_embeddings": t.tie_word_embeddings,
      "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": t.rope_theta},
      # transformers < 5 reads these two.
      "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": section}}
  vision = {
      "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
      "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
      "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
      "temporal_patch_size": v.temporal_patch_size, "window_size": v.window_size,
      "fullatt_block_indexes": list(v.fullatt_block_indexes), "out_hidden_size": v.out_hidden_size,
      "hidden_act": v.hidden_act, "tokens_per_second": v.tokens_per_second, "initializer_range": v.initializer_range,
      "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}, QWEN_IMAGE_SIZE_KEY: v.image_size}
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "dtype": "bfloat16",
      "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
      "tie_word_embeddings": t.tie_word_embeddings, "text_config": text, "vision_config": vision}


def _conv3d_to_hf(w: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
  v = cfg.vision  # Dense [(C, T, P, P), D] -> Conv3d [D, C, T, P, P]
  return w.T.reshape(w.shape[-1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


# Conv3d [D, C, T, P, P] -> Dense on patches flattened (C, T, P, P), transformers' processor layout.
_conv3d_patch = _Transform(lambda w: w.reshape(w.shape[0], -1).T, _conv3d_to_hf)

QWEN2_5_VL = Family(
    model_type="qwen2_5_vl", title="Qwen2.5-VL", architecture="Qwen2_5_VLForConditionalGeneration",
    config_type=Qwen25VLConfig, model=Qwen25VL, read=_qwen_config_from_hf, write=_qwen_config_to_hf,
    check=_qwen_check,
    canonical_prefixes=(("model.language_model.", "language_model."), ("model.visual.", "visual."),
                        ("model.", "language_model.")),
    rules=(
        *_DECODER_RULES,
        (r"visual\.patch_embed\.proj\.weight", "vision_tower.patch_embed.kernel", _conv3d_patch),
        (r"visual\.blocks\.(\d+)\.(norm\d)\.weight", r"vision_tower.blocks.\1.\2.scale", _same),
        (r"visual\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.\w+_proj)\.weight", r"vision_tower.blocks.\1.\2.kernel",
         _linear),
        (r"visual\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.\w+_proj)\.bias", r"vision_tower.blocks.\1.\2.bias",
         _same),
        (r"visual\.merger\.ln_q\.weight", "multi_modal_projector.ln_q.scale", _same),
        (r"visual\.merger\.mlp\.0\.weight", "multi_modal_projector.linear_1.kernel", _linear),
        (r"visual\.merger\.mlp\.0\.bias", "multi_modal_projector.linear_1.bias", _same),
        (r"visual\.merger\.mlp\.2\.weight", "multi_modal_projector.linear_2.kernel", _linear),
        (r"visual\.merger\.mlp\.2\.bias", "multi_modal_projector.linear_2.bias", _same),
    ),
    new_layout=(("language_model.", "model.language_model."), ("visual.", "model.visual.")))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAVA, QWEN2_5_VL)}


def family(of: Family | str | ModelConfig | None = None) -> Family:
  """The family of a config (by type), a config.json `model_type`, or LLaVA for None (the default of
  the functions that take an HF key, kept for their callers from before Qwen2.5-VL)."""
  if of is None:
    return LLAVA
  if isinstance(of, Family):
    return of
  if isinstance(of, str):
    if of not in FAMILIES:
      raise NotImplementedError(f"model_type {of!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[of]
  for f in FAMILIES.values():
    if isinstance(of, f.config_type):
      return f
  raise TypeError(f"no Hugging Face family for a {type(of).__name__}")


# --- config -----------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Our config from a transformers config.json (defaults as transformers'); `model_type` picks the
  family ("llava" when absent)."""
  return family(hf.get("model_type", "llava")).read(hf)


def check_hf_architecture(cfg: ModelConfig) -> None:
  """Raises UserError for a model with parameters (or fixed settings) its transformers class does not have."""
  family(cfg).check(cfg)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers config.json for `cfg` (LLaVA: llama text_config, clip_vision_model vision_config;
  Qwen2.5-VL: qwen2_5_vl_text / qwen2_5_vl_vision).

  For checkpoints that come without one (e.g. a model shape from `VARIANTS`);
  `config_from_hf(config_to_hf(cfg)) == cfg`. Weights are written in bfloat16, hence "dtype".
  Raises UserError for a model transformers cannot express (`check_hf_architecture`).
  """
  f = family(cfg)
  f.check(cfg)
  return f.write(cfg)


# --- key mapping ------------------------------------------------------------------
def _canonical(key: str, of: Family | str | ModelConfig | None = None) -> str:
  """Strips the layout-specific prefixes: one name per tensor whatever the exporter."""
  return family(of).canonical(key)


def map_key(hf_key: str, cfg: Family | str | ModelConfig | None = None) -> tuple[str, _Transform] | None:
  """Our dotted parameter path and the array transform for one HF tensor name (None: not ours).

  `cfg`: the model config, a family or its `model_type`; LLaVA when None.
  """
  return family(cfg).map_key(hf_key)


def hf_key(path: str, cfg: Family | str | ModelConfig | None = None) -> str | None:
  """The HF tensor name of our dotted param path in the new layout (LLaVA: `model.language_model.*`,
  `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`; Qwen2.5-VL:
  `model.language_model.*`, `model.visual.*`; both `lm_head.weight`); None for a param no HF
  tensor maps to. `map_key(hf_key(path, cfg), cfg)[0] == path`. LLaVA when `cfg` is None."""
  return family(cfg).hf_key(path)


def to_hf(hf_key: str, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """The HF tensor `hf_key` from our value of the param `map_key(hf_key)` names (the import's
  transform inverted: kernels transposed back, the patch Dense back to a Conv2d/Conv3d kernel)."""
  f = family(cfg)
  mapped = f.map_key(hf_key)
  if mapped is None:
    raise KeyError(f"{hf_key} is not a tensor of a sab_jax {f.title} (map_key maps it to nothing)")
  return mapped[1].to_hf(value, cfg)


def hf_shape(hf_key: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
  """The shape `to_hf` gives for a value of `shape` (computed on a view, nothing allocated)."""
  return tuple(to_hf(hf_key, np.broadcast_to(np.zeros((), np.uint8), shape), cfg).shape)


def hf_names(cfg: ModelConfig) -> dict[str, str]:
  """{HF tensor name (new layout, `hf_key`): our dotted param path} for every param of the model of `cfg`.

  The names a checkpoint of `cfg` has when no source checkpoint gives them. Raises UserError
  for a model transformers cannot express (`check_hf_architecture`).
  """
  f = family(cfg)
  f.check(cfg)
  _, state = nnx.split(layers.abstract(lambda: f.model(cfg, rngs=nnx.Rngs(0))))
  out = {}
  for p, _ in nnx.to_flat_state(state):
    path = paths.dotted(p)
    name = f.hf_key(path)
    if name is None:
      raise UserError(f"param {path!r} has no Hugging Face {f.title} tensor (sab_jax.models.hf.FAMILIES"
                      f"[{f.model_type!r}].rules maps none to it)")
    out[name] = path
  return out


# --- loading ----------------------------------------------------------------------
def read_config(path: str) -> ModelConfig:
  """The model config of a local Hugging Face checkpoint directory (its config.json)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: pass a local Hugging Face LLaVA or Qwen2.5-VL checkpoint "
                            f"directory")
  with open(cfg_path) as f:
    return config_from_hf(json.load(f))


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    mesh: Mesh | None = None, rules=sharding_lib.DEFAULT_RULES, dense=None,
                    config: Any = None) -> nnx.Module:
  """Loads a local Hugging Face checkpoint directory (LLaVA or Qwen2.5-VL) into the Flax model.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    dtype: compute dtype; param_dtype: dtype the weights are stored in on device.
    mesh: if given, each tensor is placed straight onto its sharding; a device reads
      only its own slice from the memory-mapped file.
    rules: logical-axis rules for `mesh`.
    dense: optional Dense factory (the binarization seam).
    config: the model config to build instead of `read_config(path)`'s, with the same
      weights (e.g. a Qwen2.5-VL fed another square image size, `families.with_image_size`).
  Returns:
    The `Llava` or `Qwen25VL` model holding the checkpoint's weights.
  Raises:
    ValueError: missing, unexpected or mis-shaped tensors, all listed at once.
  """
  cfg = read_config(path) if config is None else config
  fam = family(cfg)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if dense is not None:
    kw["dense"] = dense
  abstract = layers.abstract(lambda: fam.model(cfg, rngs=nnx.Rngs(0), **kw))
  graphdef, abstract_state = nnx.split(abstract)
  expected = {paths.dotted(p): v for p, v in nnx.to_flat_state(abstract_state)}

  tensors = open_checkpoint(path)
  plan, unexpected, misshaped = {}, [], []
  for hf_key, st in tensors.items():
    mapped = fam.map_key(hf_key)
    if mapped is None or mapped[0] not in expected:
      if not _IGNORED.match(hf_key) and not (mapped and mapped[0] == "lm_head.kernel" and cfg.text.tie_word_embeddings):
        unexpected.append(hf_key)
      continue
    target, fn = mapped
    shape = fn(np.empty(st.shape(hf_key), dtype=np.uint8)).shape
    if shape != expected[target].shape:
      misshaped.append(f"{hf_key}: file {st.shape(hf_key)} -> {shape}, model expects {expected[target].shape}")
    plan[target] = (hf_key, st, fn)
  missing = sorted(set(expected) - set(plan))
  if missing or unexpected or misshaped:
    lines = [f"checkpoint {path} does not match the model built from its config.json:"]
    lines += [f"  missing: {m}" for m in missing]
    lines += [f"  unexpected: {u}" for u in sorted(unexpected)]
    lines += [f"  mis-shaped: {m}" for m in misshaped]
    raise ValueError("\n".join(lines))

  shardings = sharding_lib.state_shardings(abstract_state, mesh, rules) if mesh is not None else None
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  values = {}
  for p, var in nnx.to_flat_state(abstract_state):
    hf_key, st, fn = plan[paths.dotted(p)]
    host = fn(st.get(hf_key))  # a view into the memory map: nothing read yet
    np_dtype = np.dtype(var.dtype)
    if mesh is None:
      values[p] = jax.device_put(np.asarray(host, dtype=np_dtype))
    else:
      sh = flat_shardings[p]
      sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
      values[p] = jax.make_array_from_callback(var.shape, sh, lambda idx, h=host: np.asarray(h[idx], dtype=np_dtype))
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in nnx.to_flat_state(abstract_state)])
  return nnx.merge(graphdef, state)
