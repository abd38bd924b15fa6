"""Input-pipeline throughput: 1024x768 JPEGs -> 512x512 batches (uint8 by default) per worker count.

  python scripts/bench_pipeline.py [--images 512] [--workers 0,1,2] [--threads 8]

Writes KonIQ-like JPEGs (scikit-image photos at 1024x768 with film grain, quality 90, about
240 KB each) to a temporary folder, then times one epoch of make_train_loader from the files and
from a prepare cache of the same images.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from iqa_jax.data import pipeline, pp, prepare
from iqa_jax.data.records import Record

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "brick", "camera")


def make_jpegs(folder: Path, n: int) -> list[Record]:
  import skimage.data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  bases = [np.asarray(Image.fromarray(getattr(skimage.data, p)()).convert("RGB")
                      .resize((1024, 768), Image.Resampling.BICUBIC), np.float32) for p in PHOTOS]
  records = []
  for i in range(n):
    grain = rng.normal(0, 8, bases[0].shape)  # texture, so files decode like real photos
    x = np.clip(bases[i % len(bases)] + grain, 0, 255).astype(np.uint8)
    path = folder / f"{i:05d}.jpg"
    Image.fromarray(x).save(path, quality=90)
    records.append(Record(str(path), 0.5, 2.5))
  return records


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) and of its finished children (worker processes)."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_epoch(records, pp_str, workers, threads, batch_size, cache=None,
               tfds=None) -> tuple[float, float]:
  """(steady img/s of wall time, img per CPU-second over the whole epoch incl. start-up)."""
  loader = pipeline.make_train_loader(records, pp_str, batch_size, seed=0, epoch=0,
                                      workers=workers, threads=threads, cache=cache, tfds=tfds)
  cpu0 = _cpu_seconds()
  warmup = max(len(loader) // 4, 1)  # worker start-up and the prefetch buffer filling up
  for i, batch in enumerate(loader):  # noqa: B007 - the last batch is freed below
    if i == warmup:
      t0 = time.perf_counter()
  wall = time.perf_counter() - t0
  del batch
  gc.collect()  # joins the worker processes, so their CPU time is counted
  return (len(loader) - warmup - 1) * batch_size / wall, len(loader) * batch_size / (
      _cpu_seconds() - cpu0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--threads", type=int, default=0, help="per process; 0: cores / processes")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--normalize", default="device", choices=("device", "host"),
                      help="device (the default of runs): uint8 batches; host: float32 batches")
  args = parser.parse_args()
  pp_str = pp.native_pp({"size": 512, "crop": None, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                         "resample": "bilinear"}, normalize=args.normalize == "host")
  dtype = "float32" if args.normalize == "host" else "uint8"
  with tempfile.TemporaryDirectory() as tmp:
    records = make_jpegs(Path(tmp), args.images)
    t0 = time.perf_counter()
    cache = prepare.build_cache(records, str(Path(tmp) / "cache"), 512)
    prep = len(records) / (time.perf_counter() - t0)
    print(f"{os.cpu_count()} CPU cores; {args.images} images 1024x768 -> batches of "
          f"{args.batch_size}x512x512x3 {dtype}; pp: {pp_str}")
    print(f"prepare cache: {prep:.0f} img/s ({args.images * 512 * 512 * 3 / 2**20:.0f} MiB)")
    print("img/s: wall clock after warm-up (depends on other load on the machine); img/cpu-s: "
          "images per CPU-second over the epoch, start-up included")
    print(f"{'workers':>7} {'threads':>7} | {'files img/s':>11} {'img/cpu-s':>9} | "
          f"{'cache img/s':>11} {'img/cpu-s':>9}")
    runs = [(0, 1)] + [(int(w), args.threads) for w in args.workers.split(",")]
    for workers, threads in runs:  # (0, 1): one thread, i.e. what one core does
      files = time_epoch(records, pp_str, workers, threads or None, args.batch_size)
      cached = time_epoch(records, pp_str, workers, threads or None, args.batch_size, str(cache))
      shown = threads or max((os.cpu_count() or 1) // max(workers, 1), 1)
      print(f"{workers:>7} {shown:>7} | {files[0]:>11.0f} {files[1]:>9.0f} | "
            f"{cached[0]:>11.0f} {cached[1]:>9.0f}")


if __name__ == "__main__":
  main()
