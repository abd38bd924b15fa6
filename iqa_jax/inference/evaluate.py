"""Evaluate a trained run on the whole of another dataset (Table 3 protocol).

python -m iqa_jax.evaluate --workdir RUN --dataset clive --data-dir /data/clive [--out DIR]
Writes `eval_<dataset>.json` (metrics) and `eval_<dataset>.csv` (path, mos, pred) in --out.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from iqa_jax import metrics
from iqa_jax.data import pipeline
from iqa_jax.data.tfds import source as tfds_source
from iqa_jax.inference.loaded import load_run
from iqa_jax.inference.scorer import Scorer
from iqa_jax.runs import folder as run_folder


class _BuildImages(Sequence):
  """The image bytes of a TFDS build's records, read when the scorer takes them."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self.source[i]["encoded"]


def evaluate_run(workdir: str, data_config: ml_collections.ConfigDict, which: str = "best",
                 out_dir: str | None = None, batch_size: int | None = None,
                 progress: bool = False) -> dict:
  """Scores every image of `data_config`'s dataset with the run; returns and writes metrics."""
  loaded = load_run(workdir, which)
  config = ml_collections.ConfigDict(loaded.info["config"])
  records = pipeline.load_records(data_config)
  tfds = tfds_source.build_dir(data_config)
  records, skipped = pipeline.check_records(records, on_error=data_config.get("on_error", "raise"),
                                            tfds=tfds)
  # The run's test-time view (resize or native crops), as `score` and `Scorer` apply it; a TFDS
  # build gives the images' bytes, read lazily.
  images = (_BuildImages(tfds_source.TfdsSource(records, tfds)) if tfds
            else [r.path for r in records])
  scorer = Scorer(loaded, batch_size=batch_size or config.eval_batch_size)
  pred = scorer(images, progress=progress, desc=f"eval {data_config.name}")
  mos = np.array([r.mos for r in records])
  result = {"train_dataset": config.data.name, "test_dataset": data_config.name,
            "n": len(records), "n_skipped": len(skipped), "checkpoint": which,
            **metrics.compute_metrics(pred, mos)}
  out = Path(out_dir or workdir)
  out.mkdir(parents=True, exist_ok=True)
  run_folder.write_json(out / f"eval_{data_config.name}.json", result)
  run_folder.write_csv(out / f"eval_{data_config.name}.csv", ("path", "mos", "pred"),
                       ([r.path, f"{r.mos:.6f}", f"{float(p):.6f}"]
                        for r, p in zip(records, pred, strict=True)))
  if skipped:
    run_folder.write_csv(out / f"eval_{data_config.name}_skipped.csv", ("path", "reason"), skipped)
  return result


def data_config_for(run_config, name: str, data_dir: str, options: dict | None = None,
                    on_error: str = "raise", source: str | None = None,
                    tfds_dir: str | None = None) -> ml_collections.ConfigDict:
  """The run's data config pointed at another dataset (its options reset to the defaults).

  source / tfds_dir: None keeps the run's (a run trained from TFDS evaluates from TFDS).
  """
  from iqa_jax.defaults import base_config
  d = base_config().data
  d.name, d.dir, d.on_error = name, data_dir, on_error
  d.source = source or run_config.data.get("source", "files")
  d.tfds_dir = run_config.data.get("tfds_dir", "") if tfds_dir is None else tfds_dir
  d.image_size = run_config.data.image_size
  for k, v in (options or {}).items():
    is_flag = isinstance(d.options.get(k), bool)
    d.options[k] = str(v).lower() in ("1", "true", "yes") if is_flag else v
  return d


def check_demo_folder(data_dir: str) -> None:
  """`evaluate --dataset demo` reads a demo set that exists; it never builds one (11,200 images)
  in a folder the user may have mistyped."""
  if not (Path(data_dir) / "dmos.csv").is_file():
    raise ValueError(
        f"--data-dir {data_dir} holds no demo set (no dmos.csv); evaluate does not build one. "
        f"Pass the folder the demo was built in (configs/demo.py: demo_data), or build it first: "
        f"python -c \"from iqa_jax.data.demo import build_demo; build_demo('{data_dir}')\"")
