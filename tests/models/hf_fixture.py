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
