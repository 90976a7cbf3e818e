"""Bytes written by the packed export of a 7B-shaped LVLM (LLaVA-1.5, Qwen2.5-VL) vs its FP16 size.

No real weights are needed to count bytes: the model is built abstractly
(`nnx.eval_shape`, nothing materialised), every binarized Dense layer gets parts with
exactly the structured-SAB layout (`Sab(structured=True)`: sign plane, residual plane on
`round(salient_rows · scale_block)` salient input rows per group, salient-row flags,
alpha_in [in,2], alpha_out [groups,3,out]) drawn from random numbers
(`synthetic_structured_sab`; tests/integration/test_export_size.py checks it against the real
provider on a small kernel), and every other param random bf16 values. The synthetic parts
put `round(salient_rows · scale_block)` rows in every group; the provider's default
(`salient_budget="layer"`) spreads the same total over the groups by need, which writes the
same bytes (flags are a bitmap; the residual plane and alpha_in are compacted to the
salient rows, whose total is the same) and moves the formula only in the position-list bits. Running the real
binarizer on 7B takes hours on a CPU (binarize_speed.py) and would not change a byte.

All sizes come from what `writer.export` writes: `binarized_bytes` and `params_bytes`
(nbytes of the arrays handed to orbax) and `model_bytes` (every file on disk under the
export directory, i.e. after orbax's compression, plus metadata and manifest). FP16 size:
2 bytes × every parameter of the model.

Configurations (rows):
  a  decoder linear layers binarized, everything else bf16 (the papers' setting);
  b  a + token embeddings and lm_head int8 (one bf16 scale per row / output channel);
  c  b + vision tower and projector linear layers binarized (same layout).

Memory: the layers are generated one at a time while `export` iterates them (a lazy
Mapping), so only the packed parts of all layers (~1 GB for 7B) and the non-binarized
bf16 params are held, never a float kernel. Exports go to a temporary directory that is
deleted after measuring (`--keep` to keep it).

Hugging Face export (`--hf`): after configuration a's packed export, also writes its Hugging
Face export (`sab_jax.export.hf`, every binarized kernel dequantized to bf16; source names: a
directory holding only `hf.config_to_hf(cfg)` as config.json, i.e. the new key layout) and
records its bytes on disk and seconds next to the packed export's and FP16. That file is as
large as FP16 by design (it exists for harnesses that load Hugging Face checkpoints); it is
written to the work directory and deleted after measuring (unless `--keep`).

`--time_import=HF_DIR` (a run of its own, after `--hf --keep --workdir=W` left `W/hf`): reads the
Hugging Face checkpoint back with `sab_jax.models.hf.from_pretrained` (bf16 params, no mesh) and adds
its seconds and this process's peak RSS to the JSON `--out` names (a fresh process, so the RSS is
the import's alone; the export run holds ~11 GiB of its own at 7B).

  python experiments/benchmarks/export_size.py [--variant llava-1.5-7b|qwen2.5-vl-7b|...] [--configs a,b,c]
      [--hf] [--keep --workdir=W]
  python experiments/benchmarks/export_size.py --time_import=W/hf --out=export_size_<variant>_hf.json

Prints a table and writes JSON (default: export_size_<variant>.json next to this file;
export_size_<variant>_hf.json with `--hf`).
Needs only jax/flax/orbax/numpy (not ml-collections, tfds or grain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import tempfile
import time
import zlib
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sab_jax import export as export_lib
from sab_jax.export import hf as hf_export
from sab_jax.models import hf as hf_models
from sab_jax.models import families, paths
from sab_jax.quant import providers, rules
from sab_jax.quant.core import bits_core
from sab_jax.quant.providers import base, salient_split

DECODER = r"language_model\.layers\..*"
INT8 = (r"language_model\.embed_tokens\.embedding", r"lm_head\.kernel")
CONFIGS = {
    "a": {"description": "decoder linears binarized (structured SAB), rest bf16",
          "rules": ((DECODER, True), (r".*", False)), "int8": False},
    "b": {"description": "a + embeddings and lm_head int8",
          "rules": ((DECODER, True), (r".*", False)), "int8": True},
    "c": {"description": "b + vision tower and projector linears binarized",
          "rules": ((DECODER, True), (r"vision_tower\..*", True), (r"multi_modal_projector\..*", True),
                    (r".*", False)), "int8": True},
}


def _random_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Uniform random bools, one random bit each (8x cheaper than comparing floats)."""
  n = math.prod(shape)
  by = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
  return np.unpackbits(by)[:n].view(bool).reshape(shape)


