"""experiments/configs/qwen25vl7b_pod.py run end to end: a Hugging Face Qwen2.5-VL teacher (the
paper's family), its own tokenizer and chat template, VQAv2 built from the files users download,
FSDP over 8 simulated devices.

The checkpoint is a tiny random Qwen2.5-VL saved by transformers (its vision tower and merger
binarized too, through the layer rules, besides the decoder) and VQAv2 the hand-made fixture.
The full-precision answers the pipeline writes must be transformers' greedy answers to the same
prompts (Qwen's template, 3D mrope positions, the pipeline's square images in transformers'
patch layout), and the distilled binarized model, exported to a Hugging Face checkpoint, must
answer in transformers as the pipeline's packed export did.
"""

import json
import os
import re

import numpy as np
import pytest

from data.vqa_fixture import make_vqav2
from integration.pod_fixture import REPO, check_hf_export, predictions, run_pipeline, vqav2_texts
from models.hf_fixture import qwen_pixel_values, save_tiny_qwen25vl
from models.qwen_tokenizer_fixture import save_qwen_tokenizer
from sab_jax import config_utils

CONFIG = os.path.join(REPO, "experiments", "configs", "qwen25vl7b_pod.py") + ":runlocal"
LOCAL = config_utils.load_config(CONFIG)  # the sizes the pipeline runs with
# The decoder (the papers' setting) and the vision tower and merger too.
RULES = ("--config.quant.rules=((r'language_model\\.layers\\..*', True), (r'vision_tower\\.blocks\\..*', True), "
         "(r'multi_modal_projector\\..*', True), (r'.*', False))")


def _fixture(root):
  """VQAv2 files under root/manual and a tiny Qwen2.5-VL (tokenizer covering them) in root/qwen."""
  manual, ckpt = root / "manual", root / "qwen"
  make_vqav2(manual)
  words = [w for t in vqav2_texts(manual) for w in re.findall(r"\w+", t)]
  ckpt.mkdir()
  ids = save_qwen_tokenizer(ckpt, words)
  info = save_tiny_qwen25vl(str(ckpt), vocab_size=max(ids.values()) + 1, image_token_id=ids["<|image_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                            patch_size=14, window_size=28)  # 56-pixel images: 2 x 2 merged tokens, 1 x 1 windows
  return manual, ckpt, info


def _transformers_answers(model, info, ckpt, source):
  """transformers' greedy answers of `model`, one unpadded prompt at a time (the pipeline's square
  image in transformers' patch layout, made by transformers' own image processor)."""
  import torch
  from sab_jax.data import pipeline, tokenizer as tok_lib

  tok = tok_lib.HFTokenizer(ckpt, image_token="<|image_pad|>")
  size = LOCAL.data.image_size
  n_img = (size // (info["patch_size"] * info["merge_size"])) ** 2
  answers = []
  for i in range(len(source)):
    record = source[i]
    ids = tok_lib.prompt_ids(tok, pipeline._text(record["question"]), n_img, tok_lib.QWEN_VQA_PROMPT)
    pixels = pipeline.to_pixels(record["image"], image_size=size, mean=pipeline.CLIP_MEAN, std=pipeline.CLIP_STD)
    patches, grid = qwen_pixel_values(info, [pixels])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
      out = model.generate(input_ids=input_ids, pixel_values=torch.from_numpy(patches),
                           image_grid_thw=torch.from_numpy(grid), attention_mask=torch.ones_like(input_ids),
                           mm_token_type_ids=(input_ids == info["image_token_id"]).long(),  # 3D positions
                           do_sample=False, max_new_tokens=LOCAL.data.max_answer_len, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
    answers.append(tok.decode(out[0, len(ids):].tolist()))
  return answers


def _uint8(image):
  """A record's image as `ask` reads one (uint8 RGB)."""
  import io
  from PIL import Image
  return np.asarray(Image.open(io.BytesIO(image)).convert("RGB")) if isinstance(image, bytes) else np.asarray(image)


@pytest.mark.slow
def test_qwen_pod_config_runs_end_to_end_from_a_hf_checkpoint(tmp_path):
  manual, ckpt, info = _fixture(tmp_path)
  # sab only: the structured layouts are model-agnostic (the LLaVA pod test and the smoke run serve them)
  proc = run_pipeline(CONFIG, tmp_path, f"--config.teacher.init={ckpt}", f"--config.data.manual_dir={manual}",
              "--config.quant.methods=('sab',)", RULES, "--config.quant.variants={}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["dataset"] == "vqav2/res336" and results["split"] == "validation"
  assert results["calibration"]["image_tokens"] > 0 and results["calibration"]["text_tokens"] > 0
  expected = {"methods": {"fp", "sab", "sab_kd"}}
  for bucket, names in expected.items():
    assert set(results[bucket]) == names
    for name in names:
      entry = results[bucket][name]
      assert entry["count"] == 2 and 0 <= entry["accuracy"] <= 1, entry
      if name != "fp":
        manifest = json.loads((tmp_path / "wd" / entry["export_dir"] / "manifest.json").read_text())
        paths = {l["path"] for l in manifest["layers"]}
        # every rule took: decoder, vision blocks (qkv, proj, gated MLP) and the merger
        assert any(p.startswith("language_model.layers.") for p in paths)
        assert any(p.startswith("vision_tower.blocks.") and p.endswith("attn.qkv") for p in paths)
        assert {"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"} <= paths
        assert manifest["model_config"]["family"] == "qwen2_5_vl"
        assert {"int8_params.language_model.embed_tokens.embedding", "int8_params.lm_head.kernel"} <= set(
            manifest["checksums"])  # both through the config's one regex (a tied 3B has no lm_head)
        assert manifest["model_config"]["vision"]["image_size"] == LOCAL.data.image_size
  assert results["methods"]["sab_kd"]["distilled_from"] == "sab"

  # The pipeline's full-precision answers are transformers' greedy answers.
  from sab_jax.data import datasets
  source = datasets.load("vqav2", "res336", str(tmp_path / "tfds")).as_data_source()["validation"]
  rows = predictions(tmp_path / "wd", "fp")
  reference = _transformers_answers(info["model"], info, ckpt, source)
  assert [r["prediction"] for r in rows] == reference
  assert any(reference)  # the random model says something, so the comparison is not empty == empty

  # The distilled binarized model as a Hugging Face checkpoint answers as the packed export did.
  check_hf_export(tmp_path, results, "Qwen2_5_VLForConditionalGeneration",
                  lambda model: _transformers_answers(model, info, ckpt, source))
  kd = predictions(tmp_path / "wd", "sab_kd")

  # ...and `ask` answers from the packed export as the pipeline's evaluation did.
  from sab_jax import ask
  from sab_jax.data import pipeline
  asker = ask.load(str(tmp_path / "wd" / results["methods"]["sab_kd"]["export_dir"]))
  for i, row in enumerate(kd):
    assert asker.answer([_uint8(source[i]["image"])], [pipeline._text(source[i]["question"])]) == [row["prediction"]]
