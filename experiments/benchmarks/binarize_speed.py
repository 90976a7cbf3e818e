"""Calibration + binarization time per Llama-7B-shaped decoder layer, extrapolated to 32 layers.

Random weights (std 0.02) and Hessians from random correlated activations: no real
weights are needed to time the algorithm. Calibration (the Hessians) is a GEMM whose
cost is linear in the token count, so it is timed on `--tokens` tokens and scaled to
`--calib_tokens` (default: 128 samples x 2048 tokens, the papers' setting).

  python experiments/benchmarks/binarize_speed.py [--methods sab,arb_rc] [--out speed.json]

Times include XLA compilation for the first linear of each shape (q, o, gate, down);
k, v and up reuse the compiled code. Prints a table and writes JSON. Runs on CPU or GPU (needs only jax/flax/numpy, not
ml-collections, tfds or grain).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp

from sab_jax import sharding
from sab_jax.calib import hessian
from sab_jax.quant import providers
from sab_jax.quant.providers.base import uniform_sensitivity

# One Llama-7B decoder layer (LLaVA-1.5-7B's language model): linears sharing an input share a Hessian.
LAYER = {  # name: (in, out, hessian group)
    "q_proj": (4096, 4096, "attn_in"), "k_proj": (4096, 4096, "attn_in"), "v_proj": (4096, 4096, "attn_in"),
    "o_proj": (4096, 4096, "attn_out"), "gate_proj": (4096, 11008, "mlp_in"), "up_proj": (4096, 11008, "mlp_in"),
    "down_proj": (11008, 4096, "mlp_out"),
}


def _activations(key, tokens, d):
  """Correlated activations with a few outlier channels, as LLM inputs have."""
  k1, k2, k3 = jax.random.split(key, 3)
  z = jax.random.normal(k1, (tokens, d), jnp.float32)
  mix = jnp.eye(d) + jax.random.normal(k2, (d, 64), jnp.float32) @ jax.random.normal(k3, (64, d)) / 16
  scale = jnp.where(jnp.arange(d) % 512 == 0, 20.0, 1.0)
  return (z @ mix) * scale


def _block(x):
  return jax.block_until_ready(x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--methods", default="xnor,pbllm,billm,arb_rc,sab,sab_structured")
  ap.add_argument("--tokens", type=int, default=4096, help="tokens actually pushed through the Hessian GEMM")
  ap.add_argument("--calib_tokens", type=int, default=128 * 2048, help="tokens the timing is scaled to")
  ap.add_argument("--layers", type=int, default=32)
  ap.add_argument("--out", default="binarize_speed.json")
  args = ap.parse_args()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  key = jax.random.key(0)

  # --- calibration: modality-split Hessians, one per distinct layer input ---------------------
  stats, calib_s = {}, {}
  for group, d in (("attn_in", 4096), ("attn_out", 4096), ("mlp_in", 4096), ("mlp_out", 11008)):
    x = _activations(jax.random.fold_in(key, d + len(group)), args.tokens, d)[None]
    vis = (jnp.arange(args.tokens) < args.tokens * 3 // 4).astype(jnp.float32)[None]  # 3/4 image tokens
    acc = hessian.Accumulator()
    acc.add(x, 1 - vis, vis, mesh)                 # compile
    _block(acc.sum_text)
    acc = hessian.Accumulator()
    t = time.perf_counter()
    acc.add(x, 1 - vis, vis, mesh)
    _block(acc.sum_text)
    calib_s[group] = (time.perf_counter() - t) * args.calib_tokens / args.tokens
    stats[group] = acc.stats()
    del x

  # --- binarization, per method ------------------------------------------------------------
  rows = []
  for name in args.methods.split(","):
    method, opts = (("sab", {"structured": True}) if name == "sab_structured" else (name, {}))
    provider = providers.METHODS[method](**opts)
    per_linear, bits, numel = {}, 0, 0
    for lin, (din, dout, group) in LAYER.items():
      w = 0.02 * jax.random.normal(jax.random.fold_in(key, din * 7 + dout + len(lin)), (din, dout), jnp.float32)
      t = time.perf_counter()  # the first linear of each shape includes compilation
      # SAB's loss sensitivity comes from the model (`calib.sensitivity`, timed by
      # significance_cost.py); here a uniform one, which runs the same code path
      out = provider(w, dataclasses.replace(stats[group], sensitivity=uniform_sensitivity(stats[group], dout)))
      _block(out.w_hat)
      per_linear[lin] = time.perf_counter() - t
      bits += out.stored_bits
      numel += din * dout
    binarize = sum(per_linear.values())
    calib = sum(calib_s.values())
    rows.append({"method": name, "calibration_s_per_layer": calib, "binarize_s_per_layer": binarize,
                 "per_linear_s": per_linear, "total_min_32_layers": (calib + binarize) * args.layers / 60,
                 "stored_bits_per_weight": bits / numel})
    print(f"{name:15s} calib {calib:8.2f} s  binarize {binarize:8.2f} s  -> {rows[-1]['total_min_32_layers']:7.1f} "
          f"min for {args.layers} layers  ({bits / numel:.3f} stored bits/weight)", flush=True)

  info = {"device": str(jax.devices()[0]), "platform": jax.default_backend(), "host": platform.processor() or
          platform.machine(), "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
          "tokens_timed": args.tokens, "calib_tokens": args.calib_tokens, "rows": rows}
  with open(args.out, "w") as f:
    json.dump(info, f, indent=1)
  print("\n| method | calibration s/layer | binarization s/layer | 32 layers (min) | stored bits/w |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['method']} | {r['calibration_s_per_layer']:.2f} | {r['binarize_s_per_layer']:.2f} | "
          f"{r['total_min_32_layers']:.1f} | {r['stored_bits_per_weight']:.3f} |")


if __name__ == "__main__":
  main()
