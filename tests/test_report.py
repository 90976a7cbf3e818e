"""sab_jax/report.py (the end of every pipeline run, `python -m sab_jax.report`): results.json files ->
markdown table and accuracy-vs-size plot."""

import json

import pytest

from sab_jax import report


def _entry(acc, bits, nominal, nbytes, per_type):
  return {"accuracy": acc, "bits_per_weight": bits, "nominal_bits": nominal, "model_bytes": nbytes, "count": 100,
          "per_type": {t: {"accuracy": a, "count": 20} for t, a in per_type.items()}}


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))
  return str(path)


@pytest.fixture
def two_runs(tmp_path):
  full = {  # methods listed in an order that is neither fp-first nor by accuracy
      "methods": {
          "xnor": _entry(0.4125, 1.104, 1.0, 411904, {"count": 0.2, "exist": 0.55}),
          "sab": _entry(0.72055, 2.69, 1.078, 567867, {"count": 0.474, "exist": 0.812}),
          "fp": _entry(0.8815, 32.0, 32.0, 3752448, {"count": 0.947, "exist": 1.0}),
          "billm": dict(_entry(0.6905, 3.003, 1.078, 598587, {"count": 0.405, "exist": 0.828}),
                        formula_bits_per_weight=2.95, export_dir="/exports/billm"),
      },
      "variants": {"sab_structured": _entry(0.439, 1.496, 1.079, 450422, {"count": 0.168, "exist": 0.552})},
      "dataset": "synthetic_vqa/small", "split": "test",
      "majority_baseline": {"overall": 0.3625, "count": 0.137},
      "final_loss": 0.125,
  }
  sparse = {  # no variants, majority baseline, per_type of one entry, bits of another, dataset
      "methods": {
          "fp": {"accuracy": 0.5, "model_bytes": 1000000, "per_type": {"relation": {"accuracy": 0.25}}},
          "sab_kd": {"accuracy": 0.6, "bits_per_weight": 1.1},
      },
  }
  return _write(tmp_path / "full" / "results.json", full), _write(tmp_path / "sparse" / "results.json", sparse)


def _table_rows(md):
  lines = [ln for ln in md.splitlines() if ln.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  assert set(lines[1].replace("|", "")) == {"-"}
  return head, [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_main_writes_table_and_png(two_runs, tmp_path, capsys):
  out = tmp_path / "report"
  assert report.main([*two_runs, "--out", str(out), "--title", "My runs"]) == 0
  md = (out / "report.md").read_text()
  assert md.startswith("# My runs")
  assert capsys.readouterr().out.strip() == md.strip()  # the same table goes to stdout

  head, rows = _table_rows(md)
  for col in ("run", "method", "accuracy %", "Δ fp", "count %", "exist %", "relation %", "stored bits/w", "formula bits/w",
              "nominal bits", "model MB", "export"):
    assert col in head, col
  assert [(r["run"], r["method"]) for r in rows] == [
      ("full", "fp"), ("full", "sab"), ("full", "billm"), ("full", "sab_structured (variant)"), ("full", "xnor"),
      ("sparse", "fp"), ("sparse", "sab_kd")]  # one row per entry per run; fp first, then by accuracy
  by = {(r["run"], r["method"]): r for r in rows}
  assert by["full", "fp"]["accuracy %"] == "88.15"
  assert by["full", "sab"]["accuracy %"] == "72.06"  # 100x, two decimals (0.72055 -> 72.055 -> 72.06)
  assert by["full", "xnor"]["accuracy %"] == "41.25"
  # points below the same run's fp model (88.15): 72.055 - 88.15 = -16.095 -> -16.10 (float rounding)
  assert by["full", "xnor"]["Δ fp"] == "-46.90" and by["full", "sab"]["Δ fp"] in ("-16.09", "-16.10")
  assert by["full", "fp"]["Δ fp"] == "–" and by["sparse", "sab_kd"]["Δ fp"] == "+10.00"
  assert by["full", "sab"]["count %"] == "47.4" and by["full", "fp"]["exist %"] == "100.0"
  assert by["full", "sab_structured (variant)"]["accuracy %"] == "43.90"
  assert by["full", "fp"]["model MB"] == "3.752" and by["full", "xnor"]["stored bits/w"] == "1.104"
  assert by["full", "billm"]["formula bits/w"] == "2.950" and by["full", "billm"]["export"] == "/exports/billm"
  # missing optional fields print as a dash instead of failing
  assert by["full", "sab"]["formula bits/w"] == "–" and by["full", "sab"]["export"] == "–"
  assert by["full", "fp"]["relation %"] == "–"
  assert by["sparse", "fp"]["relation %"] == "25.0" and by["sparse", "fp"]["count %"] == "–"
  assert by["sparse", "fp"]["stored bits/w"] == "–" and by["sparse", "fp"]["model MB"] == "1.000"
  assert by["sparse", "sab_kd"]["accuracy %"] == "60.00" and by["sparse", "sab_kd"]["model MB"] == "–"
  assert by["sparse", "sab_kd"]["nominal bits"] == "–"
  assert "36.25" in md  # the full run's majority baseline

  png = (out / "report.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_optional_columns_absent_when_no_run_has_them(two_runs, tmp_path):
  head, _ = _table_rows(report.markdown_table(report.load_results([two_runs[1]])))
  assert "formula bits/w" not in head and "export" not in head


@pytest.mark.parametrize("content,why", [(None, "no such file"), ("{not json", "not valid JSON"),
                                         (json.dumps({"variants": {}}), "methods"),
                                         (json.dumps({"methods": ["fp"]}), "methods")])
def test_bad_input_exits_naming_the_file(two_runs, tmp_path, content, why):
  bad = tmp_path / "broken_run" / "results.json"
  if content is not None:
    bad.parent.mkdir()
    bad.write_text(content)
  with pytest.raises(SystemExit) as e:
    report.main([two_runs[0], str(bad), "--out", str(tmp_path / "out")])
  assert e.value.code not in (0, None)
  assert str(bad) in str(e.value.code) and why in str(e.value.code)
  assert not (tmp_path / "out" / "report.md").exists()  # nothing half-written


def test_a_pipeline_run_ends_with_its_report(two_runs, tmp_path):
  """What stages.run does last: WORKDIR/report.md + report.png of that run, the table aligned."""
  workdir = tmp_path / "full"
  results = json.loads((workdir / "results.json").read_text())
  md = report.for_run(results, str(workdir), title="Binarized models on synthetic_vqa/small test")
  assert (workdir / "report.md").read_text() == md and md.startswith("# Binarized models on synthetic_vqa/small")
  assert (workdir / "report.png").read_bytes()[:4] == b"\x89PNG"
  table = [ln for ln in md.splitlines() if ln.startswith("|")]
  assert len({len(ln) for ln in table}) == 1  # every line as wide: columns line up in a terminal
  _, rows = _table_rows(md)
  assert [r["method"] for r in rows][:2] == ["fp", "sab"] and {r["run"] for r in rows} == {"full"}
