"""The embedded default workload: synthetic shapes VQA and the small LVLM trained on it.

Variants (`demo.py:arg`): `smoke` (seconds; for tests); `retrain` and `relations`, the
two steps that trained the shipped teacher (RESULTS.md): `retrain` trains a teacher from
scratch (without image coordinates; every type but spatial relations is learned),
`relations` fine-tunes one (`teacher.init`, default the shipped step-1 checkpoint) with
image coordinates and a relation curriculum; `kernel_layouts` binarizes only the layouts
the packed kernels serve (XNOR, structured SAB / ARB-RC) and distils two of them (for
`experiments/benchmarks/int8_activations_quality.py`). Anything else: `--config.key=value`.
"""

import os

import ml_collections

from sab_jax import config_utils, sharding

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, smoke=False, retrain=False, relations=False, kernel_layouts=False)
  c = ml_collections.ConfigDict()
  # Stages run in this order by `sab_jax.main`.
  c.stages = ("data", "teacher", "eval_fp", "calibrate", "binarize", "export", "distill", "eval")
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # sab_jax.data.datasets: synthetic_vqa (generated on first use), vqav2, gqa (built from manual_dir).
  c.data.name = "synthetic_vqa"
  # TFDS builder config evaluated on ('small' has the same test split as 'default').
  c.data.config = "small"
  # Builder config the teacher trains on.
  c.data.train_config = "default"
  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  # VQAv2/GQA downloads; if set, an unbuilt dataset is built from here in this run.
  c.data.manual_dir = ml_collections.config_dict.placeholder(str)
  # A Hugging Face tokenizer.json (or the checkpoint directory); None: the synthetic set's word tokenizer.
  c.data.tokenizer = ml_collections.config_dict.placeholder(str)
  # Prompt = bos + 16 image tokens + question (<= 12 words): 29 tokens at most.
  c.data.max_prompt_len = 32
  # One-word answers + eos.
  c.data.max_answer_len = 2
  # The square size images are fed at. None: the model's (a CLIP tower's fixed size); a model with
  # dynamic resolution (Qwen2.5-VL) may take any multiple of its patch x merge size.
  c.data.image_size = ml_collections.config_dict.placeholder(int)

  # Model: a variant from sab_jax.models.llava.VARIANTS plus field overrides.
  c.model = ml_collections.ConfigDict({"variant": "demo", "vision": {}, "text": {}})

  c.teacher = ml_collections.ConfigDict()
  # The shipped teacher (`demo.py:retrain`, then `demo.py:relations`; experiments/benchmarks/RESULTS.md).
  c.teacher.init = os.path.join(_REPO, "experiments", "teacher", "demo")
  # "orbax": a sab_jax parameters checkpoint (config.model describes it); "hf": a Hugging Face
  # LLaVA directory (config.json + safetensors; its config.json describes the model).
  c.teacher.format = "orbax"
  # Storage dtype of the teacher's (and students') parameters.
  c.teacher.param_dtype = "float32"
  # Train the teacher in this run instead of loading `init`.
  c.teacher.retrain = arg.retrain or arg.relations
  # Training starts from the orbax `init` (parameters it lacks keep their random init);
  # a Hugging Face `init` is always the starting point.
  c.teacher.warm_start = arg.relations

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_steps = 5000
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  # Dense layers (regex over module paths) whose kernels start at zero (see
  # train.zero_init); empty: none. Measured no faster here than the plain init.
  c.train.zero_init = ""
  # Cosine decay ends at lr * final_lr_fraction.
  c.train.final_lr_fraction = 0.02
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  # Question-type curriculum: ((num_steps, {question_type: weight}), ...); each batch mixes
  # the named types (`*`: any record) in those proportions, the last phase runs to the end.
  # Empty: the training split as it is.
  c.train.phases = ()

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.batch_size = 250
  # The split's first N questions, however many processes share them (<= 0: the whole split).
  c.eval.max_examples = -1
  # sab_jax.eval.vqa.METRICS; None: the dataset's standard one (exact match; VQAv2 soft accuracy).
  c.eval.metric = ml_collections.config_dict.placeholder(str)
  # How exported models run (sab_jax.models.packed): "auto" (the packed kernel on GPU
  # where the layout allows, exact XLA dequantization otherwise), "dequant" or "kernel".
  c.eval.packed_mode = "auto"

  c.export = ml_collections.ConfigDict()
  # Regexes of non-binarized params stored int8 with per-row scales (e.g. the embedding
  # and the head: (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")).
  c.export.int8_params = ()

  c.quant = ml_collections.ConfigDict()
  # Methods run on the same calibration set and code path (sab_jax.quant.providers).
  c.quant.methods = ("xnor", "pbllm", "billm", "arb_rc", "sab")
  # Extra runs recorded under results["variants"]: name -> {method, provider fields}.
  c.quant.variants = ml_collections.ConfigDict({
      # The configuration that truly stores <= 1.2 bits per weight on 7B-shaped layers.
      "sab_structured": {"method": "sab", "structured": True},
      # Baselines at matched stored bits (~1.1-1.5 here; scales cost more on 128-wide layers).
      "arb_rc_structured": {"method": "arb_rc", "structured": True},
      "pbllm_matched": {"method": "pbllm", "salient_fraction": 0.005},
      # ARB-RC with SAB's salient rows per layer (9%, per block): the same stored bits as `sab`.
      "arb_rc_matched": {"method": "arb_rc", "salient_rows": 0.09},
      # SAB at BiLLM's stored bits (~3.0 here): 5% of every layer's rows, priced over the model.
      "sab_billm_bits": {"method": "sab", "salient_rows": 0.05},
      # The paper as written: Λ from the modality Hessians alone (steps 2-5), no significance pass.
      "sab_hessian": {"method": "sab", "significance": "hessian"},
      # What the loss gradients add: the same pass and whole-model allocation, every output felt alike.
      "sab_structured_uniform": {"method": "sab", "structured": True, "significance": "uniform"},
      # What the whole-model allocation adds: the loss-calibrated objective, each layer's own budget.
      "sab_structured_layer_budget": {"method": "sab", "structured": True, "salient_budget": "layer"},
      # Ablations: Λ² instead of Λ; the paper's map with a larger salient fraction / stricter partition.
      "sab_lambda2": {"method": "sab", "lambda_power": 2},
      "sab_top10": {"method": "sab", "significance": "hessian", "salient_top_p": 0.10},
      # Partition rule: a stricter modality-gap quantile for "single-modality" weights.
      "sab_gap_q90": {"method": "sab", "significance": "hessian", "diff_quantile": 0.9},
      # One salient group per block (the layout before ARB-LLM's `--order2_group` split).
      "sab_one_group": {"method": "sab", "salient_groups": False},
  })
  # (regex over Dense module paths, binarize?) - first match wins; decoder linears only.
  c.quant.rules = ((r"language_model\.layers\..*", True), (r".*", False))
  c.quant.calib_samples = 256
  c.quant.calib_batch_size = 64
  c.quant.progress = True

  # Quantization-aware distillation (stage `distill`): each source's export -> `<source>_kd`.
  c.distill = ml_collections.ConfigDict()
  # The ~3-bit `sab` and the structured layout (<= 1.2 stored bits/weight at 7B shapes, 1.5 here).
  c.distill.sources = ("sab", "sab_structured")
  c.distill.temperature = 1.0
  # Weight of the answer cross-entropy added to the KL (0: pure distillation).
  c.distill.ce_weight = 0.0
  # Weight of the final-hidden-state matching term ‖h_s − h_t‖²/‖h_t‖² (0: off).
  c.distill.hidden_weight = 0.0
  # Straight-through gradient passes where |latent| <= clip x the row's largest scale.
  c.distill.clip = 1.0
  # Per-weight step by the significance map (quant.binary_dense): weight (j,k) moves
  # clip((s/geomean s)^power, 1/8, 8) times as fast; 0: plain straight-through training.
  c.distill.significance_power = 0.0
  # Ablation: the map's inputs and outputs shuffled per layer (same step sizes on the wrong weights).
  c.distill.significance_permuted = False
  # Extra distillations compared with the sources' {name: {"source": export, setting: value}}
  # (settings: temperature, ce_weight, hidden_weight, clip, significance_power, significance_permuted,
  # and "train": {key of distill.train: value}) -> results["variants"].
  c.distill.variants = ml_collections.ConfigDict()
  # lr 6e-4: +0.85 points over 2e-4 on sab_structured_kd after 900 steps (3 draws, RESULTS.md).
  c.distill.train = ml_collections.ConfigDict({
      "batch_size": 64, "num_steps": 900, "lr": 6e-4, "warmup_steps": 50, "final_lr_fraction": 0.05,
      "weight_decay": 0.0, "grad_clip": 1.0, "log_every": 50, "checkpoint_every": 100, "keep_checkpoints": 2,
      # "stop": a non-finite loss stops the run naming the step; "skip": such steps are skipped
      "nonfinite": "stop"})

  # Mesh axes and sizes (-1: all remaining devices); rules map logical axes onto them.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.logical_axis_rules = sharding.DEFAULT_RULES

  if arg.retrain:  # step 1 of the shipped teacher: every type but relations (no coordinates)
    c.model.image_coordinates = False
  if arg.relations:  # step 2: coordinates + relations first (with compare, which shares the yes/no circuit)
    c.teacher.init = os.path.join(_REPO, "experiments", "teacher", "demo_step1")
    c.train.update(num_steps=2500, lr=1e-3, warmup_steps=50, final_lr_fraction=0.1, phases=(
        (700, {"relation": 0.75, "compare": 0.25}), (1800, {"*": 0.6, "relation": 0.3, "compare": 0.1})))
  if arg.kernel_layouts:  # only the layouts the packed kernels serve, each also distilled
    c.quant.methods = ("xnor",)
    c.quant.variants = ml_collections.ConfigDict({"sab_structured": {"method": "sab", "structured": True},
                                                  "arb_rc_structured": {"method": "arb_rc", "structured": True}})
    c.distill.sources = ("sab_structured", "xnor")

  if arg.smoke:
    c.data.config = c.data.train_config = "tiny"
    c.train.num_steps, c.train.batch_size, c.train.log_every = 4, 8, 2
    c.train.warmup_steps, c.train.checkpoint_every = 1, 2
    c.eval.batch_size, c.eval.max_examples = 16, 32
    c.quant.calib_samples, c.quant.calib_batch_size, c.quant.progress = 16, 8, False
    c.quant.variants = ml_collections.ConfigDict({"sab_structured": {"method": "sab", "structured": True}})
    c.distill.sources = ("sab",)
    c.distill.variants = ml_collections.ConfigDict({"sab_kd_significance": {"source": "sab",
                                                                             "significance_power": 0.5}})
    c.distill.train.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
  return c
