"""LLaVA-1.5-7B binarized on VQAv2, on a TPU v4 / v5 pod slice (launch/tpu_pod.sh).

Required (`--config.key=value`): `teacher.init`, the HF checkpoint directory (config.json,
*.safetensors and tokenizer.json, e.g. llava-hf/llava-1.5-7b-hf downloaded beforehand;
`data.tokenizer` points elsewhere if the tokenizer is not in it). VQAv2 must be built once into
`data.data_dir` (`python -m sab_jax.data.vqav2 --manual_dir=... --data_dir=...`), or
`data.manual_dir` given to build it in the run.

Config arguments (`llava7b_pod.py:ARG`):
  runlocal: the same pipeline sized for a laptop or one CPU: FSDP over whatever devices there
    are (`mesh.fsdp=-1`), batches of 8, 16 calibration samples, 4 distillation steps, at most
    32 evaluation questions, and prompts of 48 tokens, which fit a small checkpoint (<= 16
    image tokens, as tests/models/hf_fixture.py saves) but not 7B's 576 (the run says to
    raise `data.max_prompt_len`). Batch sizes are per process: a multiple of the local devices.

The checkpoint's config.json defines the model (config.model is not read with
teacher.format "hf"). tests/integration/test_pod_config.py runs `llava7b_pod.py:runlocal` end to end on
CPU with a tiny random LLaVA saved by transformers and a tiny VQAv2 built from hand-made files.
"""

import os
import sys

from ml_collections import config_dict

from sab_jax import config_utils

try:
  from experiments.configs import demo
except ModuleNotFoundError as e:  # loaded by path (--config=) from outside the checkout's root
  if e.name != "experiments":
    raise
  sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from experiments.configs import demo


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, runlocal=False)
  c = demo.get_config()  # stages, methods, rules, export and distillation keys as in the demo
  # No teacher training at 7B: load, evaluate, binarize, export, distil, evaluate the exports.

  # TFDS builder `vqav2` (sab_jax/data/vqav2.py); res336: LLaVA-1.5's CLIP-L/14-336 input
  # size, images stored pre-resized. A GCS bucket on pods; None: $TFDS_DATA_DIR.
  c.data.name = "vqav2"
  c.data.config = c.data.train_config = "res336"
  # data.tokenizer: None reads tokenizer.json from the checkpoint directory (teacher.init).
  # bos + LLaVA-1.5's USER/ASSISTANT template (~30 tokens) + 576 image tokens + question.
  c.data.max_prompt_len = 672
  # VQAv2 answers are a word or a short phrase, plus eos.
  c.data.max_answer_len = 8

  # Unused with teacher.format "hf" (the checkpoint's config.json defines the model); kept
  # so that retraining or a shape check names the intended architecture.
  c.model.variant = "llava-1.5-7b"

  # The HF checkpoint directory (config.json + *.safetensors; sab_jax.models.hf).
  c.teacher.init = config_dict.placeholder(str)  # required: see the module docstring
  # "hf": read `init` with sab_jax.models.hf.from_pretrained; "orbax": checkpointing.load_params.
  c.teacher.format = "hf"
  # 7B in float32 would be 28 GB: keep the weights in bf16 (Hessians and scales stay float32).
  c.teacher.param_dtype = "bfloat16"
  c.teacher.retrain = False

  # Only used if the teacher is retrained (not at 7B); batch_size is per process.
  c.train.update(batch_size=8, num_steps=1000, lr=2e-5, warmup_steps=30, final_lr_fraction=0.0, weight_decay=0.0,
                 log_every=10, checkpoint_every=200)

  # VQAv2 test answers are not public: evaluate on (part of) validation; batch per process;
  # 5000 of the 214k questions are enough to rank the methods.
  c.eval.update(split="validation", batch_size=16, max_examples=5000)
  c.eval.metric = "vqav2"  # VQAv2's standard soft accuracy (also the dataset's default)

  # The 32000 x 4096 embedding and head dominate the non-binarized bytes at 7B.
  c.export.int8_params = (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")

  # The papers' methods plus the layouts that store <= 1.2 bits per weight on these layers.
  c.quant.variants = {"sab_structured": {"method": "sab", "structured": True},
                      "arb_rc_structured": {"method": "arb_rc", "structured": True}}
  # 128 image-question pairs of ~680 tokens (~87k tokens, comparable to GPTQ's 128 x 2048).
  c.quant.calib_samples, c.quant.calib_batch_size = 128, 8

  # batch_size is per process: 8 x 32 hosts of a v4-256 = 256 pairs per step.
  c.distill.sources = ("sab",)
  c.distill.train.update(batch_size=8, num_steps=2000, lr=2e-5, warmup_steps=100, log_every=10, checkpoint_every=200)

  # 7B in bf16 is ~14 GB: FSDP over 8 chips leaves ~2 GB of weights per chip (v5e has
  # 16 GB, v4 32 GB) and room for the per-layer Hessians; data parallel over the rest.
  # Needs a multiple of 8 chips (v4-16, v5litepod-8 and up); on 4 chips use fsdp=4.
  c.mesh.update(data=-1, fsdp=8, model=1)

  if arg.runlocal:  # the whole pipeline in minutes on a CPU, with a small checkpoint
    c.data.max_prompt_len, c.data.max_answer_len = 48, 4
    c.train.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.eval.update(batch_size=8, max_examples=32)
    c.quant.calib_samples, c.quant.calib_batch_size, c.quant.progress = 16, 8, False
    c.distill.train.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.mesh.update(data=1, fsdp=-1, model=1)  # every local device (8 simulated ones in the tests)
  return c