def _random_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Positive bf16 scales around 0.01 (their values do not change a byte)."""
  return (0.01 * rng.lognormal(0.0, 0.5, size=shape)).astype(ml_dtypes.bfloat16)


def synthetic_structured_sab(shape: tuple[int, int], provider: providers.Sab,
                             rng: np.random.Generator) -> providers.Binarized:
  """A Binarized with the parts layout of `provider` (structured SAB / ARB-RC) from random
  numbers; `w_hat` is abstract (export it with verify=False).

  Same group size, salient-row budget (min(budget, real rows) per group, as `_top_rows`
  picks) and bit count (`bits_core.salient_split_bits`) as `salient_split.salient_split_ptq`;
  sparse parts hold their fill values where the provider leaves them (residual_signs
  False and alpha_in[:, 1] 1.0 off the salient rows).
  """
  if not getattr(provider, "structured", False) or not isinstance(provider, (providers.Sab, providers.ArbRc)):
    raise ValueError(f"{provider!r} is not a structured SAB / ARB-RC provider")
  n_in, n_out = shape
  _, group = base.effective_blocks(n_in, provider.block_size, provider.scale_block)
  budget = salient_split.salient_count(provider.layout_salient_rows, group, structured=True)
  rows = bits_core.block_rows(n_in, group)
  salient = np.zeros(n_in, bool)
  per_group = []
  for g, r in enumerate(rows):
    k = min(budget, r)
    salient[g * group + rng.choice(r, k, replace=False)] = True
    per_group.append(k)
  residual = np.zeros((n_in, n_out), bool)
  residual[salient] = _random_bits(rng, (int(salient.sum()), n_out))
  alpha_in = _random_scales(rng, (n_in, 2))
  alpha_in[~salient, 1] = 1.0
  parts = provider.from_arrays({"signs": _random_bits(rng, (n_in, n_out)), "residual_signs": residual,
                                "salient_rows": salient, "alpha_in": alpha_in,
                                "alpha_out": _random_scales(rng, (len(rows), 3, n_out))})
  bits = bits_core.salient_split_bits(n_in, n_out, block_rows=rows, salient_per_block=per_group, mode="rc",
                                      split=False)
  return providers.Binarized(jax.ShapeDtypeStruct((n_in, n_out), jnp.float32), bits.nominal_bits,
                             bits.stored_bits, parts, {})


class SyntheticLayers(Mapping):
  """{dense path: Binarized}, each built on access (deterministic per path), so `export`
  holds one layer's unpacked parts at a time. `seconds` accumulates generation time."""

  def __init__(self, shapes: Mapping[str, tuple[int, int]], provider: providers.Sab, seed: int):
    self.shapes, self.provider, self.seed = dict(shapes), provider, seed
    self.seconds = 0.0

  def __getitem__(self, path: str) -> providers.Binarized:
    t = time.perf_counter()
    rng = np.random.default_rng([self.seed, zlib.crc32(path.encode())])
    b = synthetic_structured_sab(self.shapes[path], self.provider, rng)
    self.seconds += time.perf_counter() - t
    return b

  def __iter__(self) -> Iterator[str]:
    return iter(self.shapes)

  def __len__(self) -> int:
    return len(self.shapes)


