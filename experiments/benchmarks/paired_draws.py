"""Methods over several calibration draws, compared question by question (issue 15's measurement).

One pipeline run per draw (`config.seed` = draw: the calibration batches differ, the teacher
and the test questions do not), then `sab_jax.eval.paired`: each method's mean ± sd accuracy
over the draws, and McNemar's exact test of the reference against every other method, per
draw and pooled; and each model's teacher-forced test answer cross-entropy and KL from the
teacher on the answer tokens (as each evaluation records them in results.json). Writes WORKDIR/draw{k}/ (a normal workdir each; a rerun resumes them),
WORKDIR/paired.md and --out (JSON).

  python experiments/benchmarks/paired_draws.py --workdir=workdir/draws --draws=5 \\
      --reference=sab,sab_structured --out=experiments/benchmarks/paired_draws_demo.json [--config.key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_REPO, "experiments", "configs", "demo.py"),
                                          "pipeline config (its seed is set per draw)", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/draws", "one workdir per draw goes under it")
_DRAWS = flags.DEFINE_integer("draws", 5, "calibration draws (seeds 0 .. draws-1)")
_REFERENCES = flags.DEFINE_list("reference", ["sab"], "methods compared with every other one (a table each; "
                                "e.g. sab,sab_structured for both stored-bit settings)")
_OUT = flags.DEFINE_string("out", None, "JSON file for the comparison")


def _entries(results) -> dict[str, dict]:
  """Every method and variant a results.json lists."""
  return {**results["methods"], **(results.get("variants") or {})}


def _losses(results) -> dict[str, dict[str, float]]:
  """Each model's teacher-forced answer CE and KL from the teacher, as its eval recorded them
  (`eval.vqa.evaluate`; the teacher's own KL is 0)."""
  out = {"fp": {"answer_ce": results["methods"]["fp"]["answer_ce"], "kl_from_teacher": 0.0}}
  for name, e in _entries(results).items():
    if "kl_from_teacher" in e:
      out[name] = {"answer_ce": e["answer_ce"], "kl_from_teacher": e["kl_from_teacher"]}
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sab_jax import stages
  from sab_jax.eval import paired
  workdirs, bits, losses = [], {}, []
  for k in range(_DRAWS.value):
    config = _CONFIG.value.copy_and_resolve_references()
    config.seed = k
    wd = os.path.join(_WORKDIR.value, f"draw{k}")
    results = stages.run(config, wd)
    workdirs.append(wd)
    losses.append(_losses(results))
    for name, e in _entries(results).items():
      bits.setdefault(name, e.get("bits_per_weight"))
  loss_table = {n: {k: paired.mean_sd([d[n][k] for d in losses]) for k in ("answer_ce", "kl_from_teacher")}
                for n in losses[0]}
  text = ("| method | test answer CE (mean ± sd) | KL(teacher ‖ model) on answer tokens |\n|---|---:|---:|\n"
          + "".join(f"| {n} | {v['answer_ce'][0]:.4f} ± {v['answer_ce'][1]:.4f} | "
                    f"{v['kl_from_teacher'][0]:.4f} ± {v['kl_from_teacher'][1]:.4f} |\n" for n, v in loss_table.items())
          + "\n")
  out = {"draws": len(workdirs), "bits_per_weight": bits, "comparisons": {},
         "answer_losses": {"mean_sd": loss_table, "per_draw": losses}}
  for reference in _REFERENCES.value:
    comparison = paired.compare(workdirs, reference, [n for n in bits if n != reference])
    text += paired.markdown(comparison) + "\n"
    out["comparisons"][reference] = {
        "accuracy": comparison["accuracy"],
        "tests": {n: {"pooled": dataclasses.asdict(t["pooled"]), "per_draw": [dataclasses.asdict(x) for x in t["per_draw"]]}
                  for n, t in comparison["tests"].items()}}
  text += "stored bits/weight: " + ", ".join(f"{n} {b:.3f}" for n, b in bits.items() if b is not None) + "\n"
  print(text)
  with open(os.path.join(_WORKDIR.value, "paired.md"), "w") as f:
    f.write(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
