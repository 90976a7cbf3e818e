"""Qwen2.5-VL-7B-Instruct binarized on VQAv2, on a TPU v4 / v5 pod slice (launch/tpu_pod.sh).

The paper's model family (SAB-LVLM reports Qwen2.5-VL-3B/7B/32B/72B). The same pipeline as
`llava7b_pod.py` (stages, methods, variants, distillation, mesh); what differs is the model:
the checkpoint's config.json (`model_type: qwen2_5_vl`) makes `sab_jax.models.hf` build
`models.qwen25vl.Qwen25VL`, its tokenizer marks images with `<|image_pad|>`, and prompts use
Qwen's chat template (`models.families`).

Required (`--config.key=value`): `teacher.init`, the HF checkpoint directory (config.json,
*.safetensors, tokenizer.json, e.g. Qwen/Qwen2.5-VL-7B-Instruct downloaded beforehand). VQAv2
must be built once into `data.data_dir` or `data.manual_dir` given (as in llava7b_pod.py).

Images: VQAv2's `res336` builder stores 336x336 squares; Qwen2.5-VL takes any multiple of
28 pixels (patch 14 x merge 2), so `data.image_size` 336 gives 12 x 12 = 144 image tokens a
question (transformers' processor would keep the original aspect ratio at up to 12.8M pixels;
a fixed square keeps batches rectangular, as the paper's calibration does not specify).

Config arguments (`qwen25vl7b_pod.py:ARG`):
  runlocal: the pipeline sized for one CPU with a small checkpoint, as llava7b_pod.py's
    runlocal, with 56-pixel images (4 image tokens). tests/integration/test_pod_config.py runs
    it end to end on a tiny random Qwen2.5-VL saved by transformers.
"""

import os
import sys

from sab_jax import config_utils

try:
  from experiments.configs import llava7b_pod
except ModuleNotFoundError as e:  # loaded by path (--config=) from outside the checkout's root
  if e.name != "experiments":
    raise
  sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from experiments.configs import llava7b_pod


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, runlocal=False)
  c = llava7b_pod.get_config("runlocal" if arg.runlocal else None)

  # Unused with teacher.format "hf" (config.json defines the model); names the intended architecture.
  c.model.family, c.model.variant = "qwen2_5_vl", "qwen2.5-vl-7b"
  # 336-pixel squares: 144 image tokens (see the module docstring).
  c.data.image_size = 336
  # Qwen's chat template (system turn + user turn + assistant header, ~30 tokens) + 144 image
  # tokens + question and the short-answer instruction.
  c.data.max_prompt_len = 224
  # The embedding and head (152064 x 3584 each at 7B) in int8; one regex, since Qwen2.5-VL-3B ties
  # its head to the embedding (no lm_head param) and every int8 regex must match a param.
  c.export.int8_params = (r"language_model\.embed_tokens\.embedding|lm_head\.kernel",)

  if arg.runlocal:  # llava7b_pod's runlocal sizes; a small image for a tiny checkpoint
    c.data.image_size = 56
    c.data.max_prompt_len = 64
  return c
