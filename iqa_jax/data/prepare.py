"""Decode and resize a dataset once into a cache, so 30 epochs don't decode the same JPEGs 30 times.

  python -m iqa_jax.data.prepare --dataset koniq10k --data_dir /data/koniq --out /data/koniq_512

The cache is one uint8 array images.npy (N, size, size, 3), read through a memory map, plus
index.json (size, resample, the image paths in row order). Rows hold exactly what
`decode|resize(size, resample)` makes from the files, so training from the cache
(--config.data.cache=/data/koniq_512) sees the same pixels. Raw arrays beat ArrayRecord here:
reading a row is a memcpy, with no decode (see scripts/bench_pipeline.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from iqa_jax.data import datasets, pipeline, pp
from iqa_jax.data.records import Record

IMAGES, INDEX = "images.npy", "index.json"


def build_cache(records: Sequence[Record], out: str, size: int, resample: str = "bilinear",
                threads: int = os.cpu_count() or 1) -> Path:
  """Writes out/images.npy and out/index.json for checked records; returns the folder."""
  folder = Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  tmp = folder / (IMAGES + ".partial")
  array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(records), size, size, 3))
  decode = pp.get_preprocess_fn(f"decode|resize({size}, {resample!r})")
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
    images = pool.map(lambda r: decode({"path": r.path})["image"], records)
    for i, image in enumerate(images):
      array[i] = image
  array.flush()
  del array
  os.replace(tmp, folder / IMAGES)
  index = {"size": size, "resample": resample, "paths": [r.path for r in records]}
  (folder / INDEX).write_text(json.dumps(index))  # written last: a killed build has no index
  return folder


class CachedImages(Sequence):
  """Rows of a cache for the given paths, in their order; opens the memmap lazily per process."""

  def __init__(self, cache: str, paths: Sequence[str]):
    index_file = Path(cache) / INDEX
    if not index_file.is_file():
      raise ValueError(f"{cache} is not a prepare cache (no {INDEX}); build it with "
                       "python -m iqa_jax.data.prepare.")
    index = json.loads(index_file.read_text())
    self.file = str(Path(cache) / index.get("array", IMAGES))  # a feature cache names its own
    self.size = index.get("size")
    rows = {p: i for i, p in enumerate(index["paths"])}
    missing = [p for p in paths if p not in rows]
    if missing:
      raise ValueError(f"{len(missing)} images (e.g. {missing[0]}) are not in the cache {cache}; "
                       "rebuild it for this dataset and data_dir.")
    self.rows = np.array([rows[p] for p in paths], np.int64)
    self._array = None

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> np.ndarray:
    if self._array is None:
      self._array = np.load(self.file, mmap_mode="r")
    return np.array(self._array[self.rows[i]])

  def __getstate__(self):  # worker processes reopen the memmap instead of pickling the images
    return {**self.__dict__, "_array": None}


def open_cache(cache: str, paths: Sequence[str]) -> CachedImages:
  return CachedImages(cache, paths)


def cached_paths(cache: str) -> set[str]:
  """The image paths a cache holds (all decoded fine when it was built)."""
  return set(json.loads((Path(cache) / INDEX).read_text())["paths"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, help=f"one of {sorted(datasets.REGISTRY)}")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--size", type=int, default=512, help="square side (§3.1: 512)")
  parser.add_argument("--resample", default="bilinear", help="as the backbone's processor")
  parser.add_argument("--on_error", default="raise", choices=("raise", "skip"))
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="adapter option, e.g. resolution=512x384")
  args = parser.parse_args(argv)
  options = dict(o.split("=", 1) for o in args.option)
  config = ml_collections.ConfigDict({"name": args.dataset, "dir": args.data_dir,
                                      "options": options})
  records = datasets.load_records(config)
  records, skipped = pipeline.check_records(records, on_error=args.on_error, threads=args.threads)
  t0 = time.time()
  folder = build_cache(records, args.out, args.size, args.resample, args.threads)
  if skipped:
    with open(folder / "skipped.json", "w") as f:
      json.dump(skipped, f, indent=1)
  print(f"{len(records)} images ({len(skipped)} skipped) -> {folder / IMAGES} "
        f"in {time.time() - t0:.0f} s ({len(records) / max(time.time() - t0, 1e-9):.0f} img/s)")


if __name__ == "__main__":
  main()
