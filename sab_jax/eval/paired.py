"""Paired comparison of two models on the same questions, over one or several calibration draws.

Two methods that differ by half a point on 2000 questions are within the noise of one
calibration draw; what separates them is whether one answers correctly where the other does
not more often than chance. McNemar's exact test looks only at those discordant questions
(`a right, b wrong` vs `a wrong, b right`): under "no difference" each is a fair coin flip.
Over several draws (a run per calibration seed on the same test questions) the discordant
counts add up (pooled test), and the accuracies give a mean ± sd per method.

Pure Python (no jax, no numpy): `sab_jax.report` uses it on the predictions files every
evaluation writes (`WORKDIR/predictions/<name>.jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

from sab_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class Paired:
  """McNemar's exact test of `a` against `b` on the same questions."""
  n: int          # questions compared
  a_only: int     # a right, b wrong
  b_only: int     # a wrong, b right
  p: float        # two-sided exact p-value (1.0 when no question is discordant)

  @property
  def delta(self) -> float:
    """Accuracy of a minus accuracy of b (fraction)."""
    return (self.a_only - self.b_only) / self.n if self.n else 0.0


def binomial_two_sided(k: int, n: int) -> float:
  """P(X <= min(k, n-k)) + P(X >= max(k, n-k)) for X ~ Bin(n, 1/2), capped at 1 (exact, log-space)."""
  if n == 0:
    return 1.0
  lo = min(k, n - k)
  log_half_n = -n * math.log(2.0)
  terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(lo + 1)]
  top = max(terms)
  tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
  return min(1.0, 2.0 * tail)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> Paired:
  """McNemar's exact test; both sequences score the same questions in the same order."""
  if len(a_correct) != len(b_correct):
    raise ValueError(f"paired comparison needs the same questions: {len(a_correct)} vs {len(b_correct)} answers")
  a_only = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
  b_only = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
  return Paired(len(a_correct), a_only, b_only, binomial_two_sided(a_only, a_only + b_only))


def pooled(tests: Sequence[Paired]) -> Paired:
  """One test over several draws: the discordant counts of every draw added."""
  a_only, b_only = sum(t.a_only for t in tests), sum(t.b_only for t in tests)
  return Paired(sum(t.n for t in tests), a_only, b_only, binomial_two_sided(a_only, a_only + b_only))


def read_predictions(workdir: str, name: str) -> list[dict[str, Any]]:
  """The rows `stages` wrote for `name` (per-process shards, if any, in process order)."""
  base = os.path.join(workdir, "predictions")
  single = os.path.join(base, f"{name}.jsonl")
  shards = sorted((f for f in os.listdir(base) if f.startswith(f"{name}.process") and f.endswith(".jsonl")),
                  key=lambda f: int(f[len(name) + len(".process"):-len(".jsonl")])) if os.path.isdir(base) else []
  files = [single] if os.path.exists(single) else [os.path.join(base, f) for f in shards]
  if not files:
    raise FileNotFoundError(f"no predictions of {name!r} in {base}: evaluate it first (stage 'eval' or 'eval_fp')")
  rows = []
  for path in files:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def correct(rows: Sequence[dict[str, Any]]) -> list[bool]:
  """Exact match of each prediction with its reference answer (what the paired tests count)."""
  return [metrics.exact_match(r["prediction"], [r["answer"]]) == 1.0 for r in rows]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  m = sum(values) / len(values)
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  return m, sd


def compare(workdirs: Sequence[str], reference: str, others: Sequence[str]) -> dict[str, Any]:
  """`reference` against each of `others`, in every workdir (one per calibration draw).

  Returns {"reference", "draws", "accuracy": {name: {"mean", "sd", "per_draw"}},
  "tests": {name: {"per_draw": [Paired...], "pooled": Paired}}}; accuracies are exact match
  on the predictions files (the fraction of questions the paired test counts).
  """
  names = [reference, *[o for o in others if o != reference]]
  scored = {n: [correct(read_predictions(w, n)) for w in workdirs] for n in names}
  for n in names[1:]:
    for w, a, b in zip(workdirs, scored[reference], scored[n]):
      if len(a) != len(b):
        raise ValueError(f"{w}: {reference} answered {len(a)} questions, {n} {len(b)}: not the same questions")
  accuracy = {}
  for n in names:
    per_draw = [sum(c) / len(c) for c in scored[n]]
    m, sd = mean_sd(per_draw)
    accuracy[n] = {"mean": m, "sd": sd, "per_draw": per_draw}
  tests = {}
  for n in names[1:]:
    per = [mcnemar(a, b) for a, b in zip(scored[reference], scored[n])]
    tests[n] = {"per_draw": per, "pooled": pooled(per)}
  return {"reference": reference, "draws": len(workdirs), "accuracy": accuracy, "tests": tests}


def markdown(comparison: dict[str, Any]) -> str:
  """The comparison as a markdown table: one row per method, the reference first."""
  ref, draws = comparison["reference"], comparison["draws"]
  acc = comparison["accuracy"]
  lines = [f"Paired comparison against `{ref}` over {draws} draw(s) (exact match; McNemar's exact test, "
           f"discordant questions pooled over the draws)", "",
           f"| method | accuracy % (mean ± sd) | {ref} right, it wrong | it right, {ref} wrong | Δ vs {ref} (points) "
           f"| p (pooled) | p per draw |", "|---|---:|---:|---:|---:|---:|---|"]
  for n, a in acc.items():
    cell = f"{100 * a['mean']:.2f} ± {100 * a['sd']:.2f}"
    if n == ref:
      lines.append(f"| {n} | {cell} | – | – | – | – | – |")
      continue
    t = comparison["tests"][n]
    pool = t["pooled"]
    per = ", ".join(f"{x.p:.3g}" for x in t["per_draw"])
    lines.append(f"| {n} | {cell} | {pool.a_only} | {pool.b_only} | {-100 * pool.delta:+.2f} | {pool.p:.3g} | {per} |")
  return "\n".join(lines) + "\n"
