"""experiments/configs/llava7b_pod.py run end to end: a Hugging Face LLaVA teacher, its own
tokenizer, VQAv2 built from the files users download, FSDP over 8 simulated devices.

The checkpoint is a tiny random LLaVA saved by transformers and VQAv2 a hand-made fixture
in the official layout; everything else is the pod config as shipped, sized by its
`runlocal` argument (only the method list narrowed here). The full-precision answers the
pipeline writes must be transformers' own greedy answers to the same prompts (LLaVA-1.5
template, left padding, image resizing).
"""

import json
import os
import re

import pytest

from data.vqa_fixture import make_vqav2
from integration.pod_fixture import REPO, check_hf_export, predictions, run_pipeline, vqav2_texts
from models.hf_fixture import LLAVA_PROMPT_WORDS, save_tiny_llava, save_word_tokenizer
from sab_jax import config_utils

CONFIG = os.path.join(REPO, "experiments", "configs", "llava7b_pod.py") + ":runlocal"
LOCAL = config_utils.load_config(CONFIG)  # the sizes the pipeline runs with


def _fixture(root):
  """VQAv2 files under root/manual and a tiny LLaVA (with a tokenizer covering them) in root/llava."""
  manual, ckpt = root / "manual", root / "llava"
  make_vqav2(manual)
  texts = list(LLAVA_PROMPT_WORDS) + vqav2_texts(manual)
  words = [w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)]  # the Whitespace pre-tokenizer's split
  ckpt.mkdir()
  vocab = save_word_tokenizer(ckpt, words)
  info = save_tiny_llava(str(ckpt), image_token_id=len(vocab))
  return manual, ckpt, info


def _run(root, *overrides, workdir="wd"):
  return run_pipeline(CONFIG, root, *overrides, workdir=workdir)


def _transformers_answers(model, info, ckpt, source):
  """transformers' greedy answers of `model`, one unpadded prompt at a time."""
  import torch
  from sab_jax.data import pipeline, tokenizer as tok_lib

  tok = tok_lib.HFTokenizer(ckpt)
  pre = pipeline.Preprocess(tok, num_image_tokens=info["num_image_tokens"], image_mean=pipeline.CLIP_MEAN,
                            image_std=pipeline.CLIP_STD, max_prompt_len=LOCAL.data.max_prompt_len,
                            max_answer_len=LOCAL.data.max_answer_len,
                            image_size=info["image_size"])
  answers = []
  for i in range(len(source)):
    record = source[i]
    ids = tok_lib.prompt_ids(tok, pipeline._text(record["question"]), info["num_image_tokens"])
    pixels = pre.pixels(record["image"])[None].transpose(0, 3, 1, 2)
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pixels),
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                                   max_new_tokens=LOCAL.data.max_answer_len, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id)
    answers.append(tok.decode(out[0, len(ids):].tolist()))
  return answers


@pytest.mark.slow
def test_pod_config_runs_end_to_end_from_a_hf_checkpoint(tmp_path):
  manual, ckpt, info = _fixture(tmp_path)
  proc = _run(tmp_path, f"--config.teacher.init={ckpt}", f"--config.data.manual_dir={manual}",
              "--config.quant.methods=('sab',)")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["dataset"] == "vqav2/res336" and results["split"] == "validation"
  assert results["calibration"]["split"] == "vqav2/res336:train"
  expected = {"methods": {"fp", "sab", "sab_kd"}, "variants": {"sab_structured", "arb_rc_structured"}}
  for bucket, names in expected.items():
    assert set(results[bucket]) == names
    for name in names:
      entry = results[bucket][name]
      assert entry["count"] == 2 and set(entry["per_type"]) == {"yes/no", "other"}, entry
      assert 0 <= entry["accuracy"] <= 1
      if name != "fp":  # from the export's bytes; the int8 embedding and head make the model smaller
        export_dir = tmp_path / "wd" / entry["export_dir"]
        manifest = json.loads((export_dir / "manifest.json").read_text())
        assert manifest["int8_params"] and 1 < entry["bits_per_weight"] < 16
  assert results["methods"]["fp"]["bits_per_weight"] == 16.0  # teacher.param_dtype bfloat16
  assert results["methods"]["sab_kd"]["distilled_from"] == "sab"

  # The pipeline's full-precision answers are transformers' greedy answers.
  from sab_jax.data import datasets, vqav2
  source = datasets.load("vqav2", "res336", str(tmp_path / "tfds")).as_data_source()["validation"]
  rows = predictions(tmp_path / "wd", "fp")
  assert [r["answer"] for r in rows] == [vqav2.to_python(source[i])["answer"] for i in range(len(source))]
  reference = _transformers_answers(info["model"], info, ckpt, source)
  assert [r["prediction"] for r in rows] == reference
  assert any(reference)  # the random model says something, so the comparison is not empty == empty

  # The distilled binarized model as a Hugging Face checkpoint answers as the packed export did.
  check_hf_export(tmp_path, results, "LlavaForConditionalGeneration",
                  lambda model: _transformers_answers(model, info, ckpt, source))


@pytest.mark.slow  # the config itself loads in the fast tier: test_config_utils.py, test_multiprocess.py
def test_pod_config_input_errors_name_the_fix(tmp_path):
  manual, ckpt, _ = _fixture(tmp_path)
  proc = _run(tmp_path)
  assert proc.returncode != 0 and "config.teacher.init is not set" in proc.stderr
  # VQAv2 not built and no manual_dir: the error names the build command.
  proc = _run(tmp_path, f"--config.teacher.init={ckpt}")
  assert proc.returncode != 0
  assert "vqav2/res336 is not built" in proc.stderr and "python -m sab_jax.data.vqav2 --manual_dir" in proc.stderr
  # A checkpoint directory without tokenizer.json.
  os.remove(ckpt / "tokenizer.json")
  proc = _run(tmp_path, f"--config.teacher.init={ckpt}", f"--config.data.manual_dir={manual}")
  assert proc.returncode != 0 and "tokenizer.json not found" in proc.stderr
  assert not (tmp_path / "wd" / "results.json").exists()
