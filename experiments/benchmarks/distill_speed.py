"""Cost of one quantization-aware distillation step against plain fine-tuning (issue 5).

Times, in one run on the same model shapes and the same synthetic batch, one jitted
fwd + bwd + AdamW step (`train.make_train_step`, the step `train.train` runs, donation
included) of
  a  fp_ce       the full-precision model on the answer cross-entropy, every Param trained;
  b  student_kd  the binarized student (`distill.build_student`, BinaryDense layers) on the
                 KD loss against a FIXED teacher (`FixedTeacher`: precomputed logits and
                 hidden states, no forward), wrt=distill.TRAINABLE;
  c  fp_kd       the full-precision model on that same fixed-teacher KD loss, every Param trained;
  d  distill     the whole distillation step as `train.train` runs it: teacher forward +
                 student fwd/bwd + update;
plus a diagnostic
  e  w_hat_only  rebuilding Ŵ of every BinaryDense layer from latent + scales, fwd + bwd,
                 with no matmul against activations (the part of (b) that (c) does not pay).
b/c isolates the cost of the binarization itself (goal ≤ 1.10), d/a is what distillation
costs over fine-tuning (goal ≤ 1.45). The student starts from PTQ parts made by `--source`
on every decoder kernel with random calibration statistics (x ~ N(0, 1), H = 2/N xᵀx):
timing needs the layout, not a good binarization.

Steps are timed round-robin (one step of each configuration per round) so that load on a
shared machine hits all of them alike; each time is a median over `--steps` rounds after
`--warmup` untimed ones. A step is one XLA executable, so blocking on its loss waits for
its parameter updates too.

  python experiments/benchmarks/distill_speed.py [--variant demo] [--batch 64] [--out distill_speed.json]

Needs only jax/flax/optax/numpy (no ml-collections, tfds or grain): runs unchanged on
the GPU machine. Prints a markdown table and writes JSON with the device info.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sab_jax.models import llava, paths
from sab_jax.quant import binary_dense, providers, rules
from sab_jax.quant.providers.base import LayerStats, uniform_sensitivity
from sab_jax.train import distill, train

SOURCES = {"xnor": lambda: providers.Xnor(), "arb_rc": lambda: providers.ArbRc(),
           "sab": lambda: providers.Sab(), "sab_structured": lambda: providers.Sab(structured=True),
           "arb_rc_structured": lambda: providers.ArbRc(structured=True)}
NAMES = {"fp_ce": "(a) FP fine-tuning, answer CE", "student_kd": "(b) binarized student, fixed-logit KD",
         "fp_kd": "(c) FP model, fixed-logit KD", "distill": "(d) full distillation step (teacher fwd + b)",
         "w_hat_only": "(e) Ŵ rebuild alone, fwd+bwd (diagnostic)"}
PAIRS = (("student_kd", "fp_kd"), ("distill", "fp_ce"), ("w_hat_only", "fp_kd"))
# Pipeline specials (tokenizer.WordTokenizer): pad, bos, eos, image, unk; words follow.
PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 5


# The demo's `config.distill.train` optimiser settings (nonfinite "stop").
OPTIMIZER = types.SimpleNamespace(lr=2e-4, warmup_steps=50, num_steps=600, final_lr_fraction=0.05, weight_decay=0.0,
                                  grad_clip=1.0)


def synthetic_batch(cfg: llava.LlavaConfig, batch: int, prompt_len: int, answer_len: int, seed: int = 0
                    ) -> dict[str, jax.Array]:
  """A batch in `data.pipeline`'s format: pad | bos image*N question | answer eos | pad."""
  rng = np.random.default_rng(seed)
  n_img, vocab, L = cfg.num_image_tokens, cfg.text.vocab_size, prompt_len + answer_len
  if 1 + n_img >= prompt_len:
    raise ValueError(f"--prompt_len {prompt_len} leaves no room for bos + {n_img} image tokens + a question")
  if L > cfg.text.max_position_embeddings:
    raise ValueError(f"sequence of {L} tokens exceeds max_position_embeddings {cfg.text.max_position_embeddings}")
  words = lambda n: rng.integers(FIRST_WORD, vocab, n)
  input_ids = np.full((batch, L), PAD, np.int32)
  attention_mask = np.zeros((batch, L), np.int32)
  loss_mask = np.zeros((batch, L), np.float32)
  for i in range(batch):
    q = int(rng.integers(1, prompt_len - n_img))  # question words (the prompt fills at most prompt_len)
    prompt = np.concatenate([[BOS], np.full(n_img, cfg.image_token_id), words(q)])
    target = np.concatenate([words(int(rng.integers(1, answer_len))) if answer_len > 1 else [], [EOS]])
    input_ids[i, prompt_len - len(prompt):prompt_len] = prompt
    input_ids[i, prompt_len:prompt_len + len(target)] = target
    attention_mask[i, prompt_len - len(prompt):prompt_len + len(target)] = 1
    loss_mask[i, prompt_len - 1:prompt_len - 1 + len(target)] = 1.0
  s = cfg.vision.image_size
  pixel_values = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
  return {"input_ids": jnp.asarray(input_ids), "attention_mask": jnp.asarray(attention_mask),
          "loss_mask": jnp.asarray(loss_mask), "pixel_values": jnp.asarray(pixel_values)}


