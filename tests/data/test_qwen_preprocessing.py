"""Qwen2.5-VL's image preprocessing and prompt equal transformers' (its Pillow backend, its chat template)."""

import json

import numpy as np
import pytest

from sab_jax.data import images
from sab_jax.data import tokenizer as tok_lib
from sab_jax.errors import UserError
from models.qwen_tokenizer_fixture import save_qwen_tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2.5-VL-Instruct's preprocessor_config.json, with a small pixel budget: test images stay tiny.
QWEN_JSON = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 12, "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": list(images.OPENAI_CLIP_MEAN), "image_std": list(images.OPENAI_CLIP_STD),
             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def _reference(config):
  """transformers' Pillow backend (what Qwen2VLImageProcessor is without torchvision), same dict."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  kw = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
  return Qwen2VLImageProcessorPil(**kw)


def _image(h, w, seed=0):
  return np.random.default_rng(seed + 7 * h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(tmp_path, config):
  (tmp_path / images.PREPROCESSOR_CONFIG).write_text(json.dumps(config))
  return str(tmp_path)


def _assert_same(ours, ref):
  (pixels, grid), (ref_pixels, ref_grid) = ours, (ref["pixel_values"], ref["image_grid_thw"])
  assert pixels.dtype == np.float32 and grid.dtype == np.int64
  assert pixels.shape == ref_pixels.shape and np.array_equal(grid, ref_grid)
  assert np.abs(pixels - ref_pixels).max() <= 1e-6


@pytest.mark.parametrize("shape", [(45, 70),  # rounds to multiples of 28 (70 / 28 = 2.5 rounds to even: 56)
                                   (20, 33),  # below min_pixels: scaled up
                                   (200, 90),  # above max_pixels: scaled down
                                   (56, 112)])  # already a multiple: resized to itself
def test_qwen_image_processor_matches_transformers(tmp_path, shape):
  """Resize, normalization and transformers' patch order, on non-square images of every smart_resize case."""
  ours = images.QwenImageProcessor.from_file(_write(tmp_path, QWEN_JSON))
  image = _image(*shape)
  _assert_same(ours(image), _reference(QWEN_JSON)(image, return_tensors="np"))


