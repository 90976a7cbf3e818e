"""LLaVA-1.5-7B binarized on VQAv2, on a TPU v4 / v5 pod slice (launch/tpu_pod.sh).

Required (`--config.key=value`): `data.tokenizer` (the HF checkpoint directory or its
tokenizer.json) and `teacher.init` (the HF checkpoint: config.json + *.safetensors,
e.g. llava-hf/llava-1.5-7b-hf downloaded beforehand). VQAv2 must be built once into
`data.data_dir` (`python -m sab_jax.data.vqav2 --manual_dir=... --data_dir=...`).

Note: `sab_jax.stages` reads the synthetic dataset, the word tokenizer and orbax
teachers today; this config states the 7B run for when they read `data.name`,
`data.tokenizer` and `teacher.format` (it loads, it does not run end to end yet).
"""

import ml_collections
from ml_collections import config_dict

from sab_jax import config_utils, sharding


def get_config(arg=None):
  config_utils.parse_arg(arg)  # no variants: an argument is an error
  c = ml_collections.ConfigDict()
  # No teacher training at 7B: load, evaluate, binarize, export, distil, evaluate the exports.
  c.stages = ("data", "teacher", "eval_fp", "calibrate", "binarize", "export", "distill", "eval")
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # TFDS builder `vqav2` (sab_jax/data/vqav2.py); configs res336 / res224 / original.
  c.data.name = "vqav2"
  # res336: LLaVA-1.5's CLIP-L/14-336 input size, images stored pre-resized.
  c.data.config = "res336"
  c.data.train_config = "res336"
  # A GCS bucket on pods (gs://BUCKET/tensorflow_datasets); None: $TFDS_DATA_DIR.
  c.data.data_dir = config_dict.placeholder(str)
  # The HF tokenizer of the checkpoint (directory with tokenizer.json, or the file).
  c.data.tokenizer = config_dict.placeholder(str, required=True)
  # bos + LLaVA-1.5's USER/ASSISTANT template (~30 tokens) + 576 image tokens + question.
  c.data.max_prompt_len = 672
  # VQAv2 answers are a word or a short phrase, plus eos.
  c.data.max_answer_len = 8

  # Model: a variant from sab_jax.models.llava.VARIANTS plus field overrides.
  c.model = ml_collections.ConfigDict({"variant": "llava-1.5-7b", "vision": {}, "text": {}})

  c.teacher = ml_collections.ConfigDict()
  # The HF checkpoint directory (config.json + *.safetensors; sab_jax.models.hf).
  c.teacher.init = config_dict.placeholder(str, required=True)
  # "hf": read `init` with sab_jax.models.hf.from_pretrained; "orbax": checkpointing.load_params.
  c.teacher.format = "hf"
  c.teacher.retrain = False

  # Only used if the teacher is retrained (not at 7B); batch_size is per process.
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8
  c.train.num_steps = 1000
  c.train.lr = 2e-5
  c.train.warmup_steps = 30
  c.train.zero_init = ""
  c.train.final_lr_fraction = 0.0
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  # VQAv2 test answers are not public: evaluate on (part of) validation.
  c.eval.split = "validation"
  c.eval.metric = "vqav2"
  # Per process.
  c.eval.batch_size = 16
  # <= 0: the whole split (214k questions); 5000 is enough to rank the methods.
  c.eval.max_examples = 5000
  c.eval.packed_mode = "auto"

  c.export = ml_collections.ConfigDict()
  # The 32000 x 4096 embedding and head dominate the non-binarized bytes at 7B.
  c.export.int8_params = (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")

  c.quant = ml_collections.ConfigDict()
  c.quant.methods = ("xnor", "pbllm", "billm", "arb_rc", "sab")
  c.quant.variants = ml_collections.ConfigDict({
      # The layout that stores <= 1.2 bits per weight on these layers.
      "sab_structured": {"method": "sab", "structured": True},
      "arb_rc_structured": {"method": "arb_rc", "structured": True},
  })
  # Decoder linears only, as in the papers; vision tower, projector and head stay 16-bit.
  c.quant.rules = ((r"language_model\.layers\..*", True), (r".*", False))
  # 128 image-question pairs of ~680 tokens (~87k tokens, comparable to GPTQ's 128 x 2048).
  c.quant.calib_samples = 128
  c.quant.calib_batch_size = 8
  c.quant.progress = True

  # Quantization-aware distillation (stage `distill`): each source's export -> `<source>_kd`.
  c.distill = ml_collections.ConfigDict()
  c.distill.sources = ("sab",)
  c.distill.temperature = 1.0
  # Weight of the answer cross-entropy added to the KL (0: pure distillation).
  c.distill.ce_weight = 0.0
  # Weight of the final-hidden-state matching term ‖h_s − h_t‖²/‖h_t‖² (0: off).
  c.distill.hidden_weight = 0.0
  # Straight-through gradient passes where |latent| <= clip x the row's largest scale.
  c.distill.clip = 1.0
  # batch_size is per process: 8 x 32 hosts of a v4-256 = 256 pairs per step.
  c.distill.train = ml_collections.ConfigDict({
      "batch_size": 8, "num_steps": 2000, "lr": 2e-5, "warmup_steps": 100, "final_lr_fraction": 0.05,
      "weight_decay": 0.0, "grad_clip": 1.0, "log_every": 10, "checkpoint_every": 200, "keep_checkpoints": 2,
      "nonfinite": "stop"})

  # 7B in bf16 is ~14 GB: FSDP over 8 chips leaves ~2 GB of weights per chip (v5e has
  # 16 GB, v4 32 GB) and room for the per-layer Hessians; data parallel over the rest.
  # Needs a multiple of 8 chips (v4-16, v5litepod-8 and up); on 4 chips use fsdp=4.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "model": 1})
  c.logical_axis_rules = sharding.DEFAULT_RULES
  return c
