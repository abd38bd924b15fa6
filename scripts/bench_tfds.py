"""TFDS build time and read throughput vs the files, on a KonIQ-style release of N images.

  python scripts/bench_tfds.py [--images 3000] [--threads 0] [--keep DIR]

Writes a KonIQ-10k layout (koniq10k_scores_and_distributions.csv, 1024x768/*.jpg: the film-grain
photos of bench_pipeline.py, about 240 KB each), builds it with iqa_jax.data.tfds_build, then
times listing the records and one epoch of make_train_loader (decode|resize(512), uint8 batches)
from the files and from the build. Needs the `tfds` extra (TensorFlow, to build).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import make_jpegs, time_epoch  # noqa: E402

from iqa_jax.data import koniq10k, pipeline  # noqa: E402
from iqa_jax.defaults import base_config  # noqa: E402


def make_koniq_release(folder: Path, n: int) -> None:
  images = folder / "1024x768"
  images.mkdir(parents=True)
  records = make_jpegs(images, n)
  rng = np.random.default_rng(1)
  with open(folder / koniq10k.TABLE, "w", newline="") as f:
    w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"])
    for r in records:
      mos = float(rng.uniform(1.5, 4.5))
      w.writerow([Path(r.path).name, 0, 0, 0, 0, 0, 100, mos, 0.5, 20 * mos])


def _size_mb(folder: Path) -> float:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=3000)
  parser.add_argument("--threads", type=int, default=0, help="0: one per core")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--keep", default="", help="work folder to keep (default: a temporary one)")
  args = parser.parse_args()
  tmp = Path(args.keep or tempfile.mkdtemp())
  try:
    release, data = tmp / "koniq10k", tmp / "tensorflow_datasets"
    if not (release / koniq10k.TABLE).is_file():
      t0 = time.perf_counter()
      make_koniq_release(release, args.images)
      print(f"release: {args.images} JPEGs 1024x768, {_size_mb(release):.0f} MB, written in "
            f"{time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    import tensorflow  # noqa: F401  (timed apart: every build command pays it once)
    t_import = time.perf_counter() - t0
    from iqa_jax.data.tfds import build as tfds_build  # pylint: disable=g-import-not-at-top
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    folder = tfds_build.build("koniq10k", str(release), str(data))
    t_build = time.perf_counter() - t0
    print(f"{os.cpu_count()} CPU cores. build: {t_build:.1f} s ({args.images / t_build:.0f} img/s, "
          f"check_records included) + {t_import:.1f} s to import TensorFlow; "
          f"{_size_mb(folder):.0f} MB of ArrayRecord")

    d = base_config().data
    d.update(name="koniq10k", dir=str(release), tfds_dir=str(data))
    t0 = time.perf_counter()
    files = pipeline.check_records(pipeline.load_records(d))[0]
    t_files = time.perf_counter() - t0
    d.update(source="tfds", dir="")
    t0 = time.perf_counter()
    built = pipeline.check_records(pipeline.load_records(d), tfds=str(folder))[0]
    t_tfds = time.perf_counter() - t0
    print(f"records ready to train: files {t_files:.1f} s (adapter + decoding check), "
          f"TFDS {t_tfds:.1f} s (reading every example once)")

    pp_str = "decode|resize(512)"
    threads = args.threads or None
    print("img/s: wall clock after warm-up (depends on other load on the machine); img/cpu-s: "
          "images per CPU-second over the epoch, start-up included")
    print(f"{'source':>6} | {'img/s':>6} {'img/cpu-s':>9}")
    for name, recs, kw in (("files", files, {}), ("tfds", built, {"tfds": str(folder)}),
                           ("files", files, {}), ("tfds", built, {"tfds": str(folder)})):
      ips, per_cpu = time_epoch(recs, pp_str, 0, threads, args.batch_size, **kw)
      print(f"{name:>6} | {ips:>6.0f} {per_cpu:>9.0f}")
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
