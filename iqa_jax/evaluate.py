"""`python -m iqa_jax.evaluate`: evaluate a run on a whole other dataset.

A thin entry point: the flags are parsed here, the work is done in iqa_jax.inference.evaluate."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iqa_jax import cli
from iqa_jax.inference import evaluate
from iqa_jax.inference.evaluate import check_demo_folder, data_config_for, evaluate_run
from iqa_jax.runs import folder as run_folder


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.evaluate", description=evaluate.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="run folder made by iqa_jax.train (an "
                  "exported model is scored with iqa_jax.score instead)")
  ap.add_argument("--dataset", required=True, help="clive, koniq10k, kadid10k, flive, spaq, "
                  "agiqa3k, agiqa1k, csv or demo")
  ap.add_argument("--data-dir", "--data_dir", dest="data_dir", default="",
                  help="the release folder (with --source tfds: optional, checked to be the "
                  "release the build came from); for demo, a folder that already holds the "
                  "demo set (it is not built here)")
  ap.add_argument("--source", default=None, choices=("files", "tfds"),
                  help="read the release folder or a TFDS build (default: as the run did)")
  ap.add_argument("--tfds-dir", "--tfds_dir", dest="tfds_dir", default=None,
                  help="TFDS data dir (default: as the run did)")
  ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                  help="adapter option (repeatable), e.g. resolution=512x384")
  ap.add_argument("--which", default="best", choices=("best", "last"),
                  help="checkpoint: best validation epoch or the last one")
  ap.add_argument("--out", default=None, help="output folder (default: the run folder)")
  ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                  help="images per forward pass (default: the run's eval_batch_size)")
  ap.add_argument("--on-error", "--on_error", dest="on_error", default="raise",
                  choices=("raise", "skip"),
                  help="an unreadable image or bad annotation row: stop (raise) or skip and "
                  "count it (listed in eval_<dataset>_skipped.csv)")
  a = ap.parse_args(argv)
  try:
    run_config = run_folder.read_config(a.workdir)
    bad = [kv for kv in a.option if "=" not in kv]
    if bad:
      raise ValueError(f"--option {bad[0]!r}: write KEY=VALUE, e.g. --option resolution=512x384")
    options = dict(kv.split("=", 1) for kv in a.option)
    dc = data_config_for(run_config, a.dataset, a.data_dir, options, a.on_error, a.source,
                         a.tfds_dir)
    if dc.source == "files" and not dc.dir:
      raise ValueError("pass --data-dir (the release folder), or --source tfds to read a build.")
    if dc.source == "files" and a.dataset == "demo":
      check_demo_folder(dc.dir)
    r = evaluate_run(a.workdir, dc, a.which, a.out, a.batch_size, progress=True)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"| train | test | n | SRCC | PLCC |\n|---|---|---|---|---|\n"
        f"| {r['train_dataset']} | {r['test_dataset']} | {r['n']} | {r['srcc']:.4f} | "
        f"{r['plcc']:.4f} |")
  return 0


if __name__ == "__main__":
  cli.run(main)
