"""Quality of every binarization method on the demo teacher: accuracy, bits, layer errors.

Runs the demo pipeline (shipped teacher -> calibrate -> binarize all methods and
variants) and prints one markdown table; the full results.json stays in --workdir.

  python experiments/benchmarks/binarize_quality.py --workdir=workdir/quality [--config.key=value ...]
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_REPO, "experiments", "configs", "demo.py"),
                                          "pipeline config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/quality", "where results.json goes")


def table(results: dict) -> str:
  types = sorted(results["methods"]["fp"]["per_type"])
  head = ("| method | accuracy | " + " | ".join(types) + " | stored bits/w | nominal bits | model bytes | "
          "mean layer output err |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  rows = [(n, e) for n, e in results["methods"].items()] + [(n, e) for n, e in results.get("variants", {}).items()]
  for name, e in rows:
    errs = list(e.get("layer_output_rel_error", {}).values())
    err = f"{np.mean(errs):.4f}" if errs else "-"
    per = " | ".join(f"{100 * e['per_type'][t]['accuracy']:.1f}" for t in types)
    lines.append(f"| {name} | {100 * e['accuracy']:.2f} | {per} | {e['bits_per_weight']:.3f} | "
                 f"{e['nominal_bits']:.3f} | {e['model_bytes']:,} | {err} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sab_jax import stages
  results = stages.run(_CONFIG.value, _WORKDIR.value)
  print(table(results))
  with open(os.path.join(_WORKDIR.value, "quality_table.md"), "w") as f:
    f.write(table(results) + "\n")


if __name__ == "__main__":
  app.run(main)
