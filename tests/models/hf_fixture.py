"""A tiny random LLaVA saved by transformers: the reference for import parity."""

from __future__ import annotations

import numpy as np


LLAVA_PROMPT_WORDS = tuple('USER : Answer the question using a single word or phrase . ASSISTANT'.split())


def save_word_tokenizer(directory, words, *, with_config: bool = True) -> dict[str, int]:
  """A WordLevel tokenizer.json (+ LLaVA-style tokenizer_config.json) over `words`.

  As in real checkpoints the specials are added tokens and `<image>` is appended last,
  so its id is len(returned vocab).
  """
  import json
  import os

  import tokenizers
  from tokenizers import models, pre_tokenizers

  specials = ['<unk>', '<s>', '</s>', '<pad>']
  vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(words)))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials + ['<image>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  if with_config:
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': {'content': '<unk>'},
                 'add_bos_token': True}, f)
  return vocab


def save_tiny_llava(path: str, *, num_kv_heads: int = 2, tie: bool = False, strategy: str = "default",
                    feature_layer=-2, image_size: int = 32, patch_size: int = 8, seed: int = 0,
                    max_shard_size: str | None = None, image_token_id: int = 90) -> dict:
  """Saves a random `LlavaForConditionalGeneration` to `path`; returns its sizes."""
  import torch
  import transformers

  torch.manual_seed(seed)
  text = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=num_kv_heads,
                                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                  rope_theta=500.0)
  vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                                         projection_dim=16)
  cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                 vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                                 tie_word_embeddings=tie)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # random init leaves norms at 1/0: perturb every tensor so all of them matter
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kw)
  n_img = (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)
  return {"model": model, "num_image_tokens": n_img, "image_token_id": image_token_id, "vocab": 96, "image_size": image_size}


def random_inputs(info: dict, batch: int = 2, text_len: int = 7, seed: int = 0):
  """input_ids with one image's placeholders after a BOS, and NHWC pixel values."""
  rng = np.random.default_rng(seed)
  text = rng.integers(4, info["image_token_id"], size=(batch, text_len))
  ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, info["num_image_tokens"]),
                                                                 info["image_token_id"]), text], axis=1)
  pixels = rng.normal(size=(batch, info["image_size"], info["image_size"], 3)).astype(np.float32)
  return ids, pixels


