"""McNemar's exact test and the draw summary (sab_jax/eval/paired.py), against exact fractions."""

import json
import math
import random
from fractions import Fraction

import pytest

from sab_jax import report
from sab_jax.eval import paired


def _exact_two_sided(k, n):
  """The same p-value in rational arithmetic: 2 · Σ_{i ≤ min(k, n−k)} C(n, i) / 2ⁿ, capped at 1."""
  lo = min(k, n - k)
  return min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(lo + 1)), 2 ** n))


@pytest.mark.parametrize("k,n", [(0, 5), (1, 10), (5, 10), (3, 40), (17, 60), (0, 1), (250, 1000), (40, 2000)])
def test_binomial_tail_equals_exact_fractions(k, n):
  assert paired.binomial_two_sided(k, n) == pytest.approx(float(_exact_two_sided(k, n)), rel=1e-9, abs=1e-300)
  assert paired.binomial_two_sided(k, n) == paired.binomial_two_sided(n - k, n)  # symmetric
  assert paired.binomial_two_sided(0, 0) == 1.0
  # Known values: 2/32 for 0 of 5, 2·11/1024 for 1 of 10.
  assert paired.binomial_two_sided(0, 5) == pytest.approx(0.0625)
  assert paired.binomial_two_sided(1, 10) == pytest.approx(22 / 1024)


def test_mcnemar_counts_only_discordant_questions():
  a = [True] * 50 + [False] * 30 + [True] * 12 + [False] * 3
  b = [True] * 50 + [False] * 30 + [False] * 12 + [True] * 3
  t = paired.mcnemar(a, b)
  assert (t.n, t.a_only, t.b_only) == (95, 12, 3)
  assert t.p == pytest.approx(float(_exact_two_sided(3, 15)))
  assert t.delta == pytest.approx(9 / 95)
  swapped = paired.mcnemar(b, a)
  assert (swapped.a_only, swapped.b_only, swapped.p) == (3, 12, t.p)
  assert paired.mcnemar(a, a).p == 1.0  # identical answers: nothing to test
  with pytest.raises(ValueError, match="same questions"):
    paired.mcnemar(a, b[:-1])


def test_pooling_draws_separates_what_one_draw_cannot():
  """5 draws, each 2000 questions where a beats b on 14 of 24 discordant ones: no single draw is
  significant, the pooled test (70 vs 50) is smaller than every draw's p."""
  rng = random.Random(0)
  draws = []
  for _ in range(5):
    a = [rng.random() < 0.85 for _ in range(2000)]
    b = list(a)
    idx = rng.sample(range(2000), 24)
    for i in idx[:14]:
      a[i], b[i] = True, False
    for i in idx[14:]:
      a[i], b[i] = False, True
    draws.append(paired.mcnemar(a, b))
  assert all((d.a_only, d.b_only) == (14, 10) and d.p > 0.5 for d in draws)
  pool = paired.pooled(draws)
  assert (pool.n, pool.a_only, pool.b_only) == (10000, 70, 50)
  assert pool.p == pytest.approx(float(_exact_two_sided(50, 120))) and pool.p < min(d.p for d in draws)


def _workdir(root, name, methods, shards=False):
  wd = root / name
  (wd / "predictions").mkdir(parents=True)
  results = {"methods": {}, "dataset": "d", "split": "test"}
  for method, (answers, predictions) in methods.items():
    rows = [json.dumps({"question_type": "t", "prediction": p, "answer": a}) for a, p in zip(answers, predictions)]
    if shards:  # as a two-process evaluation writes them
      for i in range(2):
        (wd / "predictions" / f"{method}.process{i}.jsonl").write_text("\n".join(rows[i::2]) + "\n")
    else:
      (wd / "predictions" / f"{method}.jsonl").write_text("\n".join(rows) + "\n")
    correct = sum(a == p for a, p in zip(answers, predictions))
    results["methods"][method] = {"accuracy": correct / len(answers), "bits_per_weight": 1.0}
  (wd / "results.json").write_text(json.dumps(results))
  return wd


def test_compare_reads_draws_and_the_report_shows_them(tmp_path, capsys):
  answers = ["yes", "no", "red", "two"] * 5
  sab = list(answers)
  sab[0] = "no"              # 19/20
  billm = list(answers)
  billm[:3] = ["no", "yes", "blue"]  # 17/20: sab right where billm wrong on 2, billm right where sab wrong on 0
  d0 = _workdir(tmp_path, "draw0", {"sab": (answers, sab), "billm": (answers, billm)})
  d1 = _workdir(tmp_path, "draw1", {"sab": (answers, answers), "billm": (answers, billm)}, shards=True)
  c = paired.compare([str(d0), str(d1)], "sab", ["billm"])
  assert c["accuracy"]["sab"]["per_draw"] == [0.95, 1.0]
  m, sd = c["accuracy"]["sab"]["mean"], c["accuracy"]["sab"]["sd"]
  assert m == pytest.approx(0.975) and sd == pytest.approx(math.sqrt(2 * 0.025 ** 2))
  pool = c["tests"]["billm"]["pooled"]
  # draw 0: sab right and billm wrong on questions 1 and 2, never the other way; draw 1 (two
  # process shards, read in process order for both methods alike): on questions 0, 1 and 2
  assert [t.a_only for t in c["tests"]["billm"]["per_draw"]] == [2, 3]
  assert (pool.a_only, pool.b_only) == (5, 0) and pool.p == pytest.approx(2 / 32)

  out = tmp_path / "out"
  assert report.main([str(d0 / "results.json"), str(d1 / "results.json"), "--out", str(out), "--paired", "sab"]) == 0
  text = (out / "report.md").read_text()
  assert "Paired comparison against `sab` over 2 draw(s)" in text
  row = next(l for l in text.splitlines() if l.startswith("| billm |"))
  assert "| 85.00 ± 0.00 | 5 | 0 | -12.50 | 0.0625 |" in row
  assert text in capsys.readouterr().out

  with pytest.raises(SystemExit, match="not a method every run evaluated"):
    report.main([str(d0 / "results.json"), "--out", str(out), "--paired", "pbllm"])
  (d1 / "predictions" / "billm.process1.jsonl").unlink()
  with pytest.raises(SystemExit, match="not the same questions"):
    report.main([str(d0 / "results.json"), str(d1 / "results.json"), "--out", str(out), "--paired", "sab"])
