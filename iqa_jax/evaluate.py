"""Evaluate a trained run on the whole of another dataset (Table 3 protocol).

python -m iqa_jax.evaluate --workdir RUN --dataset clive --data_dir /data/clive [--out DIR]
Writes `eval_<dataset>.json` (metrics) and `eval_<dataset>.csv` (path, mos, pred) in --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np

from iqa_jax import metrics
from iqa_jax.data import datasets, pipeline
from iqa_jax.score import load_run
from iqa_jax.scorer import Scorer


def evaluate_run(workdir: str, data_config: ml_collections.ConfigDict, which: str = "best",
                 out_dir: str | None = None, batch_size: int | None = None,
                 progress: bool = False) -> dict:
  """Scores every image of `data_config`'s dataset with the run; returns and writes metrics."""
  loaded = load_run(workdir, which)
  config = ml_collections.ConfigDict(loaded.info["config"])
  records = datasets.load_records(data_config)
  records, skipped = pipeline.check_records(records, on_error=data_config.get("on_error", "raise"))
  # The run's test-time view (resize or native crops), as `score` and `Scorer` apply it.
  scorer = Scorer(loaded, batch_size=batch_size or config.eval_batch_size)
  pred = scorer([r.path for r in records], progress=progress, desc=f"eval {data_config.name}")
  mos = np.array([r.mos for r in records])
  result = {"train_dataset": config.data.name, "test_dataset": data_config.name,
            "n": len(records), "n_skipped": len(skipped), "checkpoint": which,
            **metrics.compute_metrics(pred, mos)}
  out = Path(out_dir or workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"eval_{data_config.name}.json").write_text(json.dumps(result, indent=2))
  with open(out / f"eval_{data_config.name}.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "mos", "pred"])
    for r, p in zip(records, pred):
      w.writerow([r.path, f"{r.mos:.6f}", f"{float(p):.6f}"])
  if skipped:
    with open(out / f"eval_{data_config.name}_skipped.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["path", "reason"])
      w.writerows(skipped)
  return result


def data_config_for(run_config, name: str, data_dir: str, options: dict | None = None,
                    on_error: str = "raise") -> ml_collections.ConfigDict:
  """The run's data config pointed at another dataset (its options reset to the defaults)."""
  from iqa_jax.defaults import base_config
  d = base_config().data
  d.name, d.dir, d.on_error = name, data_dir, on_error
  d.image_size = run_config.data.image_size
  for k, v in (options or {}).items():
    is_flag = isinstance(d.options.get(k), bool)
    d.options[k] = str(v).lower() in ("1", "true", "yes") if is_flag else v
  return d


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.evaluate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="run folder made by iqa_jax.train")
  ap.add_argument("--dataset", required=True, help="clive, koniq10k, kadid10k, flive, spaq, "
                  "agiqa3k, agiqa1k, csv or demo")
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--option", action="append", default=[], help="adapter option k=v")
  ap.add_argument("--which", default="best", choices=("best", "last"))
  ap.add_argument("--out", default=None, help="output folder (default: the run folder)")
  ap.add_argument("--batch-size", type=int, default=None)
  ap.add_argument("--on_error", default="raise", choices=("raise", "skip"))
  a = ap.parse_args(argv)
  try:
    run_config = ml_collections.ConfigDict(
        json.loads((Path(a.workdir) / "config.json").read_text()))
    options = dict(kv.split("=", 1) for kv in a.option)
    dc = data_config_for(run_config, a.dataset, a.data_dir, options, a.on_error)
    r = evaluate_run(a.workdir, dc, a.which, a.out, a.batch_size, progress=True)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"| train | test | n | SRCC | PLCC |\n|---|---|---|---|---|\n"
        f"| {r['train_dataset']} | {r['test_dataset']} | {r['n']} | {r['srcc']:.4f} | "
        f"{r['plcc']:.4f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