def ptq_parts(model: nnx.Module, provider, *, tokens_per_input: int = 4, seed: int = 0
              ) -> dict[str, providers.Parts]:
  """PTQ parts of every decoder kernel (rules.DECODER_ONLY), from random calibration statistics."""
  stats, layers = {}, {}
  for path in rules.select(model, rules.DECODER_ONLY):
    kernel = paths.get(model, path).kernel[...]
    n = kernel.shape[0]
    if n not in stats:
      N = tokens_per_input * n
      x = jax.random.normal(jax.random.key(seed + n), (N, n), jnp.float32)
      h = 2.0 / N * x.T @ x
      stats[n] = LayerStats(h, h, N // 2, N - N // 2)
    # a uniform loss sensitivity: SAB's code path without a model-level measurement (timing only)
    layer_stats = dataclasses.replace(stats[n], sensitivity=uniform_sensitivity(stats[n], kernel.shape[1]))
    layers[path] = provider(kernel, layer_stats).parts.map(np.asarray)
  return layers


class FixedTeacher(nnx.Module):
  """A teacher whose `forward` returns precomputed logits and hidden states: the library's
  distillation step then runs without the cost of a teacher forward."""

  def __init__(self, teacher: nnx.Module, inputs):
    logits, aux = jax.block_until_ready(nnx.jit(lambda m, *x: m.forward(*x))(teacher, *inputs))
    self.logits, self.hidden = nnx.Variable(logits), nnx.Variable(aux["hidden"])

  def forward(self, *inputs):
    return self.logits[...], {"hidden": self.hidden[...]}


def make_w_hat_step(student: nnx.Module):
  """Ŵ of every BinaryDense from latent + scales, and its backward, against fixed cotangents."""
  cot = {".".join(map(str, p)): jnp.ones((m.in_features, m.out_features), jnp.float32) * 1e-3
         for p, m in nnx.iter_graph(student) if isinstance(m, binary_dense.BinaryDense)}

  @nnx.jit
  def step_fn(model, cot):
    def loss_of(m):
      return sum(jnp.vdot(d.weight(), cot[".".join(map(str, p))])
                 for p, d in nnx.iter_graph(m) if isinstance(d, binary_dense.BinaryDense))
    return nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, distill.TRAINABLE))(model)  # grads kept as outputs

  return lambda: step_fn(student, cot)[0]


def own_copy(model: nnx.Module) -> nnx.Module:
  """A clone with its own buffers: nnx.clone shares arrays, and the step donates the model's."""
  out = nnx.clone(model)
  nnx.update(out, jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.state(out)))
  return out


def n_params(model: nnx.Module, wrt) -> int:
  return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, wrt))))


def device_info() -> dict:
  d = jax.devices()[0]
  return {"device": str(d), "device_kind": getattr(d, "device_kind", ""), "platform": jax.default_backend(),
          "device_count": jax.device_count(), "host": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "flax": __import__("flax").__version__,
          "optax": optax.__version__}