def test_qwen_image_processor_list_and_other_config(tmp_path):
  """Images of different sizes in one call (patches concatenated), and a config written with `size`,
  another patch grid (Qwen3-VL's 16 / merge 2), bilinear resampling and no rescale."""
  config = {"image_processor_type": "Qwen2VLImageProcessorFast", "size": {"shortest_edge": 32 * 32 * 3,
            "longest_edge": 32 * 32 * 10}, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "do_rescale": False}
  batch = [_image(40, 90), _image(120, 77, 1), _image(64, 64, 2)]
  ref_config = dict(config, image_processor_type="x")
  ours = images.processor_for(_write(tmp_path, config))
  assert isinstance(ours, images.QwenImageProcessor)
  pixels, grid = ours(batch)
  _assert_same((pixels, grid), _reference(ref_config)(batch, return_tensors="np"))
  assert pixels.shape[1] == 3 * 2 * 16 * 16 and grid[:, 0].tolist() == [1, 1, 1]
  assert ours.num_tokens(grid) == [int(t * h * w) // 4 for t, h, w in grid]
  _assert_same(images.QwenImageProcessor.from_file(_write(tmp_path, QWEN_JSON))(batch),
               _reference(QWEN_JSON)(batch, return_tensors="np"))


def test_qwen_pixel_range_fields(tmp_path):
  """Top-level min_pixels / max_pixels win over `size`, as in transformers; defaults are transformers'."""
  p = images.QwenImageProcessor.from_file(_write(tmp_path, dict(QWEN_JSON, size={"shortest_edge": 1,
                                                                                 "longest_edge": 2})))
  assert (p.min_pixels, p.max_pixels) == (QWEN_JSON["min_pixels"], QWEN_JSON["max_pixels"])
  d = images.QwenImageProcessor.from_file(_write(tmp_path, {"image_processor_type": "Qwen2VLImageProcessor"}))
  ref = _reference({})
  assert (d.min_pixels, d.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
  assert (d.patch_size, d.temporal_patch_size, d.merge_size) == (14, 2, 2)


def test_smart_resize_matches_transformers():
  """Rounding (halves to even), scaling down and up, edge cases."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  rng = np.random.default_rng(0)
  sizes = [(1, 1), (14, 42), (42, 14), (1000, 7), (2000, 3000), (3000, 20)] + [
      tuple(int(v) for v in rng.integers(5, 4000, 2)) for _ in range(300)]
  for h, w in sizes:
    for factor, low, high in ((28, 56 * 56, 28 * 28 * 1280), (28, 3136, 12845056), (32, 1024, 32 * 32 * 64)):
      assert images.smart_resize(h, w, factor, low, high) == smart_resize(h, w, factor, low, high), (h, w, factor)
  with pytest.raises(UserError, match="aspect ratio"):
    images.smart_resize(10, 2001)


def test_processor_for_dispatch_and_refusals(tmp_path):
  """CLIP still reads as before; unknown types and missing files are refused with the file named."""
  clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
          "crop_size": {"height": 32, "width": 32}}
  assert isinstance(images.processor_for(_write(tmp_path, clip)), images.ClipImageProcessor)
  assert isinstance(images.processor_for(_write(tmp_path, {"size": 32, "crop_size": 32})), images.ClipImageProcessor)
  assert isinstance(images.processor_for(_write(tmp_path, QWEN_JSON)), images.QwenImageProcessor)
  with pytest.raises(UserError, match="image_processor_type 'CLIPImageProcessor' is not supported"):
    images.QwenImageProcessor.from_file(_write(tmp_path, clip))
  with pytest.raises(UserError, match="'Qwen2VLImageProcessor' is not supported.*Qwen2VLImageProcessor"):
    images.ClipImageProcessor.from_file(_write(tmp_path, QWEN_JSON))
  bad = _write(tmp_path, {"image_processor_type": "SiglipImageProcessor"})
  for read in (images.processor_for, images.QwenImageProcessor.from_file):
    with pytest.raises(UserError, match=r"preprocessor_config\.json: image_processor_type 'SiglipImageProcessor' "
                                        r"is not supported; sab_jax implements CLIPImageProcessor.*Qwen2VL"):
      read(bad)
  with pytest.raises(UserError, match="patch_size"):
    images.QwenImageProcessor.from_file(_write(tmp_path, dict(QWEN_JSON, patch_size=0)))
  missing = tmp_path / "nowhere"
  missing.mkdir()
  for read in (images.processor_for, images.QwenImageProcessor.from_file):
    with pytest.raises(UserError, match=r"nowhere/preprocessor_config\.json cannot be read"):
      read(str(missing))


# --- the prompt ------------------------------------------------------------------------------

QUESTIONS = ["what color is the circle?", "how many squares are there?"]


def _qwen_tokenizers(tmp_path):
  words = [w for q in QUESTIONS for w in q.replace("?", " ").split()]
  ids = save_qwen_tokenizer(tmp_path, words)
  return ids, tok_lib.HFTokenizer(tmp_path, image_token="<|image_pad|>"), transformers.AutoTokenizer.from_pretrained(
      str(tmp_path))


def _reference_ids(hf, ids, text, n):
  """transformers' chat template rendered, tokenized, its one <|image_pad|> expanded to n (Qwen's processor)."""
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert rendered.count("<|image_pad|>") == 1
  out = hf(rendered.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
  assert out.count(ids["<|image_pad|>"]) == n and ids["[UNK]"] not in out
  return out


def test_qwen_tokenizer_specials(tmp_path):
  """No bos (bos_token null, no add_bos_token), eos <|im_end|>, pad <|endoftext|>, as transformers reads them."""
  ids, tok, hf = _qwen_tokenizers(tmp_path)
  assert tok.bos_id is None and not tok.add_bos and hf.bos_token_id is None
  assert tok.eos_id == ids["<|im_end|>"] == hf.eos_token_id and tok.pad_id == ids["<|endoftext|>"] == hf.pad_token_id
  assert tok.image_token_id == ids["<|image_pad|>"] and tok.vocab_size == len(ids) == len(hf) < 160
  # A '<s>' in the vocabulary must not become the bos when the config says null.
  (tmp_path / "s").mkdir()
  assert "<s>" in save_qwen_tokenizer(tmp_path / "s", ["<s>"])
  assert tok_lib.HFTokenizer(tmp_path / "s", image_token="<|image_pad|>").bos_id is None
  answer = tok.encode("circle") + [tok.eos_id] + tok.encode("squares")
  assert tok.decode(answer) == "circle"


@pytest.mark.parametrize("name,suffix", [("QWEN_VQA_PROMPT", "\nAnswer the question using a single word or phrase."),
                                         ("QWEN_CHAT_PROMPT", "")])
def test_qwen_prompt_matches_chat_template(tmp_path, name, suffix):
  """prompt_ids with Qwen's template is transformers' apply_chat_template + tokenizer, image pad expanded."""
  ids, tok, hf = _qwen_tokenizers(tmp_path)
  template = getattr(tok_lib, name)
  for q in QUESTIONS:
    for n in (1, 6):
      ours = tok_lib.prompt_ids(tok, q, n, template)
      assert ours == _reference_ids(hf, ids, q + suffix, n), (name, q, n)
  # The same with the text round-tripped: the template is exactly the rendered string.
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q" + suffix}]}]
  assert template.format(question="Q") == hf.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)


def test_processor_for_checks_the_model(tmp_path):
  """With the model's config: no file gives None (the caller's square), a processor that does not
  fit the vision tower is refused (sab_jax.ask passes model.cfg)."""
  from types import SimpleNamespace as NS
  llava = NS(vision=NS(image_size=32, patch_size=8))
  qwen = NS(vision=NS(image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
  assert images.processor_for(str(tmp_path), llava) is None and images.processor_for(str(tmp_path), qwen) is None
  clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
          "crop_size": {"height": 32, "width": 32}}
  assert isinstance(images.processor_for(_write(tmp_path, clip), llava), images.ClipImageProcessor)
  with pytest.raises(UserError, match=r"crops to \(32, 32\), the vision tower takes 48x48"):
    images.processor_for(str(tmp_path), NS(vision=NS(image_size=48, patch_size=8)))
  with pytest.raises(UserError, match="CLIP's processor, but the model's vision tower is Qwen2-VL's"):
    images.processor_for(str(tmp_path), qwen)
  assert isinstance(images.processor_for(_write(tmp_path, QWEN_JSON), qwen), images.QwenImageProcessor)
  with pytest.raises(UserError, match="fixed-size images"):
    images.processor_for(str(tmp_path), llava)
  with pytest.raises(UserError, match=r"= \(14, 2, 2\), but the vision tower's are \(16, 2, 2\)"):
    images.processor_for(str(tmp_path), NS(vision=NS(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)))
