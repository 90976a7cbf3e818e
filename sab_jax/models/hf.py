"""Exact import of Hugging Face LLaVA checkpoints (config.json + *.safetensors), no torch.

The safetensors files are memory-mapped and read one tensor (or, on a mesh, one
device's slice of a tensor) at a time, so a 7B checkpoint never needs two full
copies in host memory. Both key layouts seen in the wild are accepted:
transformers < 4.52 (`language_model.model.*`, `language_model.lm_head`) and later
(`model.language_model.*`, `lm_head`), with the vision tower under
`vision_tower.vision_model.*` or `vision_tower.*`.

The same rule table read backwards serves the Hugging Face export (`sab_jax.export.hf`):
`to_hf` turns our value of a param into the tensor an HF key names, `hf_key` / `hf_names`
give the new-layout names where no source checkpoint gives them, and `config_to_hf` writes a
config.json for a model shape that has none.
"""

from __future__ import annotations

import dataclasses
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
from sab_jax.models import clip, llama
from sab_jax.models.llava import Llava, LlavaConfig

SAFETENSORS_DTYPES = {  # safetensors dtype code -> numpy dtype
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# Keys that carry no weights of ours (buffers some exporters wrote).
_IGNORED = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")


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


# --- config -----------------------------------------------------------------------
def _rope_theta(tc: dict[str, Any]) -> float:
  params = tc.get("rope_parameters") or {}
  scaling = tc.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise NotImplementedError(f"rope type {kind!r} is not supported (only default RoPE, as in LLaVA-1.5)")
  return float(params.get("rope_theta", tc.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
  """LlavaConfig from a transformers LLaVA config.json (defaults as transformers')."""
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


def check_hf_architecture(cfg: LlavaConfig) -> None:
  """Raises UserError for a model with parameters a transformers LLaVA does not have."""
  if cfg.image_coordinates:
    raise UserError("the model has image_coordinates=True (a learned image_coordinate_embedding that transformers' "
                    "LlavaForConditionalGeneration does not have), so it has no Hugging Face form; serve it "
                    "from its packed export (sab_jax.serve.packed)")


def config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
  """A transformers LLaVA config.json (llama text_config, clip_vision_model vision_config) for `cfg`.

  For checkpoints that come without one (e.g. a model shape from `llava.VARIANTS`);
  `config_from_hf(config_to_hf(cfg)) == cfg`. Weights are written in bfloat16, hence "dtype".
  Raises UserError for a model transformers cannot express (`check_hf_architecture`).
  """
  check_hf_architecture(cfg)
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


# --- key mapping ------------------------------------------------------------------
def _canonical(key: str) -> str:
  """Strips the layout-specific prefixes: one name per tensor whatever the exporter."""
  for old, new in (("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
                   ("language_model.lm_head.", "lm_head."), ("model.vision_tower.", "vision_tower."),
                   ("vision_tower.vision_model.", "vision_tower."), ("model.multi_modal_projector.",
                                                                     "multi_modal_projector.")):
    if key.startswith(old):
      key = new + key[len(old):]
  return key


@dataclasses.dataclass(frozen=True)
class _Transform:
  """One rule's array transform both ways: HF tensor -> our array (calling it, what the import
  applies) and our array -> HF tensor (`to_hf`, what the Hugging Face export applies)."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray, LlavaConfig], np.ndarray]

  def __call__(self, w: np.ndarray) -> np.ndarray:
    return self.to_ours(w)


def _patch_to_hf(w: np.ndarray, cfg: LlavaConfig) -> np.ndarray:
  p, c = cfg.vision.patch_size, cfg.vision.num_channels  # Dense [(p, p, C), D] -> Conv2d [D, C, p, p]
  return w.reshape(p, p, c, w.shape[-1]).transpose(3, 2, 0, 1)


_linear = _Transform(lambda w: w.T, lambda w, cfg: w.T)  # torch Linear [out, in] <-> Flax kernel [in, out]
_patch = _Transform(lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),  # Conv2d -> Dense on patches
                    _patch_to_hf)
_same = _Transform(lambda w: w, lambda w, cfg: w)

# (regex over canonical HF names) -> (our path template, transform). First match wins.
_RULES: list[tuple[str, str, _Transform]] = [
    (r"language_model\.embed_tokens\.weight", "language_model.embed_tokens.embedding", _same),
    (r"language_model\.norm\.weight", "language_model.norm.scale", _same),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"language_model.layers.\1.\2.scale", _same),
    (r"language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight", r"language_model.layers.\1.\2.\3.kernel",
     _linear),
    (r"language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", r"language_model.layers.\1.\2.\3.bias", _same),
    (r"lm_head\.weight", "lm_head.kernel", _linear),
    (r"vision_tower\.embeddings\.class_embedding", "vision_tower.class_embedding", _same),
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision_tower.patch_embedding.kernel", _patch),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower.position_embedding", _same),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.weight", r"vision_tower.\1.scale", _same),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.bias", r"vision_tower.\1.bias", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm\d)\.weight", r"vision_tower.layers.\1.\2.scale", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm\d)\.bias", r"vision_tower.layers.\1.\2.bias", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.weight", r"vision_tower.layers.\1.self_attn.\2.kernel",
     _linear),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.bias", r"vision_tower.layers.\1.self_attn.\2.bias",
     _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc\d)\.weight", r"vision_tower.layers.\1.\2.kernel", _linear),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc\d)\.bias", r"vision_tower.layers.\1.\2.bias", _same),
    (r"multi_modal_projector\.(linear_\d)\.weight", r"multi_modal_projector.\1.kernel", _linear),
    (r"multi_modal_projector\.(linear_\d)\.bias", r"multi_modal_projector.\1.bias", _same),
]


def map_key(hf_key: str) -> tuple[str, _Transform] | None:
  """Our dotted parameter path and the array transform for one HF tensor name (None: not ours)."""
  key = _canonical(hf_key)
  for pattern, target, fn in _RULES:
    if re.fullmatch(pattern, key):
      return re.sub(pattern, target, key), fn
  return None


# --- the inverse direction (Hugging Face export) -----------------------------------
def _inverted(pattern: str, target: str) -> tuple[re.Pattern, list[str]]:
  """A rule read backwards: a regex over our paths (the target with the pattern's groups put
  back) and the literal pieces of the canonical HF name between those groups."""
  groups = re.findall(r"\(([^()]*)\)", pattern)  # the rules' groups do not nest
  pieces = re.split(r"\\(\d)", target)           # literal, group number, literal, ...
  regex = "".join(re.escape(x) if i % 2 == 0 else f"(?P<g{x}>{groups[int(x) - 1]})" for i, x in enumerate(pieces))
  literals = [re.sub(r"\\(.)", r"\1", x) for x in re.split(r"\([^()]*\)", pattern)]
  return re.compile(regex), literals


_INVERTED = [_inverted(pattern, target) for pattern, target, _ in _RULES]  # derived from _RULES, not a second table
# Canonical prefix -> the layout transformers >= 4.52 names its modules with.
_NEW_LAYOUT = (("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower.vision_model."),
               ("multi_modal_projector.", "model.multi_modal_projector."))


def hf_key(path: str) -> str | None:
  """The HF tensor name of our dotted param path in the new layout (`model.language_model.*`,
  `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `lm_head.weight`);
  None for a param no HF tensor maps to. `map_key(hf_key(path))[0] == path`."""
  for regex, literals in _INVERTED:
    m = regex.fullmatch(path)
    if m:
      name = literals[0] + "".join(m.group(f"g{i}") + lit for i, lit in enumerate(literals[1:], 1))
      for old, new in _NEW_LAYOUT:
        if name.startswith(old):
          return new + name[len(old):]
      return name
  return None


def to_hf(hf_key: str, value: np.ndarray, cfg: LlavaConfig) -> np.ndarray:
  """The HF tensor `hf_key` from our value of the param `map_key(hf_key)` names (the import's
  transform inverted: kernels transposed back, the patch Dense back to a Conv2d kernel)."""
  mapped = map_key(hf_key)
  if mapped is None:
    raise KeyError(f"{hf_key} is not a tensor of a sab_jax LLaVA (map_key maps it to nothing)")
  return mapped[1].to_hf(value, cfg)


def hf_shape(hf_key: str, shape: tuple[int, ...], cfg: LlavaConfig) -> tuple[int, ...]:
  """The shape `to_hf` gives for a value of `shape` (computed on a view, nothing allocated)."""
  return tuple(to_hf(hf_key, np.broadcast_to(np.zeros((), np.uint8), shape), cfg).shape)


def hf_names(cfg: LlavaConfig) -> dict[str, str]:
  """{HF tensor name (new layout, `hf_key`): our dotted param path} for every param of `Llava(cfg)`.

  The names a checkpoint of `cfg` has when no source checkpoint gives them. Raises UserError
  for a model transformers cannot express (`check_hf_architecture`).
  """
  check_hf_architecture(cfg)
  _, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))))
  out = {}
  for p, _ in nnx.to_flat_state(state):
    path = _path_str(p)
    name = hf_key(path)
    if name is None:
      raise UserError(f"param {path!r} has no Hugging Face LLaVA tensor (sab_jax.models.hf._RULES maps none to it)")
    out[name] = path
  return out


def _path_str(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


# --- loading ----------------------------------------------------------------------
def read_config(path: str) -> LlavaConfig:
  """The model config of a local Hugging Face LLaVA checkpoint directory (its config.json)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: pass a local Hugging Face LLaVA checkpoint directory")
  with open(cfg_path) as f:
    return config_from_hf(json.load(f))


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    mesh: Mesh | None = None, rules=sharding_lib.DEFAULT_RULES, dense=None) -> Llava:
  """Loads a local Hugging Face LLaVA checkpoint directory into the Flax model.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    dtype: compute dtype; param_dtype: dtype the weights are stored in on device.
    mesh: if given, each tensor is placed straight onto its sharding; a device reads
      only its own slice from the memory-mapped file.
    rules: logical-axis rules for `mesh`.
    dense: optional Dense factory (the binarization seam).
  Returns:
    The `Llava` model holding the checkpoint's weights.
  Raises:
    ValueError: missing, unexpected or mis-shaped tensors, all listed at once.
  """
  cfg = read_config(path)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if dense is not None:
    kw["dense"] = dense
  abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), **kw))
  graphdef, abstract_state = nnx.split(abstract)
  expected = {_path_str(p): v for p, v in nnx.to_flat_state(abstract_state)}

  tensors = open_checkpoint(path)
  plan, unexpected, misshaped = {}, [], []
  for hf_key, st in tensors.items():
    mapped = map_key(hf_key)
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
    hf_key, st, fn = plan[_path_str(p)]
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
