"""What asking one question costs (`python -m sab_jax.ask`): the FP teacher vs its packed export.

  python experiments/benchmarks/ask_latency.py [--export=workdir/demo/exports/sab] [--out ask_latency_cpu2.json]

In one process, for the demo's full-precision teacher (experiments/teacher/demo) and a
packed `sab` export of it, through `sab_jax.ask` exactly as the command runs:
  load    `ask.load` until every array is on the device;
  first   load + compile + the first answer (what one `python -m sab_jax.ask` call waits for,
          less the imports);
  warm    median of `--repeats` further answers to the same question (image decode,
          preprocessing, prompt, greedy decoding, detokenisation).
The FP teacher is timed first, after a warm-up op that starts the JAX backend; no persistent
compilation cache (JAX_COMPILATION_CACHE_DIR unset), so "first" includes XLA compilation.
Without `--export`, the export is made here in a temporary directory by the pipeline's own
stages (`teacher`, `calibrate`, `binarize`, `export` of experiments/configs/demo.py with
`quant.methods=("sab",)` and no variants), reading the built synthetic_vqa/small dataset
(TFDS_DATA_DIR or ~/tensorflow_datasets, built on first use). Prints a table and writes JSON
with the machine info next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from PIL import Image

from sab_jax import ask, config_utils, stages
from sab_jax.data import synthetic_vqa
from sab_jax.serve import packed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEACHER = os.path.join(REPO, "experiments", "teacher", "demo")


def make_export(directory: str) -> str:
  """The demo pipeline's `sab` export of the shipped teacher, written under `directory`; its path."""
  config = config_utils.load_config("demo")
  config.stages = ("teacher", "calibrate", "binarize", "export")
  config.quant.methods, config.quant.variants, config.quant.progress = ("sab",), {}, False
  ctx = stages.Context(config, directory)
  for name in config.stages:
    t = time.time()
    stages.STAGES[name](ctx)
    print(f"  [{name}] {time.time() - t:.1f} s", flush=True)
  return os.path.join(directory, ctx.results["methods"]["sab"]["export_dir"])


def _ready(asker: ask.Asker) -> None:
  jax.block_until_ready(jax.tree.leaves(nnx.state(asker.model)))


def time_model(path: str, image: str, question: str, repeats: int, max_new_tokens: int) -> dict:
  t0 = time.perf_counter()
  asker = ask.load(path)
  _ready(asker)
  load_s = time.perf_counter() - t0
  (answer,) = asker.answer([ask.read_image(image)], [question], max_new_tokens=max_new_tokens)
  first_s = time.perf_counter() - t0
  warm = []
  for _ in range(repeats):
    t = time.perf_counter()
    (again,) = asker.answer([ask.read_image(image)], [question], max_new_tokens=max_new_tokens)
    warm.append(time.perf_counter() - t)
    assert again == answer
  leaves = jax.tree.leaves(nnx.state(asker.model, (nnx.Param, packed.Packed)))
  modes = sorted({m.mode for _, m in nnx.iter_graph(asker.model) if isinstance(m, packed.PackedDense)})
  return {"path": os.path.relpath(path, REPO) if path.startswith(REPO) else path, "kind": asker.kind,
          "packed_modes": modes, "device_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
          "load_s": load_s, "first_answer_s": first_s, "warm_median_s": statistics.median(warm),
          "warm_min_s": min(warm), "warm_max_s": max(warm), "answer": answer, "max_new_tokens": max_new_tokens}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--export", help="an existing packed export (e.g. workdir/demo/exports/sab); default: make one")
  ap.add_argument("--teacher", default=TEACHER)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--max_new_tokens", type=int, default=config_utils.load_config("demo").data.max_answer_len,
                  help="the same answer budget for both models (default: the demo's, as its evaluation)")
  ap.add_argument("--out", default=os.path.join(HERE, "ask_latency_cpu2.json"))
  args = ap.parse_args()
  jnp.zeros(1).block_until_ready()  # the backend starts outside every timing
  record = next(synthetic_vqa.generate_split("test", 1, start=2))
  with tempfile.TemporaryDirectory() as tmp:
    image = os.path.join(tmp, "scene.png")
    Image.fromarray(record["image"]).save(image)
    export_made_s = None
    if args.export:
      export = args.export
    else:
      print("making the sab export with the demo pipeline's stages ...", flush=True)
      t = time.time()
      export = make_export(os.path.join(tmp, "wd"))
      export_made_s = time.time() - t
    rows = {name: time_model(path, image, record["question"], args.repeats, args.max_new_tokens)
            for name, path in (("fp", args.teacher), ("packed", export))}
  fp, pk = rows["fp"], rows["packed"]
  ratios = {k: pk[k] / fp[k] for k in ("load_s", "first_answer_s", "warm_median_s", "device_bytes")}
  d = jax.devices()[0]
  info = {"what": "sab_jax.ask latency, FP teacher vs packed sab export (issue 17)", "date": time.strftime("%Y-%m-%d"),
          "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__,
          "backend": jax.default_backend(), "device": str(d), "device_kind": getattr(d, "device_kind", ""),
          "question": record["question"], "truth": record["answer"], "repeats": args.repeats,
          "export": "made in this run (demo pipeline, sab)" if export_made_s is not None else args.export,
          "export_made_s": export_made_s, "rows": rows, "ratios_packed_over_fp": ratios}
  print(f"\n{info['question']!r} (truth {info['truth']!r}); {info['cpu_count']} CPUs, jax {info['jax']}, "
        f"{info['backend']}\n")
  print("| model | load (s) | first answer (s) | warm answer, median (ms) | device bytes | answer |")
  print("|---|---|---|---|---|---|")
  for name, r in rows.items():
    label = name + (f" ({', '.join(r['packed_modes'])})" if r["packed_modes"] else "")
    print(f"| {label} | {r['load_s']:.2f} | {r['first_answer_s']:.2f} | {1000 * r['warm_median_s']:.1f} | "
          f"{r['device_bytes']:,} | {r['answer']} |")
  print(f"| packed / fp | {ratios['load_s']:.2f} | {ratios['first_answer_s']:.2f} | {ratios['warm_median_s']:.2f} | "
        f"{ratios['device_bytes']:.3f} | |")
  with open(args.out, "w") as f:
    json.dump(info, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