def abstract_model(cfg: Any) -> nnx.Module:
  """The model with every Param a ShapeDtypeStruct (nothing allocated)."""
  return families.abstract(cfg)


def fill_params(model: nnx.Module, skip: set[str], seed: int) -> int:
  """Sets every Param not in `skip` to random bf16 values (std 0.02); returns their count."""
  rng = np.random.default_rng(seed)
  n = 0
  for path, var in paths.params(model).items():
    if path in skip:
      continue
    shape = tuple(var.get_value().shape)
    var.set_value((0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16))
    n += math.prod(shape)
  return n


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


def time_import(hf_dir: str) -> dict[str, Any]:
  """`hf.from_pretrained(hf_dir)` (bf16 params, no mesh): seconds and this process's peak RSS."""
  t = time.perf_counter()
  model = hf_models.from_pretrained(hf_dir, param_dtype=jnp.bfloat16)
  seconds = time.perf_counter() - t
  n = sum(math.prod(v.get_value().shape) for v in paths.params(model).values())
  return {"import_s": seconds, "import_peak_rss_gib": _peak_rss_gib(), "imported_type": type(model).__name__,
          "imported_params": n, "imported_from": hf_dir}


def hf_row(cfg: Any, export_dir: str, workdir: str, packed: Mapping[str, Any], *,
           keep: bool = False) -> dict[str, Any]:
  """Writes the Hugging Face export of `export_dir` to `workdir/hf` and measures it next to `packed` (its row)."""
  source = os.path.join(workdir, "hf_source")
  os.makedirs(source, exist_ok=True)
  with open(os.path.join(source, "config.json"), "w") as f:
    json.dump(hf_models.config_to_hf(cfg), f, indent=1)
  out = os.path.join(workdir, "hf")
  t = time.perf_counter()
  info = hf_export.export_hf(export_dir, out, source=source, overwrite=True)
  seconds = time.perf_counter() - t
  n_tensors = len(hf_models.open_checkpoint(out))  # the headers read back
  row = {
      "config": packed["config"], "packed_bytes": packed["model_bytes"], "hf_bytes": info["bytes"],
      "hf_tensor_bytes": info["tensor_bytes"], "hf_tensors": n_tensors, "fp16_bytes": packed["fp16_bytes"],
      "hf_over_fp16": info["bytes"] / packed["fp16_bytes"],
      "packed_over_fp16": packed["model_bytes"] / packed["fp16_bytes"],
      "packed_export_s": packed["export_s"], "hf_export_s": seconds,
      "hf_read_s": info["read_s"],  # reader.read(lazy=True): restore and checks
      "hf_write_s": seconds - info["read_s"],  # decode, dequantize, bf16, transpose, write (a layer at a time)
      "config_round_trips": hf_models.read_config(out) == cfg,
      "peak_rss_gib_so_far": _peak_rss_gib(),
  }
  if not keep:
    shutil.rmtree(out)
  print(f"[{row['config']} hf] {row['hf_bytes'] / 1e9:.3f} GB on disk ({n_tensors} bf16 tensors) vs packed "
        f"{row['packed_bytes'] / 1e9:.3f} GB and FP16 {row['fp16_bytes'] / 1e9:.3f} GB; {seconds:.1f} s, peak RSS "
        f"{row['peak_rss_gib_so_far']:.2f} GiB", flush=True)
  return row


