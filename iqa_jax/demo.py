"""The embedded demo, end to end: build the set, train, print the table, export the model to
WORKDIR/model (self-contained), score the validation images with it into a CSV, and write two
HTML pages to look at them (WORKDIR/gallery.html: the run; WORKDIR/val_scores.html: the CSV).

python -m iqa_jax.demo [--workdir checkpoints/demo] [--config-arg head=sigmoid]
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from iqa_jax import cli


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.demo", description=__doc__)
  ap.add_argument("--workdir", default="checkpoints/demo",
                  help="run folder (the export goes to WORKDIR/model)")
  ap.add_argument("--data-dir", "--data_dir", dest="data_dir", default="demo_data",
                  help="folder of the demo set; built there when it holds none")
  ap.add_argument("--config-arg", "--config_arg", dest="config_arg", default="",
                  help="configs/demo.py arguments, e.g. head=sigmoid,epochs=8")
  a = ap.parse_args(argv)
  t0 = time.time()

  from iqa_jax import metrics
  from iqa_jax.analysis import gallery
  from iqa_jax.data import demo
  from iqa_jax.defaults import load_config_file
  from iqa_jax.inference import exported as export
  from iqa_jax.inference import score_csv as score
  from iqa_jax.training import loop as train

  cfg_file = Path(__file__).resolve().parent.parent / "configs" / "demo.py"
  config = load_config_file(f"{cfg_file}:" + ",".join(
      x for x in (f"dir={a.data_dir}", a.config_arg) if x))

  folder = demo.build_demo(a.data_dir)
  print(f"demo set: {folder} ({len(demo.load(a.data_dir))} distorted images)")
  results = train.train_and_evaluate(config, a.workdir)
  train.print_results_table(results)

  splits = json.loads((Path(a.workdir) / "splits.json").read_text())
  val_paths = [r["path"] if isinstance(r, dict) else r for r in splits["val"]]
  model_dir = export.export_run(a.workdir, str(Path(a.workdir) / "model"))
  print(f"exported the model -> {model_dir} (view: {config.data.test_view})")
  out = str(Path(a.workdir) / "val_scores.csv")
  summary = score.score_paths(str(model_dir), val_paths, out, batch_size=config.eval_batch_size,
                              progress=False)
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f))
  mos = {r.path: r.mos for r in demo.load(a.data_dir)}
  pred = np.array([float(r["score"]) for r in rows])
  m = metrics.compute_metrics(pred, [mos[r["path"]] for r in rows])
  print(f"scored {summary['scored']} validation images -> {out} "
        f"(SRCC {m['srcc']:.4f}, PLCC {m['plcc']:.4f})")
  # The validation set to look at: the run's errors and the CSV's scores, one page each.
  for page, (html, _) in (("gallery.html", gallery.run_page(a.workdir, gradcam=True)),
                          ("val_scores.html", gallery.scores_page(out))):
    print(f"gallery: {gallery.write_page(html, str(Path(a.workdir) / page))}")
  print(f"demo wall time: {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  cli.run(main, "the demo set (once built) and every finished epoch are kept; the same "
               "command goes on from there")