def reference_logits(info: dict, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = info["model"](input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  return out.logits.float().numpy()


# --- Qwen2.5-VL ---------------------------------------------------------------------------
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 100, 101, 102, 103  # inside the vocab of 128
QWEN_PAD = 0


def save_tiny_qwen25vl(path: str, *, tie: bool = False, mrope_section=(2, 3, 3), window_size: int = 16,
                       fullatt_block_indexes=(1,), num_kv_heads: int = 2, depth: int = 3, patch_size: int = 4,
                       seed: int = 0, max_shard_size: str | None = None, vocab_size: int = 128,
                       image_token_id: int = QWEN_IMAGE, vision_start_token_id: int = QWEN_VISION_START,
                       vision_end_token_id: int = QWEN_VISION_END, video_token_id: int = QWEN_VIDEO,
                       eos_token_id: int = 2, pad_token_id: int = QWEN_PAD) -> dict:
  """Saves a random `Qwen2_5_VLForConditionalGeneration` to `path`; returns its sizes and the model.

  Text head_dim 16 (mrope_section sums to 8), vision head_dim 16, merge 2, temporal patch 2;
  with patch 4 a window of 16 pixels is 2x2 merged tokens.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  vision = dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=patch_size,
                spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                fullatt_block_indexes=list(fullatt_block_indexes), out_hidden_size=64, tokens_per_second=2)
  text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=num_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
              rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section), "rope_theta": 5000.0})
  cfg = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                      video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                                      vision_end_token_id=vision_end_token_id, tie_word_embeddings=tie)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # random init leaves norms at 1/0: perturb every tensor so all of them matter
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kw)
  return {"model": model, "image_token_id": image_token_id, "vision_start_token_id": vision_start_token_id,
          "vision_end_token_id": vision_end_token_id, "vocab": vocab_size, "patch_size": patch_size, "merge_size": 2,
          "temporal_patch_size": 2, "pad_id": pad_token_id, "text_ids": (4, min(QWEN_IMAGE, vocab_size))}


def qwen_pixel_values(info: dict, images) -> tuple[np.ndarray, np.ndarray]:
  """transformers' processor layout of NHWC float images (already normalised, sizes multiples of
  patch * merge): (`pixel_values` [num_patches, C*T*P*P], `image_grid_thw` [num_images, 3]),
  made by transformers' own image processor with resizing and normalisation off."""
  from transformers import Qwen2VLImageProcessorPil

  proc = Qwen2VLImageProcessorPil(patch_size=info["patch_size"], temporal_patch_size=info["temporal_patch_size"],
                                  merge_size=info["merge_size"])
  out = proc(images=[np.asarray(im, np.float32).transpose(2, 0, 1) for im in images], do_resize=False,
             do_rescale=False, do_normalize=False, return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def qwen_prompts(info: dict, rows, grids, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded `input_ids` and `attention_mask` as transformers' processor lays them out.

  `rows`: per row a list of items, an int (that many random text tokens, ids in `info["text_ids"]`)
  or "image" (the next grid of `grids`: vision_start, (h/m)*(w/m) image tokens, vision_end).
  """
  rng = np.random.default_rng(seed)
  grids = iter(grids)
  seqs = []
  for row in rows:
    seq = []
    for item in row:
      if item == "image":
        t, h, w = (int(x) for x in next(grids))
        n = t * (h // info["merge_size"]) * (w // info["merge_size"])
        seq += [info["vision_start_token_id"]] + [info["image_token_id"]] * n + [info["vision_end_token_id"]]
      else:
        seq += list(rng.integers(*info["text_ids"], size=item))
    seqs.append(seq)
  width = max(len(s) for s in seqs)
  ids = np.full((len(seqs), width), info["pad_id"], np.int64)
  mask = np.zeros((len(seqs), width), np.int64)
  for b, s in enumerate(seqs):
    ids[b, width - len(s):] = s
    mask[b, width - len(s):] = 1
  return ids, mask


def _qwen_torch_inputs(info: dict, ids, mask, pixel_values, grid) -> dict:
  import torch
  kw = {"input_ids": torch.from_numpy(np.asarray(ids, np.int64)),
        "attention_mask": torch.from_numpy(np.asarray(mask, np.int64)),
        # transformers >= 5 builds mrope positions only with the processor's token types (1 = image).
        "mm_token_type_ids": torch.from_numpy((np.asarray(ids) == info["image_token_id"]).astype(np.int64))}
  if pixel_values is not None:
    kw["pixel_values"] = torch.from_numpy(np.asarray(pixel_values, np.float32))
    kw["image_grid_thw"] = torch.from_numpy(np.asarray(grid, np.int64))
  return kw


def qwen_reference_logits(info: dict, ids, mask, pixel_values, grid) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = info["model"](**_qwen_torch_inputs(info, ids, mask, pixel_values, grid))
  return out.logits.float().numpy()


def qwen_rope_index(info: dict, ids, mask, grid) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `get_rope_index`: (position ids [3, B, T], rope deltas [B, 1])."""
  import torch
  kw = _qwen_torch_inputs(info, ids, mask, None, None)
  with torch.no_grad():
    pos, delta = info["model"].model.get_rope_index(
        kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], attention_mask=kw["attention_mask"],
        image_grid_thw=torch.from_numpy(np.asarray(grid, np.int64)))
  return pos.numpy(), delta.numpy()


def qwen_reference_generate(info: dict, ids, mask, pixel_values, grid, max_new_tokens: int) -> np.ndarray:
  """transformers' greedy `generate`: the new tokens `[B, max_new_tokens]`."""
  import torch
  with torch.no_grad():
    out = info["model"].generate(**_qwen_torch_inputs(info, ids, mask, pixel_values, grid), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
  return out[:, ids.shape[1]:].numpy()
