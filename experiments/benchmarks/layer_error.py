"""Layer output error of every method on synthetic layers: the fidelity benchmark (issue 14).

Per layer and method: `tr(ΔᵀHΔ)/tr(WᵀHW)` (Δ = W − Ŵ, H = 2/N XᵀX over all calibration
rows, float64), stored bits per weight (`Binarized.stored_bits`, the formula the exporter's
bytes track), nominal bits, the salient rows per block, and the binarization time.

Layers, our layout `[in, out]`, seeded:
  * `ref_*`: the layers the authors' code was measured on (RESULTS.md): weights student-t
    (df 3) × 0.02 with 2% of input channels × 5; inputs 2048 rows of low-rank mixing + noise,
    lognormal channel scales, 1% of channels × 10. Shapes (their out×in) 256×512,
    384×768, 512×512.
  * `llama_*`: Llama-7B-shaped kernels (4096×4096, 4096×11008, 11008×4096), random the same
    way (`--llama`; minutes per method on a CPU).
Every method gets H = 2/N XᵀX of all rows as text tokens (no image tokens, so SAB's Λ is
constant and SAB = ARB-RC up to rounding); GPTQ damping 0.01·mean diag, blocks of 128.

  python experiments/benchmarks/layer_error.py --out layer_error_cpu2.json [--llama]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.quant import providers
from sab_jax.quant.providers import base

N_TOKENS = 2048
REF_SHAPES = {"ref_256x512": (256, 512, 1000), "ref_384x768": (384, 768, 1001), "ref_512x512": (512, 512, 1002)}
LLAMA_SHAPES = {"llama_4096x4096": (4096, 4096, 7), "llama_4096x11008": (11008, 4096, 8),
                "llama_11008x4096": (4096, 11008, 9)}  # (out, in, seed) as the reference files name them

METHODS = {
    "xnor": providers.Xnor(),
    "pbllm": providers.PbLlm(),
    "billm": providers.BiLLM(),
    "billm_fixed8": providers.BiLLM(salient_rows=0.08),
    "arb_rc": providers.ArbRc(),
    "arb_rc_one_group": providers.ArbRc(salient_groups=False),
    "arb_rc_one_group_norefine": providers.ArbRc(salient_groups=False, refine_iters=0),
    "arb_rc_fixed8_one_group_norefine": providers.ArbRc(salient_rows=0.08, salient_groups=False, refine_iters=0),
    # a lone layer has no model loss: SAB's paper-as-written map (the loss-calibrated one needs
    # the model's significance pass, paired_draws.py)
    "sab": providers.Sab(significance="hessian"),
    "sab_structured": providers.Sab(structured=True, significance="hessian", salient_budget="layer"),
    "sab_structured_group_budget": providers.Sab(structured=True, significance="hessian", salient_budget="group"),
    "arb_rc_structured": providers.ArbRc(structured=True),
}


def make_layer(out_f: int, in_f: int, seed: int, tokens: int = N_TOKENS) -> tuple[np.ndarray, np.ndarray]:
  """(W `[in, out]`, X `[tokens, in]`) of a heavy-tailed layer with outlier channels."""
  rng = np.random.default_rng(seed)
  w = rng.standard_t(df=3, size=(out_f, in_f)) * 0.02
  w[:, np.sort(rng.choice(in_f, max(1, round(0.02 * in_f)), replace=False))] *= 5.0
  r = max(8, in_f // 16)
  x = rng.standard_normal((tokens, r)) @ (rng.standard_normal((r, in_f)) / np.sqrt(r))
  x = x + 0.5 * rng.standard_normal((tokens, in_f))
  x *= np.exp(0.5 * rng.standard_normal(in_f))[None, :]
  x[:, np.sort(rng.choice(in_f, max(2, round(0.01 * in_f)), replace=False))] *= 10.0
  return w.T.astype(np.float32).copy(), x.astype(np.float32)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
  d = w.astype(np.float64) - np.asarray(w_hat, np.float64)
  return float(np.sum(d * (h @ d)) / np.sum(w.astype(np.float64) * (h @ w.astype(np.float64))))


def salient_per_block(parts: base.Parts, block: int = 128) -> list[int] | None:
  sal = getattr(parts, "salient_rows", None)
  if sal is None:
    return None
  sal = np.asarray(sal)
  return [int(sal[i:i + block].sum()) for i in range(0, len(sal), block)]


def run(layers: dict[str, tuple[int, int, int]], methods: dict[str, object]) -> list[dict]:
  rows = []
  for lname, (out_f, in_f, seed) in layers.items():
    w, x = make_layer(out_f, in_f, seed)
    h = 2.0 / len(x) * x.astype(np.float64).T @ x.astype(np.float64)
    h32 = jnp.asarray(h, jnp.float32)
    stats = base.LayerStats(h32, jnp.zeros_like(h32), len(x), 0)
    for mname, provider in methods.items():
      t = time.perf_counter()
      b = provider(jnp.asarray(w), stats)
      jax.block_until_ready(b.w_hat)
      seconds = time.perf_counter() - t
      row = {"layer": lname, "shape_in_out": [in_f, out_f], "method": mname, "provider": repr(provider),
             "output_error": output_error(w, b.w_hat, h), "stored_bits_per_weight": b.bits_per_weight,
             "nominal_bits": b.nominal_bits, "salient_rows_per_block": salient_per_block(b.parts),
             "seconds": seconds}
      rows.append(row)
      print(f"{lname:18s} {mname:24s} err {row['output_error']:.5f}  stored {row['stored_bits_per_weight']:.3f} b/w  "
            f"nominal {row['nominal_bits']:.3f}  {seconds:6.1f} s", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="JSON file for the rows")
  ap.add_argument("--llama", action="store_true", help="also the Llama-7B-shaped layers (slow on a CPU)")
  ap.add_argument("--only_llama", action="store_true", help="only the Llama-7B-shaped layers")
  ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  args = ap.parse_args()
  layers = {} if args.only_llama else dict(REF_SHAPES)
  if args.llama or args.only_llama:
    layers.update(LLAMA_SHAPES)
  methods = {k: METHODS[k] for k in args.methods.split(",")}
  rows = run(layers, methods)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"what": "layer output error per method, issue 14", "date": time.strftime("%Y-%m-%d"),
                 "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
