"""What SAB's significance pass costs: calibration time and memory with it and without, in one run.

On the demo (shipped teacher, the demo's 256 calibration questions, one process): the whole
calibrate-and-binarize pass (`calib.calibrate.binarize_model`) of SAB with its loss-calibrated
significance ("fisher": one forward+backward pass of the full-precision model first) against
the same provider without it ("hessian", the paper's map), both structured and not, each run
twice (the first compiles, the second is warm); the significance pass alone; and the memory
XLA assigns to the pass's program against the sequential pass's largest programs (a decoder
layer's forward with its inputs sown, and the Hessian sums). Then the same accounting at
LLaVA-1.5-7B's shapes (arithmetic, not run): what the pass holds per token and keeps per layer.

  python experiments/benchmarks/significance_cost.py --out=experiments/benchmarks/significance_cost_cpu2.json
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from sab_jax import sharding as sharding_lib, stages
from sab_jax.calib import calibrate, hessian, sensitivity
from sab_jax.quant import providers, rules as rules_lib

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_REPO, "experiments", "configs", "demo.py"),
                                          "pipeline config (teacher, data, calibration set)", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/significance_cost", "workdir (the data and teacher stages)")
_OUT = flags.DEFINE_string("out", None, "JSON file")

RUNS = {  # name: (provider, with the significance pass)
    "sab (fisher)": (providers.Sab(), True),
    "sab (hessian)": (providers.Sab(significance="hessian"), False),
    "sab_structured (fisher)": (providers.Sab(structured=True), True),
    "sab_structured (hessian)": (providers.Sab(structured=True, significance="hessian", salient_budget="layer"), False),
}
# LLaVA-1.5-7B's language model: 32 decoder layers of these linears (in, out).
LLAVA7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
           "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
LLAVA7B_LAYERS, F32 = 32, 4


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  out = {f: int(getattr(m, f)) for f in fields}
  out["total_bytes"] = sum(out.values())
  return out


def _program_memory(ctx, batches, selected, mesh) -> dict[str, dict[str, int]]:
  """XLA's buffer sizes of the significance pass's program and the sequential pass's largest ones."""
  model = sharding_lib.place(nnx.clone(ctx.teacher), mesh, ctx.config.logical_axis_rules)
  b = batches[0]
  paths = tuple(sorted(selected))
  with calibrate.module_paths.wrapped(model, paths, sensitivity.Probe):
    sig = sensitivity._batch_sums_jit.lower(model, b, jax.random.key(0), mesh=mesh, paths=paths,
                                           image_token_id=model.cfg.image_token_id, normalize="question").compile()
  layer = model.language_model.layers[0]
  x = calibrate._embed(model, b["input_ids"], b["pixel_values"])
  pos = calibrate._positions(model, b["input_ids"], b["attention_mask"], b["pixel_values"])
  mask = calibrate.llama.causal_mask(b["attention_mask"])
  here = [p.split("language_model.layers.0.", 1)[1] for p in paths if p.startswith("language_model.layers.0.")]
  with calibrate.capturing(layer, here):
    run = calibrate._run_layer.lower(layer, x, pos, mask).compile()
  widest = max(here, key=lambda p: calibrate.module_paths.get(layer, p).kernel.shape[0])
  d = calibrate.module_paths.get(layer, widest).kernel.shape[0]
  xs = jnp.zeros(b["input_ids"].shape + (d,), jnp.float32)
  ones = jnp.ones(b["input_ids"].shape, jnp.float32)
  hs = hessian.hessian_sums.lower(xs, ones, ones, mesh).compile()
  return {"significance pass (one batch)": _memory(sig), "decoder layer forward, inputs sown": _memory(run),
          f"Hessian sums ({widest} inputs)": _memory(hs)}


