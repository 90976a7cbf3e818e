"""Turn one or more `results.json` files into a markdown table and an accuracy-vs-size plot.

Every pipeline run ends with it (`stages.run` writes `WORKDIR/report.md` and
`WORKDIR/report.png` and prints the table); to compare runs:

  python -m sab_jax.report WORKDIR/results.json [MORE.json ...] --out OUT [--title T] [--paired sab]

writes `OUT/report.md` (also printed) and `OUT/report.png` (accuracy vs stored bits per
weight and vs model size). Reads only the JSON the pipeline writes (no jax). Optional
fields a run lacks print as "–". `--paired REF` adds McNemar's paired test of REF against every
other method, on the predictions files next to each results.json, the runs taken as
calibration draws on the same questions (mean ± sd over them; `sab_jax.eval.paired`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

import matplotlib
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from sab_jax.eval import paired

MISSING = "–"
DEFAULT_TITLE = "Binarized model quality"


def _source_names(paths: Sequence[str]) -> list[str]:
  """Short, unique labels: the workdir's name for `.../results.json`, else the file's stem."""
  names = []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(p)))
    names.append(parent if stem == "results" and parent else stem)
  if len(set(names)) < len(names):  # two workdirs with the same name: fall back to the paths
    names = [os.path.normpath(p) for p in paths]
  return names


def _check(path: str, data: Any) -> None:
  if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
    sys.exit(f"report: {path}: no \"methods\" dict; is this a results.json written by sab_jax.main?")
  for section in ("methods", "variants"):
    entries = data.get(section) or {}
    bad = [k for k, v in entries.items() if not isinstance(v, dict)] if isinstance(entries, dict) else [section]
    if bad:
      sys.exit(f"report: {path}: {section} entries must be objects, got {bad}")


def load_results(paths: Sequence[str]) -> list[dict[str, Any]]:
  """Reads every file; exits with a message naming the file if one is missing or malformed."""
  runs = []
  for path, name in zip(paths, _source_names(paths)):
    if not os.path.isfile(path):
      sys.exit(f"report: {path}: no such file")
    try:
      with open(path) as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      sys.exit(f"report: {path}: not valid JSON ({e})")
    _check(path, data)
    runs.append({"source": name, "path": path, "results": data})
  return runs


def _num(x: Any) -> float | None:
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _type_accuracy(v: Any) -> float | None:
  return _num(v.get("accuracy")) if isinstance(v, dict) else _num(v)


def majority_accuracy(results: dict[str, Any]) -> float | None:
  """The overall majority-answer accuracy (a dict with "overall", or a bare number)."""
  m = results.get("majority_baseline")
  return _num(m.get("overall")) if isinstance(m, dict) else _num(m)


def rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per method and variant per run; runs in order given, within a run fp first, then by accuracy."""
  out = []
  for run in runs:
    entries = [(n, e, False) for n, e in run["results"]["methods"].items()]
    entries += [(n, e, True) for n, e in (run["results"].get("variants") or {}).items()]
    run_rows = [{"source": run["source"], "name": n, "variant": var, "entry": e, "accuracy": _num(e.get("accuracy"))}
                for n, e, var in entries]
    run_rows.sort(key=lambda r: (r["name"] != "fp" or r["variant"], r["accuracy"] is None, -(r["accuracy"] or 0.0)))
    out += run_rows
  return out


def _fmt(x: float | None, spec: str) -> str:
  return MISSING if x is None else format(x, spec)


def _cell(s: str) -> str:
  return s.replace("|", "\\|")


