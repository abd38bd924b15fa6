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
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from iqa_jax import cli
from iqa_jax.data import datasets, pipeline, pp, threaded
from iqa_jax.data.cache import (  # noqa: F401 - check_cache and open_cache are used from here too
    IMAGES,
    INDEX,
    check_cache,
    open_cache,
    read_index,
    recipe,
)
from iqa_jax.data.records import Record

LOCK = ".prepare.lock"


@contextlib.contextmanager
def _single_writer(folder: Path):
  """Holds folder/.prepare.lock; a second build of the same folder is refused, not interleaved."""
  with open(folder / LOCK, "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(f"Another prepare is writing {folder}; wait for it to finish.") from None
    yield


RECORD_EVERY_S = 2.0  # how often a build records the rows it has written


def build_cache(records: Sequence[Record], out: str, size: int, resample: str = "bilinear",
                threads: int = os.cpu_count() or 1, progress: bool = True) -> Path:
  """Writes out/images.npy and out/index.json for checked records; returns the folder.

  A folder that already holds a cache is left as it is when it was built with the same recipe
  for the same images, and refused otherwise (another --out, or delete it first). A cut build
  (Ctrl-C, a kill) goes on from the last rows it recorded as written (`images.npy.partial` and
  its `.json`: the recipe, a digest of the image list, the rows done) when it is run again for
  the same recipe and images; for another, it starts over.
  """
  folder = Path(out)
  pp_str, paths = recipe(size, resample), [r.path for r in records]
  check_out(out, pp_str, paths)
  folder.mkdir(parents=True, exist_ok=True)
  with _single_writer(folder):
    if is_current(str(folder), pp_str, paths):
      return folder
    check_out(out, pp_str, paths)  # again, now that no other build can change it
    tmp, shape = folder / (IMAGES + ".partial"), (len(records), size, size, 3)
    done_file = tmp.with_name(tmp.name + ".json")
    cut = {"pp": pp_str, "paths_sha256": _digest(paths), "shape": list(shape)}
    done = _rows_done(tmp, done_file, cut)
    if not done:
      done_file.unlink(missing_ok=True)  # a record of another build must not vouch for this one
    array = np.lib.format.open_memmap(tmp, mode="r+" if done else "w+", dtype=np.uint8,
                                      shape=shape)
    if done:
      print(f"prepare: going on with a cut build of {folder}: {done} of {len(records)} images "
            "already written", file=sys.stderr)
    decode = pp.get_preprocess_fn(pp_str)
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(records), initial=done, desc="prepare", unit="img",
               disable=not progress, file=sys.stderr)
    last = time.monotonic()
    images = threaded.imap(lambda r: decode({"path": r.path})["image"], records[done:], threads)
    for i, image in enumerate(images, start=done):
      array[i] = image
      bar.update(1)
      if time.monotonic() - last > RECORD_EVERY_S:
        _record_rows(array, done_file, cut, i + 1)
        last = time.monotonic()
    bar.close()
    array.flush()
    del array
    os.replace(tmp, folder / IMAGES)
    index = {"pp": pp_str, "size": size, "resample": resample, "paths": paths}
    _write_atomic(folder / INDEX, json.dumps(index))  # last: a killed build has no index
    done_file.unlink(missing_ok=True)
  return folder