def run(variant: str, configs: list[str], workdir: str, *, seed: int = 0, keep: bool = False,
        provider: providers.Sab | None = None, hf: bool = False) -> dict[str, Any]:
  """Exports `variant` once per configuration into `workdir/<config>` (with `hf`, configuration a's
  Hugging Face export too); returns the report."""
  provider = provider or providers.Sab(structured=True)
  cfg = families.VARIANTS[variant]
  t = time.perf_counter()
  model = abstract_model(cfg)
  params = paths.params(model)
  dense = dict(paths.dense_layers(model))
  total_params = sum(math.prod(v.get_value().shape) for v in params.values())
  chosen = {c: rules.select(model, CONFIGS[c]["rules"]) for c in configs}
  always = set.intersection(*(set(v) for v in chosen.values()))
  filled = fill_params(model, {f"{p}.kernel" for p in always}, seed)
  setup_s = time.perf_counter() - t
  print(f"{variant}: {total_params:,} params ({filled:,} filled with random bf16) in {setup_s:.1f} s",
        flush=True)

  rows, hf_rows = [], []
  for c in configs:
    spec = CONFIGS[c]
    layers = SyntheticLayers({p: tuple(dense[p].kernel.get_value().shape) for p in chosen[c]}, provider, seed)
    int8 = [r for r in INT8 if any(re.fullmatch(r, p) for p in params)] if spec["int8"] else []
    directory = os.path.join(workdir, c)
    t = time.perf_counter()
    out = export_lib.export(model, layers, "sab_structured_synthetic", provider, directory, overwrite=True,
                            verify=False, int8_params=int8,
                            config={"benchmark": "export_size", "variant": variant, "configuration": c,
                                    "weights": "random, structured-SAB layout", "seed": seed})
    export_s = time.perf_counter() - t
    manifest = export_lib.read_manifest(directory)
    dec = [l for l in manifest["layers"] if l["path"].startswith("language_model.layers.")]
    dec_bytes = sum(l["bits"]["stored_bytes"] for l in dec)
    dec_n = sum(l["bits"]["n_weights"] for l in dec)
    dec_formula = sum(l["bits"]["formula_stored_bits"] for l in dec)
    fp16 = 2 * total_params
    row = {
        "config": c, "description": spec["description"], "rules": [list(r) for r in spec["rules"]],
        "int8_params": int8, "binarized_layers": len(chosen[c]),
        "binarized_weights": out["binarized_weights"], "binarized_bytes": out["binarized_bytes"],
        "params_bytes": out["params_bytes"], "arrays_bytes": out["binarized_bytes"] + out["params_bytes"],
        "model_bytes": out["model_bytes"], "fp16_bytes": fp16,
        "reduction_pct": 100 * (1 - out["model_bytes"] / fp16),
        "arrays_reduction_pct": 100 * (1 - (out["binarized_bytes"] + out["params_bytes"]) / fp16),
        "binarized_bits_per_weight": out["bits_per_weight"],
        "binarized_formula_bits_per_weight": out["formula_bits_per_weight"],
        "decoder_weights": dec_n, "decoder_bytes": dec_bytes,
        "decoder_bits_per_weight": 8 * dec_bytes / dec_n if dec_n else None,
        "decoder_formula_bits_per_weight": dec_formula / dec_n if dec_n else None,
        "export_s": export_s, "synthetic_parts_s": layers.seconds,
        "peak_rss_gib_so_far": _peak_rss_gib(),
    }
    rows.append(row)
    print(f"[{c}] {row['model_bytes'] / 1e9:.3f} GB on disk vs {fp16 / 1e9:.3f} GB FP16 "
          f"({row['reduction_pct']:.2f}% smaller), export {export_s:.1f} s, peak RSS "
          f"{row['peak_rss_gib_so_far']:.2f} GiB", flush=True)
    if hf and c == "a":
      hf_rows.append(hf_row(cfg, directory, workdir, row, keep=keep))
    if not keep:
      shutil.rmtree(directory)

  return {
      "benchmark": "export_size", "variant": variant, "provider": repr(provider),
      "weights": "random numbers with the structured-SAB parts layout (not a trained model); "
                 "non-binarized params random bf16",
      "sizes": "bytes written by sab_jax.export.writer.export (arrays: nbytes; model_bytes: files on disk)",
      "total_params": total_params, "setup_s": setup_s,
      "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__, "rows": rows,
      **({"hf_rows": hf_rows, "hf": "sab_jax.export.hf: binarized kernels dequantized to bf16, other params bf16; "
                                    "bytes = every file written (safetensors, config, provenance)"} if hf else {}),
  }


