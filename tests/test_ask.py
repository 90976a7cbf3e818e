"""`python -m sab_jax.ask`: every kind of model answers as it was evaluated.

The shipped teacher and a packed export of it answer rendered synthetic questions exactly as
`eval.vqa.evaluate` does on the same records through the pipeline; a tiny Hugging Face LLaVA
answers as transformers' greedy `generate` with its own image processor; JSONL in, JSONL out;
bad input ends with one `error:` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from models.hf_fixture import LLAVA_PROMPT_WORDS, save_tiny_llava, save_word_tokenizer
from sab_jax import ask, config_utils, sharding
from sab_jax.calib import calibrate
from sab_jax.data import images, pipeline, synthetic_vqa
from sab_jax.data import tokenizer as tokenizer_lib
from sab_jax.eval import vqa
from sab_jax.export import writer
from sab_jax.models import llava
from sab_jax.quant import providers
from sab_jax.serve import packed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(REPO, "experiments", "teacher", "demo")
DEMO = config_utils.load_config("demo")
N_QUESTIONS = 12


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
  """The test split's first questions, their images saved as PNG files: (directory, records)."""
  d = tmp_path_factory.mktemp("scenes")
  records = list(synthetic_vqa.generate_split("test", N_QUESTIONS))
  for i, r in enumerate(records):
    Image.fromarray(r["image"]).save(d / f"{i}.png")
  return d, records


@pytest.fixture(scope="module")
def teacher():
  return ask.load(TEACHER)


def _pipeline_answers(model, records, max_new_tokens):
  """What the evaluation pipeline answers on `records` (stages.evaluate's batches and decoding)."""
  dc = DEMO.data
  batches = pipeline.make_dataset(
      records, tokenizer_lib.WordTokenizer.for_synthetic_vqa(), num_image_tokens=model.cfg.num_image_tokens,
      image_mean=pipeline.CLIP_MEAN, image_std=pipeline.CLIP_STD, batch_size=5, max_prompt_len=dc.max_prompt_len,
      max_answer_len=dc.max_answer_len, shuffle=False, num_epochs=1, drop_remainder=False,
      image_size=model.cfg.vision.image_size, shard_index=0, shard_count=1)
  preds = []
  vqa.evaluate(model, batches, tokenizer_lib.WordTokenizer.for_synthetic_vqa(),
               question_types=synthetic_vqa.QUESTION_TYPES, max_new_tokens=max_new_tokens, predictions=preds,
               answer_losses=False)
  return [p for _, p, _ in preds]


def _ask_all(asker, scenes, **kw):
  d, records = scenes
  imgs = [ask.read_image(str(d / f"{i}.png")) for i in range(len(records))]
  return asker.answer(imgs, [r["question"] for r in records], **kw)


def test_teacher_answers_as_the_evaluation_pipeline(teacher, scenes):
  _, records = scenes
  assert teacher.kind == "teacher" and teacher.max_new_tokens == ask.DEFAULT_MAX_NEW_TOKENS
  budget = DEMO.data.max_answer_len
  assert _ask_all(teacher, scenes, max_new_tokens=budget) == _pipeline_answers(teacher.model, records, budget)
  answers = _ask_all(teacher, scenes)  # the default budget: the answer stops at eos all the same
  truth = [r["answer"] for r in records]
  easy = [i for i, r in enumerate(records) if r["question_type"] in ("attribute", "exist", "count")]
  assert len(easy) >= 4 and [answers[i] for i in easy] == [truth[i] for i in easy]
  assert np.mean([a == t for a, t in zip(answers, truth)]) >= 0.75


@pytest.fixture(scope="module")
def export_dir(teacher, scenes, tmp_path_factory):
  """The teacher's decoder binarized with XNOR, exported with the demo pipeline config."""
  _, records = scenes
  model = nnx.clone(teacher.model)
  calib = list(pipeline.make_dataset(
      records[:8], teacher.tokenizer, num_image_tokens=model.cfg.num_image_tokens, image_mean=pipeline.CLIP_MEAN,
      image_std=pipeline.CLIP_STD, batch_size=8, max_prompt_len=DEMO.data.max_prompt_len,
      max_answer_len=DEMO.data.max_answer_len, shuffle=False, num_epochs=1, image_size=64, shard_index=0,
      shard_count=1))
  provider = providers.Xnor()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])  # where the loaded teacher lives
  layers = calibrate.binarize_model(model, calib, provider, DEMO.quant.rules, mesh, progress=False)
  directory = str(tmp_path_factory.mktemp("exports") / "xnor")
  writer.export(model, layers, "xnor", provider, directory, config=DEMO)
  return directory