def _fp_accuracy(run: dict[str, Any]) -> float | None:
  fp = run["results"]["methods"].get("fp")
  return _num(fp.get("accuracy")) if fp else None


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
  """The table: accuracy, its difference to the run's FP model (points) and per-type accuracy
  in %, the teacher-forced answer CE and KL from the teacher (once some run has them),
  stored/nominal bits per weight, model MB."""
  rs = rows(runs)
  fp = {run["source"]: _fp_accuracy(run) for run in runs}
  types = sorted({t for r in rs for t in (r["entry"].get("per_type") or {})})
  formula = any("formula_bits_per_weight" in r["entry"] for r in rs)  # columns only once some run has them
  export = any("export_dir" in r["entry"] for r in rs)
  losses = [k for k in ("answer_ce", "kl_from_teacher") if any(k in r["entry"] for r in rs)]
  head = ["run", "method", "accuracy %", "Δ fp"] + [f"{t} %" for t in types]
  head += [{"answer_ce": "answer CE", "kl_from_teacher": "KL from teacher"}[k] for k in losses] + ["stored bits/w"]
  head += ["formula bits/w"] * formula + ["nominal bits", "model MB"] + ["export"] * export
  table = []
  for r in rs:
    e, per = r["entry"], r["entry"].get("per_type") or {}
    mb = _num(e.get("model_bytes"))
    base = fp[r["source"]]
    delta = None if r["accuracy"] is None or base is None or (r["name"] == "fp" and not r["variant"]) \
        else 100 * (r["accuracy"] - base)
    cells = [r["source"], r["name"] + (" (variant)" if r["variant"] else ""),
             _fmt(None if r["accuracy"] is None else 100 * r["accuracy"], ".2f"), _fmt(delta, "+.2f")]
    cells += [_fmt(None if _type_accuracy(per.get(t)) is None else 100 * _type_accuracy(per.get(t)), ".1f")
              for t in types]
    cells += [_fmt(_num(e.get(k)), ".4f") for k in losses]
    cells.append(_fmt(_num(e.get("bits_per_weight")), ".3f"))
    if formula:
      cells.append(_fmt(_num(e.get("formula_bits_per_weight")), ".3f"))
    cells += [_fmt(_num(e.get("nominal_bits")), ".3f"), _fmt(None if mb is None else mb / 1e6, ".3f")]
    if export:
      cells.append(str(e["export_dir"]) if e.get("export_dir") else MISSING)
    table.append([_cell(c) for c in cells])
  # Columns padded to one width, so that the table also reads as a table in a terminal.
  widths = [max(len(row[i]) for row in [head] + table) for i in range(len(head))]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in table])


def markdown_report(runs: Sequence[dict[str, Any]], title: str = DEFAULT_TITLE) -> str:
  """Title, the table, and a line per run naming its file, dataset and majority baseline."""
  lines = [f"# {title}", "", markdown_table(runs), ""]
  for run in runs:
    res, maj = run["results"], majority_accuracy(run["results"])
    where = ":".join(str(res[k]) for k in ("dataset", "split") if res.get(k)) or MISSING
    majority = MISSING if maj is None else f"{100 * maj:.2f} %"
    lines.append(f"- `{run['source']}`: `{run['path']}`, data {where}, majority baseline {majority}"
                 + (f", final loss {res['final_loss']:.4f}" if _num(res.get("final_loss")) is not None else ""))
  return "\n".join(lines) + "\n"


class _PlainLog(ticker.LogFormatter):
  """Log-axis ticks as plain numbers (0.4, 32), not 4e-01 or 2^5; the same ticks labelled."""

  def __call__(self, x, pos=None):
    return f"{x:g}" if super().__call__(x, pos) else ""


def _annotate(ax, points: list[tuple[float, float, str, str]]) -> None:
  """Labels points, one label per group of (near-)coincident ones, nudged apart so none overlap.

  Methods sharing a layout land on the same spot (e.g. sab, arb_rc and the Λ variants at
  identical bits per weight), so labelling each point separately prints them on top of each other.
  """
  ax.autoscale_view()
  to_px = ax.transData.transform
  groups: list[list[tuple[float, float, str, str]]] = []
  for p in sorted(points, key=lambda p: -p[1]):
    px = to_px((p[0], p[1]))
    for g in groups:
      if any(math.dist(px, to_px((q[0], q[1]))) < 8 for q in g if q[3] == p[3]):
        g.append(p)
        break
    else:
      groups.append([p])
  renderer = ax.figure.canvas.get_renderer()
  placed = [Bbox.from_bounds(*(to_px((p[0], p[1])) - 5), 10, 10) for p in points]  # keep labels off the markers
  for g in groups:
    names = [q[2] for q in g]
    label = "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3))
    dy = 3
    while True:
      ann = ax.annotate(label, (g[0][0], g[0][1]), textcoords="offset points", xytext=(5, dy), fontsize=7,
                        color=g[0][3], va="bottom" if dy >= 0 else "top")
      box = ann.get_window_extent(renderer)
      if not any(box.overlaps(b) for b in placed) or abs(dy) > 60:  # give up after a few tries: overlap beats loss
        break
      ann.remove()
      dy = -dy - 10 if dy > 0 else -dy + 10  # try just above, then below, then further out
    placed.append(box)