def run(args) -> dict:
  cfg = llava.VARIANTS[args.variant]
  batch = synthetic_batch(cfg, args.batch, args.prompt_len, args.answer_len, seed=args.seed)
  B, L = batch["input_ids"].shape
  kd = functools.partial(distill.kd_loss, temperature=1.0, ce_weight=0.0)

  teacher = llava.Model(cfg, rngs=nnx.Rngs(args.seed))
  fp_a, fp_c = own_copy(teacher), own_copy(teacher)
  provider = SOURCES[args.source]()
  t = time.perf_counter()
  parts = ptq_parts(teacher, provider, seed=args.seed)
  build_s = time.perf_counter() - t
  student_b = distill.build_student(teacher, parts, clip=1.0)
  student_d = distill.build_student(teacher, parts, clip=1.0)
  print(f"[distill_speed] {args.variant}: {len(parts)} decoder layers binarized with {provider!r} in "
        f"{build_s:.1f} s; batch {B} x {L} tokens on {jax.devices()[0]}", flush=True)

  inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
  fixed = FixedTeacher(teacher, inputs)
  step_ce = train.make_train_step(train.answer_cross_entropy, nnx.Param)
  step_kd, step_student = train.make_train_step(kd, nnx.Param), train.make_train_step(kd, distill.TRAINABLE)
  opt = lambda m, wrt: nnx.Optimizer(m, train.make_optimizer(OPTIMIZER), wrt=wrt)
  opt_a, opt_c = opt(fp_a, nnx.Param), opt(fp_c, nnx.Param)
  opt_b, opt_d = opt(student_b, distill.TRAINABLE), opt(student_d, distill.TRAINABLE)
  runs = {
      "fp_ce": lambda: step_ce(fp_a, opt_a, None, batch),
      "student_kd": lambda: step_student(student_b, opt_b, fixed, batch),
      "fp_kd": lambda: step_kd(fp_c, opt_c, fixed, batch),
      "distill": lambda: step_student(student_d, opt_d, teacher, batch),
      "w_hat_only": make_w_hat_step(student_b),
  }
  trained = {"fp_ce": n_params(fp_a, nnx.Param), "student_kd": n_params(student_b, distill.TRAINABLE),
             "fp_kd": n_params(fp_c, nnx.Param), "distill": n_params(student_d, distill.TRAINABLE),
             "w_hat_only": n_params(student_b, distill.TRAINABLE)}

  compile_s, first_loss = {}, {}
  for name, fn in runs.items():
    t = time.perf_counter()
    first_loss[name] = float(jax.block_until_ready(fn()))
    compile_s[name] = time.perf_counter() - t
    for _ in range(args.warmup - 1):
      jax.block_until_ready(fn())
  times = {name: [] for name in runs}
  last_loss = {}
  for _ in range(args.steps):
    for name, fn in runs.items():
      t = time.perf_counter()
      loss = jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
      last_loss[name] = loss
  rows = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    rows[name] = {"label": NAMES[name], "median_s": med, "mean_s": statistics.fmean(ts), "min_s": min(ts),
                  "max_s": max(ts), "tokens_per_s": None if name == "w_hat_only" else B * L / med, "first_call_s": compile_s[name],
                  "trained_params": trained[name], "first_loss": first_loss[name],
                  "last_loss": float(last_loss[name]), "times_s": ts}
  med = {k: r["median_s"] for k, r in rows.items()}
  return {
      "what": "distillation step cost, issue 5", "date": time.strftime("%Y-%m-%d"), **device_info(),
      "variant": args.variant, "batch": B, "seq_len": L, "tokens_per_step": B * L,
      "prompt_len": args.prompt_len, "answer_len": args.answer_len,
      "source": args.source, "provider": repr(provider), "binarized_layers": len(parts),
      "ptq_build_s": build_s, "steps_timed": args.steps, "warmup": args.warmup,
      "total_params": n_params(teacher, nnx.Param),
      "ratios": {f"{a}/{b}": med[a] / med[b] for a, b in PAIRS},
      # robust to load drift on a shared machine: per-round ratios (same round = same load), and best steps
      "ratios_paired_median": {f"{a}/{b}": statistics.median(x / y for x, y in zip(times[a], times[b]))
                               for a, b in PAIRS},
      "ratios_of_min": {f"{a}/{b}": rows[a]["min_s"] / rows[b]["min_s"] for a, b in PAIRS},
      "goals": {"student_kd/fp_kd": 1.10, "distill/fp_ce": 1.45},
      "rows": rows,
  }


def table(info: dict) -> str:
  lines = [f"{info['variant']}, batch {info['batch']} x {info['seq_len']} tokens, student from {info['source']}, "
           f"{info['device']} ({info['platform']}), median of {info['steps_timed']} steps",
           "", "| step | trained params | median ms | tokens/s |", "|---|---:|---:|---:|"]
  for r in info["rows"].values():
    tps = "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    lines.append(f"| {r['label']} | {r['trained_params']:,} | {1e3 * r['median_s']:.1f} | {tps} |")
  rt, rp, rm, goal = info["ratios"], info["ratios_paired_median"], info["ratios_of_min"], info["goals"]
  lines += ["", "| ratio | of medians | median per round | of best steps | goal |", "|---|---:|---:|---:|---:|"]
  for key, label in (("student_kd/fp_kd", "(b)/(c) binarization overhead"),
                     ("distill/fp_ce", "(d)/(a) distillation vs fine-tuning"),
                     ("w_hat_only/fp_kd", "(e)/(c) Ŵ rebuild alone vs FP KD step")):
    g = f"≤ {goal[key]:.2f}" if key in goal else ""
    lines.append(f"| {label} | {rt[key]:.2f} | {rp[key]:.2f} | {rm[key]:.2f} | {g} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="demo", choices=sorted(llava.VARIANTS))
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=32, help="demo config.data.max_prompt_len")
  ap.add_argument("--answer_len", type=int, default=2, help="demo config.data.max_answer_len")
  ap.add_argument("--source", default="sab_structured", choices=sorted(SOURCES),
                  help="PTQ method whose parts initialise the student")
  ap.add_argument("--steps", type=int, default=30, help="timed steps (rounds) per configuration")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="distill_speed.json")
  args = ap.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    ap.error("--steps and --warmup must be ≥ 1")
  info = run(args)
  with open(args.out, "w") as f:
    json.dump(info, f, indent=1)
  print(table(info), flush=True)
  return info


if __name__ == "__main__":
  main()