def _llava7b(tokens_per_batch: int) -> dict[str, float]:
  per_layer_out = sum(o for _, o in LLAVA7B.values())
  per_layer_in = sum(i for i, _ in LLAVA7B.values())
  per_token = LLAVA7B_LAYERS * (per_layer_out + per_layer_in) * F32  # perturbation + sown input per linear
  kept = LLAVA7B_LAYERS * 2 * (per_layer_out + per_layer_in) * F32     # [out] + [in] per modality per linear
  fisher = LLAVA7B_LAYERS * sum(i * o for i, o in LLAVA7B.values()) * F32 * 2  # per-weight, per modality
  return {"pass_bytes_per_token": per_token, "pass_gib_per_batch": per_token * tokens_per_batch / 2**30,
          "tokens_per_batch": tokens_per_batch, "kept_mib": kept / 2**20, "per_weight_fisher_gib": fisher / 2**30}


def main(_):
  config = _CONFIG.value
  config.quant.progress = False
  ctx = stages.Context(config, _WORKDIR.value)
  stages.stage_data(ctx)
  stages.stage_teacher(ctx)
  stages.stage_calibrate(ctx)
  mesh = ctx.mesh
  rules = rules_lib.parse(config.quant.rules)
  selected = rules_lib.select(ctx.teacher, rules)
  put = lambda a: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, a.ndim), a)
  batches = [{k: put(b[k]) for k in ("input_ids", "attention_mask", "pixel_values", "loss_mask")}
             for b in ctx.calib_batches]

  rows = {}
  for name, (provider, _) in RUNS.items():
    times = []
    for _ in range(2):
      model = sharding_lib.place(nnx.clone(ctx.teacher), mesh, config.logical_axis_rules)
      t = time.perf_counter()
      calibrate.binarize_model(model, ctx.calib_batches, provider, rules, mesh, progress=False)
      times.append(time.perf_counter() - t)
    rows[name] = {"first_s": times[0], "warm_s": times[1]}
    print(f"{name:26s} first {times[0]:6.1f} s  warm {times[1]:6.1f} s", flush=True)
  pass_times = []
  for _ in range(2):
    model = sharding_lib.place(nnx.clone(ctx.teacher), mesh, config.logical_axis_rules)
    t = time.perf_counter()
    sensitivity.measure(model, batches, selected, mesh)
    pass_times.append(time.perf_counter() - t)
  memory = _program_memory(ctx, batches, selected, mesh)
  tokens = int(sum(b["attention_mask"].sum() for b in ctx.calib_batches))
  ratio = {k: rows[f"{k} (fisher)"]["warm_s"] / rows[f"{k} (hessian)"]["warm_s"] for k in ("sab", "sab_structured")}
  info = {"device": str(jax.devices()[0]), "host": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "calibration_questions": len(ctx.calib_batches) *
          len(ctx.calib_batches[0]["input_ids"]), "calibration_tokens": tokens, "runs": rows,
          "significance_pass_s": {"first": pass_times[0], "warm": pass_times[1]}, "warm_ratio_with_vs_without": ratio,
          "program_memory": memory, "llava7b_arithmetic": _llava7b(tokens_per_batch=8 * 650)}
  print("\n| run | first (s) | warm (s) |\n|---|---:|---:|")
  for name, r in rows.items():
    print(f"| {name} | {r['first_s']:.1f} | {r['warm_s']:.1f} |")
  print(f"| significance pass alone | {pass_times[0]:.1f} | {pass_times[1]:.1f} |")
  print("\nwarm time with / without the pass: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
  print("\n| program | arguments (MiB) | outputs (MiB) | temporaries (MiB) | total (MiB) |\n|---|---:|---:|---:|---:|")
  for name, m in memory.items():
    print(f"| {name} | {m['argument_size_in_bytes'] / 2**20:.2f} | {m['output_size_in_bytes'] / 2**20:.2f} | "
          f"{m['temp_size_in_bytes'] / 2**20:.2f} | {m['total_bytes'] / 2**20:.2f} |")
  print("\nLLaVA-1.5-7B (arithmetic):", json.dumps(info["llava7b_arithmetic"]))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(info, f, indent=1)


if __name__ == "__main__":
  app.run(main)
