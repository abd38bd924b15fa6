"""`python -m iqa_jax.plots`: PNGs of a run or of a run matrix.

A thin entry point: the flags are parsed here, the work is done in iqa_jax.analysis.plots."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from iqa_jax import cli
from iqa_jax.analysis import plots, report
from iqa_jax.analysis.plots import plot_matrix, plot_run


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.plots", description=plots.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("folder", help="a run folder (made by iqa_jax.train) or a run matrix folder "
                  "(holding results.jsonl, made by iqa_jax.experiments)")
  a = ap.parse_args(argv)
  folder = Path(a.folder)
  try:
    if not folder.is_dir():
      raise FileNotFoundError(f"{folder} is not a folder: pass a run folder or a run matrix "
                              f"folder")
    if (folder / "results.jsonl").exists():
      written = plot_matrix(report.load_rows(folder), folder)
    else:
      written = plot_run(folder)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not written:
    print(f"error: {folder} holds nothing to plot (no history.jsonl, val_predictions.csv or "
          f"results.jsonl rows)", file=sys.stderr)
    return 1
  for p in written:
    print(p)
  return 0


if __name__ == "__main__":
  cli.run(main)