def test_packed_export_answers_as_the_pipeline_evaluates_it(export_dir, scenes):
  _, records = scenes
  asker = ask.load(export_dir)
  assert asker.kind == "export" and asker.max_new_tokens == DEMO.data.max_answer_len
  assert any(isinstance(m, packed.PackedDense) for _, m in nnx.iter_graph(asker.model))
  template = nnx.eval_shape(lambda: llava.Llava(llava.config_from_dict(DEMO.model.to_dict()), rngs=nnx.Rngs(0)))
  served, _ = packed.from_export(export_dir, template)
  assert _ask_all(asker, scenes) == _pipeline_answers(served, records, DEMO.data.max_answer_len)


def test_jsonl_in_order_with_ids(scenes, tmp_path, teacher):
  d, records = scenes
  questions = d / "questions.jsonl"
  lines = [json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": r["question"]}) for i, r in enumerate(records)]
  questions.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")  # a blank line is skipped
  out = tmp_path / "answers.jsonl"
  assert ask.main([f"--model={TEACHER}", f"--questions={questions}", f"--out={out}", "--batch_size=5"]) == 0
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert [g["id"] for g in got] == [f"q{i}" for i in range(len(records))]
  assert [g["answer"] for g in got] == _ask_all(teacher, scenes)
  assert all(g["image"] == f"{i}.png" and g["question"] == r["question"] for i, (g, r) in enumerate(zip(got, records)))


def _error(capsys, *argv):
  """ask.main's exit status 1 and its one `error:` line, last on stderr (after a progress bar, if any)."""
  assert ask.main(list(argv)) == 1
  out, err = capsys.readouterr()
  last = err.rstrip("\n").split("\n")[-1]
  assert out == "" and err.endswith("\n") and last.startswith("error: ") and err.count("error:") == 1, err
  return last


def test_bad_input_is_one_error_line(scenes, tmp_path, capsys, export_dir):
  d, _ = scenes
  model = f"--model={TEACHER}"
  assert "expected manifest.json" in _error(capsys, f"--model={tmp_path}", f"--image={d / '0.png'}", "--question=x")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"image": "0.png", "question": "x"}) + "\n{not json\n")
  shutil.copy(d / "0.png", tmp_path / "0.png")
  assert f"{bad}:2: not a JSON object" in _error(capsys, model, f"--questions={bad}")
  bad.write_text(json.dumps({"image": "missing.png", "question": "x"}) + "\n")
  assert f"{bad}:1: image {tmp_path / 'missing.png'} not found" in _error(capsys, model, f"--questions={bad}")
  (tmp_path / "broken.png").write_bytes((d / "0.png").read_bytes()[:60])
  bad.write_text(json.dumps({"image": "0.png", "question": "x"}) + "\n"
                 + json.dumps({"image": "broken.png", "question": "x"}) + "\n")
  out = tmp_path / "answers.jsonl"
  assert f"{bad}:2: image" in _error(capsys, model, f"--questions={bad}", f"--out={out}", "--batch_size=1")
  assert not os.path.exists(out) and not os.path.exists(f"{out}.tmp")  # no half-written answers
  damaged = tmp_path / "damaged"
  shutil.copytree(export_dir, damaged)
  shutil.rmtree(damaged / "state")
  assert "state/ is missing" in _error(capsys, f"--model={damaged}", f"--image={d / '0.png'}", "--question=x")


