"""What int8 activations (the popcount kernel's approximation) cost in VQA accuracy.

  python experiments/benchmarks/int8_activations_quality.py --workdir=workdir/demo \
      [--config=experiments/configs/demo.py[:ARG]] [--out int8_activations_demo.json]

Every export of the run that the fused kernel covers (XNOR, structured SAB / ARB-RC, and
their distilled `_kd` versions) is evaluated on the whole test split twice: exactly
(`mode="dequant"`, what the `eval` stage reports on CPU) and with
`activations="int8"` (each plane's input quantized per 128-input chunk; on CPU the XLA
twin of the kernel, `packed_layer.int8_reference`, which the tests tie to the kernel).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from sab_jax import config_utils, stages
from sab_jax.data import synthetic_vqa
from sab_jax.eval import vqa
from sab_jax import export as export_lib
from sab_jax.serve import packed


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True, help="a finished run of sab_jax.main (its exports/ and results.json)")
  ap.add_argument("--config", default="experiments/configs/demo.py")
  ap.add_argument("--out", default="int8_activations_demo.json")
  ap.add_argument("--max_examples", type=int, default=None)
  args = ap.parse_args()
  config = config_utils.load_config(args.config)
  ctx = stages.Context(config, args.workdir)
  with open(os.path.join(args.workdir, "results.json")) as f:
    results = json.load(f)
  entries = {**results.get("methods", {}), **results.get("variants", {})}
  rows = {}
  for name, entry in sorted(entries.items()):
    directory = os.path.join(args.workdir, entry.get("export_dir", "-"))
    if not os.path.isdir(directory):
      continue
    _, layers, _ = export_lib.read(directory, ctx.abstract_model())
    if any(parts.planes() is None for parts in layers.values()):  # a layout the kernels do not serve
      continue
    row = {}
    for label, kw in (("exact", dict(mode="dequant")),
                      ("int8", dict(mode="kernel", kernel="fused", activations="int8"))):
      model, _ = packed.from_export(directory, ctx.new_model(), **kw)
      t = time.time()
      batches = ctx.batches(config.data.config, "test", batch_size=250, train=False)
      table = vqa.evaluate(model, batches, ctx.tokenizer, question_types=synthetic_vqa.QUESTION_TYPES,
                           metric="exact_match", max_new_tokens=config.data.max_answer_len,
                           max_examples=args.max_examples)
      row[label] = {"accuracy": table["accuracy"], "per_type": table["per_type"], "count": table["count"],
                    "seconds": time.time() - t}
    row["delta_points"] = 100 * (row["int8"]["accuracy"] - row["exact"]["accuracy"])
    rows[name] = row
    print(f"{name:22s} exact {100 * row['exact']['accuracy']:6.2f}  int8 activations "
          f"{100 * row['int8']['accuracy']:6.2f}  ({row['delta_points']:+.2f} points, {row['exact']['count']} questions)",
          flush=True)
  with open(args.out, "w") as f:
    json.dump({"workdir": os.path.abspath(args.workdir), "config": args.config, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