def table(report: Mapping[str, Any]) -> str:
  """Markdown table of a report: arrays = binarized + params bytes (uncompressed nbytes,
  comparable to FP16's 2 bytes per param); disk = every file of the export."""
  lines = [("| config | binarized bytes | params bytes | arrays bytes | disk bytes | FP16 bytes | "
            "reduction (arrays) | reduction (disk) | decoder bits/w (bytes) | export s |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in report["rows"]:
    dec = "-" if r["decoder_bits_per_weight"] is None else f"{r['decoder_bits_per_weight']:.4f}"
    lines.append(f"| {r['config']}: {r['description']} | {r['binarized_bytes']:,} | {r['params_bytes']:,} | "
                 f"{r['arrays_bytes']:,} | {r['model_bytes']:,} | {r['fp16_bytes']:,} | "
                 f"{r['arrays_reduction_pct']:.2f}% | {r['reduction_pct']:.2f}% | {dec} | {r['export_s']:.1f} |")
  if report.get("hf_rows"):
    lines += ["", "| config | packed bytes (disk) | Hugging Face export bytes (disk) | FP16 bytes | HF / FP16 | "
              "packed export s | HF export s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["hf_rows"]:
      lines.append(f"| {r['config']} | {r['packed_bytes']:,} | {r['hf_bytes']:,} | {r['fp16_bytes']:,} | "
                   f"{r['hf_over_fp16']:.4f} | {r['packed_export_s']:.1f} | {r['hf_export_s']:.1f} |")
  return "\n".join(lines)


def _default_out(variant: str, hf: bool = False) -> str:
  tag = variant.replace("llava-1.5-", "llava").replace("qwen2.5-vl-", "qwen25vl").replace("-", "").replace(".", "")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"export_size_{tag}{'_hf' if hf else ''}.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--variant", default="llava-1.5-7b", choices=sorted(families.VARIANTS))
  ap.add_argument("--configs", default="a,b,c", help="comma-separated subset of " + ",".join(CONFIGS))
  ap.add_argument("--workdir", default=None, help="where exports are written (default: a new temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the exports")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--hf", action="store_true",
                  help="also write configuration a's Hugging Face export (sab_jax.export.hf) and measure it")
  ap.add_argument("--time_import", default=None, metavar="HF_DIR",
                  help="only time hf.from_pretrained(HF_DIR) and add it to the JSON --out names")
  ap.add_argument("--out", default=None,
                  help="JSON path (default: export_size_<variant>.json next to this file, _hf.json with --hf)")
  args = ap.parse_args(argv)
  if args.time_import:
    if not args.out or not os.path.exists(args.out):
      ap.error("--time_import adds to an existing report: pass --out=THE_JSON of the --hf run")
    with open(args.out) as f:
      report = json.load(f)
    report["import"] = time_import(args.time_import)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    print(json.dumps(report["import"], indent=1))
    return report
  configs = args.configs.split(",")
  unknown = [c for c in configs if c not in CONFIGS]
  if unknown:
    ap.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
  if args.hf and "a" not in configs:
    ap.error("--hf writes the Hugging Face export of configuration a: include a in --configs")
  workdir = args.workdir or tempfile.mkdtemp(prefix="export_size_")
  os.makedirs(workdir, exist_ok=True)
  try:
    report = run(args.variant, configs, workdir, seed=args.seed, keep=args.keep, hf=args.hf)
  finally:
    if not args.keep and args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  out = args.out or _default_out(args.variant, args.hf)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print()
  print(table(report))
  print(f"\nJSON: {out}")
  return report


if __name__ == "__main__":
  main()