@pytest.mark.slow  # two fresh processes; the same code runs in-process in the tests above
def test_cli_prints_the_answer_and_fails_in_one_line(scenes, teacher):
  d, records = scenes
  run = lambda *a: subprocess.run([sys.executable, "-m", "sab_jax.ask", f"--model={TEACHER}", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
  ok = run(f"--image={d / '2.png'}", f"--question={records[2]['question']}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout == _ask_all(teacher, scenes)[2] + "\n"
  missing = run(f"--image={d / 'nope.png'}", "--question=what color is the circle?")
  assert missing.returncode == 1 and missing.stdout == ""
  assert missing.stderr == f"error: image {d / 'nope.png'} not found\n"


# --- Hugging Face checkpoints ----------------------------------------------------------------

CLIP_JSON = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
             "crop_size": {"height": 32, "width": 32}, "resample": 3, "rescale_factor": 1 / 255,
             "image_mean": list(pipeline.CLIP_MEAN), "image_std": list(pipeline.CLIP_STD), "do_resize": True,
             "do_center_crop": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}


@pytest.mark.parametrize("shape,size,crop", [((47, 83), 32, 30), ((90, 41), 36, 36), ((20, 25), 16, 24)])
def test_clip_image_processor_matches_transformers(tmp_path, shape, size, crop):
  """Landscape, portrait, and a crop larger than the resized image (zero-padded): max |diff| <= 1e-6."""
  transformers = pytest.importorskip("transformers")
  config = dict(CLIP_JSON, size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
  (tmp_path / images.PREPROCESSOR_CONFIG).write_text(json.dumps(config))
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
  ref = transformers.CLIPImageProcessor(**config)(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = images.ClipImageProcessor.from_file(str(tmp_path))(image)
  assert ours.shape == ref.shape == (crop, crop, 3) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-6


def test_tokenizer_path_and_prompt_templates():
  assert tokenizer_lib.tokenizer_path(DEMO) is None and tokenizer_lib.tokenizer_path({}) is None
  hf_run = {"data": {"tokenizer": None}, "teacher": {"format": "hf", "init": "/ckpt"}}
  assert tokenizer_lib.tokenizer_path(hf_run) == "/ckpt"
  assert tokenizer_lib.tokenizer_path(dict(hf_run, data={"tokenizer": "/tok.json"})) == "/tok.json"
  assert set(tokenizer_lib.PROMPTS) == {"vqa", "chat"} and tokenizer_lib.PROMPTS["vqa"] == tokenizer_lib.LLAVA_PROMPT


def test_hf_llava_answers_as_transformers_generate(tmp_path):
  """Its tokenizer, both prompts, its preprocessor_config.json on a non-square image, greedy decoding."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  questions = ["what color is the large circle?", "how many squares are there?"]
  words = list(LLAVA_PROMPT_WORDS) + [w for q in questions for w in q.replace("?", " ?").split()]
  vocab = save_word_tokenizer(tmp_path, words)
  info = save_tiny_llava(str(tmp_path), image_token_id=len(vocab))
  (tmp_path / images.PREPROCESSOR_CONFIG).write_text(json.dumps(CLIP_JSON))
  image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8)
  asker = ask.load(str(tmp_path))
  assert asker.kind == "hf" and isinstance(asker.pixels, images.ClipImageProcessor)
  tok = tokenizer_lib.HFTokenizer(tmp_path)
  processor = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path))
  pixels = torch.from_numpy(processor(image, return_tensors="np")["pixel_values"])
  for prompt in ("vqa", "chat"):
    ours = asker.answer([image, image], questions, prompt=prompt, max_new_tokens=4)
    for q, answer in zip(questions, ours):
      ids = tokenizer_lib.prompt_ids(tok, q, info["num_image_tokens"], tokenizer_lib.PROMPTS[prompt])
      with torch.no_grad():
        out = info["model"].generate(input_ids=torch.tensor([ids]), pixel_values=pixels,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                                     max_new_tokens=4, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
      assert answer == tok.decode(out[0, len(ids):].tolist()), (prompt, q)


QWEN_JSON = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 256, "max_pixels": 4096, "patch_size": 4,
             "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(pipeline.CLIP_MEAN),
             "image_std": list(pipeline.CLIP_STD), "resample": 3, "rescale_factor": 1 / 255, "do_resize": True,
             "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}


def test_hf_qwen25vl_answers_as_transformers_generate(tmp_path):
  """A Qwen2.5-VL directory (HF_LOADERS by model_type): its tokenizer and chat template, its Qwen2-VL
  processor's dynamic resolution (two images of different sizes in one batch: different grids,
  different numbers of image tokens), 3D positions, greedy decoding."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from models.hf_fixture import save_tiny_qwen25vl
  from models.qwen_tokenizer_fixture import save_qwen_tokenizer
  questions = ["what color is the large circle?", "how many squares are there?"]
  ids = save_qwen_tokenizer(tmp_path, [w for q in questions for w in q.replace("?", " ").split()])
  info = save_tiny_qwen25vl(str(tmp_path), vocab_size=max(ids.values()) + 1, image_token_id=ids["<|image_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
  (tmp_path / images.PREPROCESSOR_CONFIG).write_text(json.dumps(QWEN_JSON))
  rng = np.random.default_rng(0)
  pictures = [rng.integers(0, 256, (40, 57, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
  asker = ask.load(str(tmp_path))
  assert asker.kind == "hf" and isinstance(asker.pixels, images.QwenImageProcessor)
  tok = tokenizer_lib.HFTokenizer(tmp_path, image_token="<|image_pad|>")
  processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
  said = []
  for prompt, template in (("vqa", tokenizer_lib.QWEN_VQA_PROMPT), ("chat", tokenizer_lib.QWEN_CHAT_PROMPT)):
    ours = asker.answer(pictures, questions, prompt=prompt, max_new_tokens=4)
    said += ours
    for q, picture, answer in zip(questions, pictures, ours):
      ref = processor(images=[picture], return_tensors="np")
      grid = np.asarray(ref["image_grid_thw"])
      prompt_ids = tokenizer_lib.prompt_ids(tok, q, int(grid.prod()) // 4, template)
      input_ids = torch.tensor([prompt_ids])
      with torch.no_grad():
        out = info["model"].generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.from_numpy(np.asarray(ref["pixel_values"], np.float32)),
            image_grid_thw=torch.from_numpy(grid), mm_token_type_ids=(input_ids == info["image_token_id"]).long(),
            do_sample=False, max_new_tokens=4, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
      assert answer == tok.decode(out[0, len(prompt_ids):].tolist()), (prompt, q)
  assert any(said)  # the random model says something, so the comparison is not empty == empty
  assert len({int(np.prod(processor(images=[p], return_tensors="np")["image_grid_thw"])) for p in pictures}) == 2
