"""Score images into a CSV: python -m iqa_jax.score --workdir RUN --out scores.csv IMAGES...

IMAGES are files, folders (searched recursively), globs, or @list.txt (one path per line).
Rows stream to disk as they are scored (path, score in [0,1], mos on the training set's scale,
error); an unreadable input gets its error in its row and the exit status is 1.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iqa_jax import checkpoint, parallel, run_folder
from iqa_jax.data import pp
from iqa_jax.data.records import MOS_SCALES
from iqa_jax.models.model import create_model
from iqa_jax.steps import make_eval_step

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jfif"}
COLUMNS = ("path", "score", "mos", "error")


def expand_inputs(inputs: Iterable[str]) -> list[str]:
  """Files, folders, globs and @file-lists -> an ordered list of paths (missing ones kept)."""
  paths: list[str] = []
  for item in inputs:
    if item.startswith("@"):
      with open(item[1:]) as f:
        paths.extend(line.strip() for line in f if line.strip() and not line.startswith("#"))
    elif os.path.isdir(item):
      found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
      paths.extend(found)
    elif any(ch in item for ch in "*?[") and not os.path.exists(item):
      paths.extend(sorted(glob.glob(item, recursive=True)))
    else:
      paths.append(item)  # a missing file is reported in its row, never dropped
  return paths


def load_run(workdir: str, which: str = "best"):
  """A trained run folder -> (config, jitted score fn, params, pp string)."""
  config = run_folder.read_config(workdir)  # the model the run was trained as, checked
  run_folder.check_base_checkpoint(workdir, config)  # against the frozen weights it started from
  model, params, preprocessing = create_model(config)
  flat, _ = checkpoint.load_params(workdir, which)
  params = checkpoint.unflatten_into(params, flat)
  pp_str = pp.run_pp(config.data, preprocessing)
  mesh = parallel.make_mesh()  # scoring batches split over all devices
  return (config, parallel.jit_eval_step(make_eval_step(model), mesh),
          parallel.put_replicated(params, mesh), pp_str)


def _done_paths(out: str) -> set[str]:
  if not os.path.exists(out):
    return set()
  with open(out, newline="") as f:
    return {row["path"] for row in csv.DictReader(f)}


def score_paths(workdir: str, paths: Sequence[str], out: str, *, batch_size: int = 32,
                which: str = "best", resume: bool = False, workers: int = 4,
                progress: bool = True) -> dict:
  """Scores `paths` into the CSV `out`; returns {'scored', 'failed', 'skipped_resume'}."""
  config, score_fn, params, pp_str = load_run(workdir, which)
  scale, offset = MOS_SCALES.get(config.data.name, (1.0, 0.0))
  preprocess = pp.get_preprocess_fn(pp_str)
  done = _done_paths(out) if resume else set()
  todo = [p for p in paths if p not in done]
  append = resume and os.path.exists(out)
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  from tqdm.auto import tqdm
  bar = tqdm(total=len(todo), unit="img", desc="score", disable=not progress, file=sys.stderr)

  def load(path):
    try:
      return preprocess({"path": path})["image"], ""
    except Exception as e:  # noqa: BLE001 - the row records any failure
      return None, f"{type(e).__name__}: {e}".replace("\n", " ")

  scored = failed = 0
  with open(out, "a" if append else "w", newline="") as f, ThreadPoolExecutor(workers) as pool:
    writer = csv.writer(f)
    if not append:
      writer.writerow(COLUMNS)
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      loaded = list(pool.map(load, chunk))
      ok = [i for i, (img, _) in enumerate(loaded) if img is not None]
      scores = {}
      if ok:
        batch = np.stack([loaded[i][0] for i in ok])
        pad = batch_size - len(ok)  # a fixed batch shape compiles once
        if pad:
          batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        pred = np.asarray(score_fn(params, batch))[:len(ok)]
        scores = dict(zip(ok, pred.tolist()))
      for i, path in enumerate(chunk):
        if i in scores:
          s = scores[i]
          writer.writerow((path, f"{s:.6f}", f"{s * scale + offset:.6f}", ""))
          scored += 1
        else:
          writer.writerow((path, "", "", loaded[i][1]))
          failed += 1
      f.flush()  # a crash loses nothing already written
      bar.update(len(chunk))
  bar.close()
  return {"scored": scored, "failed": failed, "skipped_resume": len(paths) - len(todo)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.score", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("images", nargs="+", help="files, folders, globs or @list.txt")
  ap.add_argument("--workdir", required=True, help="run folder made by iqa_jax.train")
  ap.add_argument("--out", default="scores.csv", help="CSV to write (default scores.csv)")
  ap.add_argument("--which", default="best", choices=("best", "last"))
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--workers", type=int, default=4, help="decoding threads")
  ap.add_argument("--resume", action="store_true", help="skip paths already in --out")
  ap.add_argument("--fail-on-error", action=argparse.BooleanOptionalAction, default=True,
                  help="exit 1 when any input could not be scored (default on)")
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  paths = expand_inputs(a.images)
  if not paths:
    print(f"error: no images found in {a.images}", file=sys.stderr)
    return 2
  try:
    summary = score_paths(a.workdir, paths, a.out, batch_size=a.batch_size, which=a.which,
                          resume=a.resume, workers=a.workers, progress=not a.no_progress)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"scored {summary['scored']}, failed {summary['failed']}"
        + (f", already in CSV {summary['skipped_resume']}" if a.resume else "") + f" -> {a.out}")
  if summary["failed"]:
    print(f"{summary['failed']} input(s) could not be scored; see the 'error' column of {a.out}",
          file=sys.stderr)
    return 1 if a.fail_on_error else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