def _digest(paths: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def _record_rows(array: np.ndarray, done_file: Path, cut: dict, done: int) -> None:
  """Rows [0, done) are on disk: flushed first, then recorded."""
  array.flush()
  _write_atomic(done_file, json.dumps({**cut, "done": done}))


def _rows_done(tmp: Path, done_file: Path, cut: dict) -> int:
  """How many rows of a cut build of this recipe and image list are written (0: start over)."""
  if not (tmp.exists() and done_file.exists()):
    return 0
  try:
    recorded = json.loads(done_file.read_text())
    done = int(recorded.pop("done"))
  except (ValueError, KeyError, TypeError, AttributeError):
    return 0
  return done if recorded == cut and 0 < done <= cut["shape"][0] else 0


def check_out(out: str, pp_str: str, paths: Sequence[str] | None = None) -> None:
  """Refuses an --out that is a file, or that holds a cache of another recipe or image list
  (paths=None: the list is not known yet)."""
  folder = Path(out)
  if folder.exists() and not folder.is_dir():
    raise ValueError(f"--out {folder} is a file; name a folder for the cache.")
  if not (folder / INDEX).exists():
    return
  index = read_index(out)
  same_pp = pp.canonical_ops(index["pp"]) == pp.canonical_ops(pp_str)
  if not same_pp or (paths is not None and index["paths"] != list(paths)):
    count = "" if paths is None else f" for {len(paths)} images"
    raise ValueError(f"{folder} already holds a cache made by {index['pp']!r} for "
                     f"{len(index['paths'])} images; this build is {pp_str!r}{count}. Pick another "
                     f"--out, or delete {folder} to rebuild it.")


def is_current(cache: str, pp_str: str, paths: Sequence[str]) -> bool:
  """Whether `cache` holds a finished build of pp_str for exactly these paths."""
  if not (Path(cache) / INDEX).exists():
    return False
  index = read_index(cache)
  return pp.canonical_ops(index["pp"]) == pp.canonical_ops(pp_str) and index["paths"] == paths


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _options(pairs: list[str]) -> dict:
  """--option KEY=VALUE pairs, typed like the config fields data.options.KEY they stand for."""
  from iqa_jax import defaults  # pylint: disable=g-import-not-at-top
  known = sorted(defaults.base_config().data.options)
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or key not in known:
      raise ValueError(f"--option {pair!r}: expected KEY=VALUE with KEY one of {known} "
                       f"({datasets.DOCS}).")
    options[key] = datasets.typed_option(key, value, f"--option {pair!r}")
  return options


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m iqa_jax.data.prepare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, help=f"one of {sorted(datasets.REGISTRY)}")
  parser.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True,
                      help="the dataset's release folder (docs/datasets.md)")
  parser.add_argument("--out", required=True, help="folder of the cache (images.npy, index.json)")
  parser.add_argument("--size", type=int, default=512, help="square side (§3.1: 512)")
  parser.add_argument("--resample", default="bilinear", choices=pp.RESAMPLE_FILTERS,
                      help="as the backbone's processor")
  parser.add_argument("--on-error", "--on_error", dest="on_error", default="raise",
                      choices=("raise", "skip"), help="an unreadable image or bad annotation "
                      "row: stop (raise), or leave it out and list it in skipped.json (skip)")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="decoding threads (default: the CPU count)")
  parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="adapter option, e.g. resolution=512x384 or drop_practice=false")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    if args.size < 1 or args.threads < 1:
      raise ValueError(f"--size and --threads must be >= 1, got {args.size} and {args.threads}.")
    check_out(args.out, recipe(args.size, args.resample))  # before minutes of checking images
    config = ml_collections.ConfigDict({"name": args.dataset, "dir": args.data_dir,
                                        "options": _options(args.option)})
    records = pipeline.load_records(config)
    records, skipped = pipeline.check_records(records, on_error=args.on_error,
                                              threads=args.threads)
    if is_current(args.out, recipe(args.size, args.resample), [r.path for r in records]):
      print(f"{args.out} already holds these {len(records)} images at {args.size} "
            f"({args.resample}); nothing to do.")
      return 0
    t0 = time.time()
    folder = build_cache(records, args.out, args.size, args.resample, args.threads,
                         progress=not args.no_progress)
  except (FileNotFoundError, ValueError) as e:  # images.ImageError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  if skipped:
    _write_atomic(folder / "skipped.json", json.dumps(skipped, indent=1))
  seconds = time.time() - t0
  print(f"{len(records)} images ({len(skipped)} skipped) -> {folder / IMAGES} "
        f"in {seconds:.0f} s ({len(records) / max(seconds, 1e-9):.0f} img/s)")
  return 0


if __name__ == "__main__":
  cli.run(main, "the images written so far are kept; the same command goes on after them")