def plot(runs: Sequence[dict[str, Any]], path: str, title: str = DEFAULT_TITLE) -> None:
  """Accuracy vs stored bits per weight and vs model MB; one point per method, baselines dashed."""
  fig = Figure(figsize=(13, 5.5))  # no pyplot: no global state, no display needed
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  panels = [("bits_per_weight", 1.0, "stored bits per weight"), ("model_bytes", 1e6, "model size (MB)")]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  rs = rows(runs)
  many = len(runs) > 1
  labels = []
  for ax, (key, scale, xlabel) in zip(axes, panels):
    points = []
    labels.append(points)
    for i, run in enumerate(runs):
      color = colors[i % len(colors)]
      pts = [(_num(r["entry"].get(key)), r) for r in rs if r["source"] == run["source"]]
      pts = [(x / scale, r) for x, r in pts if x is not None and x > 0 and r["accuracy"] is not None]
      for variant in (False, True):
        sel = [(x, r) for x, r in pts if r["variant"] == variant]
        if sel:
          ax.scatter([x for x, _ in sel], [100 * r["accuracy"] for _, r in sel], edgecolors=color,
                     facecolors="none" if variant else color, marker="s" if variant else "o", zorder=3,
                     label=(f"{run['source']} " if many else "") + ("variant" if variant else "method"))
      points += [(x, 100 * r["accuracy"], r["name"], color) for x, r in pts]
      maj = majority_accuracy(run["results"])
      if maj is not None:
        ax.axhline(100 * maj, color=color, linestyle="--", linewidth=1,
                   label="majority baseline" + (f" ({run['source']})" if many else ""))
    xs = [p[0] for p in points]
    if xs and max(xs) / min(xs) > 4:  # fp at 32 bits next to ~1-3 bit methods: log scale keeps both readable
      ax.set_xscale("log", base=2 if key == "bits_per_weight" else 10)
      ax.xaxis.set_major_formatter(_PlainLog(base=2 if key == "bits_per_weight" else 10))
      ax.xaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc="best")
  fig.suptitle(title)
  fig.tight_layout()
  for ax, points in zip(axes, labels):  # after the layout is final: the overlap test works in pixels
    _annotate(ax, points)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def write(runs: Sequence[dict[str, Any]], out: str, title: str = DEFAULT_TITLE, appendix: str = "") -> str:
  """Writes OUT/report.md (the table, then `appendix`) and OUT/report.png; returns the markdown."""
  os.makedirs(out, exist_ok=True)
  report = markdown_report(runs, title) + (f"\n{appendix}" if appendix else "")
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(report)
  plot(runs, os.path.join(out, "report.png"), title)
  return report


def for_run(results: dict[str, Any], workdir: str, title: str = DEFAULT_TITLE) -> str:
  """The end of a pipeline run: WORKDIR/report.md and report.png of its results; returns the markdown."""
  path = os.path.join(workdir, "results.json")
  _check(path, results)
  return write([{"source": os.path.basename(os.path.normpath(workdir)) or workdir, "path": path,
                 "results": results}], workdir, title)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+", help="results.json files (one source run each)")
  parser.add_argument("--out", required=True, help="directory for report.md and report.png")
  parser.add_argument("--title", default=DEFAULT_TITLE, help="heading of report.md and the figure")
  parser.add_argument("--paired", metavar="REF", help="also compare REF with every other method question by "
                      "question (McNemar), the runs taken as calibration draws on the same test questions")
  args = parser.parse_args(argv)
  runs = load_results(args.results)
  report = write(runs, args.out, args.title, paired_report(runs, args.paired) if args.paired else "")
  print(report, end="")
  return 0


def paired_report(runs: Sequence[dict[str, Any]], reference: str) -> str:
  """`paired.compare` over the runs' workdirs: every method and variant all runs evaluated."""
  common = None
  for run in runs:
    r = run["results"]
    names = [*r["methods"], *(r.get("variants") or {})]
    common = names if common is None else [n for n in common if n in names]
  if reference not in common:
    sys.exit(f"report: --paired {reference}: not a method every run evaluated (common: {common})")
  try:
    comparison = paired.compare([os.path.dirname(os.path.abspath(run["path"])) for run in runs], reference,
                                [n for n in common if n != reference])
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"report: --paired {reference}: {e}")
  return paired.markdown(comparison)


if __name__ == "__main__":
  sys.exit(main())
