"""Paper-style tables and analysis figures from a results store (python -m iqa_jax.report):

  python -m iqa_jax.report DIR/results.jsonl --table 1          (iqa_jax.analysis.report)
  python -m iqa_jax.report DIR/results.jsonl --table 4          (iqa_jax.analysis.analyses)
  python -m iqa_jax.report DIR/results.jsonl --figure S4
  python -m iqa_jax.report gallery (--workdir RUN | --scores CSV) --out PAGE.html  (gallery)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from iqa_jax import cli
from iqa_jax.analysis import analyses, gallery
from iqa_jax.analysis import report as tables
from iqa_jax.analysis.report import TABLES, load_rows, make_table, to_markdown, write_csv


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["gallery"]:  # python -m iqa_jax.report gallery ... (one HTML page)
    return gallery.main(argv[1:])
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.report", description=tables.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("results", nargs="+", help="results.jsonl written by iqa_jax.experiments (or "
                  "its folder); several for the ablation tables (one matrix per setting)")
  ap.add_argument("--table", default="1", choices=TABLES + analyses.ANALYSIS_TABLES,
                  help="the paper's table: 1, 2, S2, 3 (cross-dataset), S4, 6 (activation "
                  "pairs); ablations 4 (masking), S3 (dropout), S1 (fine-tuning), 5 (beside the "
                  "published), S5 (compute)")
  ap.add_argument("--figure", default=None, choices=analyses.FIGURES,
                  help="Figure S4 (LoRA rank) or S5 (PE layer) as a PNG instead of a table")
  ap.add_argument("--which", default="best", choices=("best", "final", "test"),
                  help="best epoch (the paper's 'mean best SRCC'), final epoch or test split")
  ap.add_argument("--csv", default=None, help="CSV path (default: tables/table<ID>.csv, or "
                  "figure<ID>.csv for the table behind a --figure, beside the results)")
  a = ap.parse_args(argv)
  folder = Path(a.results[0]) if Path(a.results[0]).is_dir() else Path(a.results[0]).parent
  try:
    if a.figure or a.table in analyses.ANALYSIS_TABLES:  # tables read each run's config.json
      if a.figure:  # the plot, and the table behind it
        runs = analyses.load_runs(a.results)
        t = analyses.sweep_table(runs, a.figure)
        png = analyses.sweep_figure(runs, a.figure, folder / "tables" / f"figure{a.figure}.png")
        print(f"png: {png}")
      else:
        t = analyses.make_analysis_table(a.results, a.table)
    else:
      t = make_table([row for r in a.results for row in load_rows(r)], a.table, a.which)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not t.rows:  # nothing to show: keep an earlier table's CSV rather than overwrite it empty
    print(f"error: no run in {', '.join(a.results)} fills Table {a.table}"
          + (" (it needs runs with another setting than k = 100 beside those at k = 100)"
             if a.table in ("4", "S3") else "") + "; nothing written", file=sys.stderr)
    return 1
  print(to_markdown(t))
  suffix = "" if a.which == "best" else f"_{a.which}"
  name = f"figure{a.figure}" if a.figure else f"table{a.table}{suffix}"
  path = write_csv(t, a.csv or folder / "tables" / f"{name}.csv")
  print(f"csv: {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)
