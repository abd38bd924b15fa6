"""Records -> batches on grain: a random-access source, shuffle, pp ops, batch, threads/workers.

The source is any sequence of example dicts (`RecordSource` here, the prepare cache, or a TFDS
build, tfds_source.TfdsSource); the rest of the chain does not care which. `load_records` picks
where a config's records come from: the adapter's files or a TFDS build.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from iqa_jax.data import cache as cache_lib
from iqa_jax.data import datasets, images, pp, threaded
from iqa_jax.data.records import Record, RecordSource
from iqa_jax.data.tfds import source as tfds_source

_BATCH_KEYS = ("image", "mos", "index")


def load_records(data_config) -> list[Record]:
  """config.data {name, dir, options, source} -> the dataset's records (unchecked; see
  check_records): from the release's files (datasets) or a TFDS build (tfds.source)."""
  if data_config.get("source", "files") != "files":
    return tfds_source.load_records(data_config)
  return datasets.load_records(data_config)


def _check_file(path: str) -> str | None:
  """Reason the file is unusable, or None. Decodes fully (JPEG at 1/8 scale) to catch truncation."""
  if not os.path.isfile(path):
    return "file not found"
  try:
    with Image.open(path) as img:
      if img.format == "JPEG":
        img.draft(img.mode, (max(img.width // 8, 1), max(img.height // 8, 1)))
      img.load()
  except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unusable
    return f"cannot decode image ({type(e).__name__}: {e})"
  return None


def _check_mos(r: Record) -> str | None:
  if not (math.isfinite(r.mos) and math.isfinite(r.raw_mos)):
    return f"MOS is not a number (mos={r.mos}, raw_mos={r.raw_mos})"
  if not 0.0 <= r.mos <= 1.0:
    return f"normalised MOS {r.mos} (raw {r.raw_mos}) is outside [0, 1]"
  return None


def check_records(records: Sequence[Record], on_error: str = "raise", threads: int = 8,
                  cache: str | None = None,
                  tfds: str | None = None) -> tuple[list[Record], list[tuple[str, str]]]:
  """Verifies MOS values, duplicate paths and that each file decodes -> (kept, [(path, reason)]).

  on_error='raise' raises on the first bad record in order; 'skip' drops and returns them.
  With a prepare cache, an image counts as readable when the cache holds it (no decoding); with a
  TFDS build (tfds: its folder), when the build holds it (it was checked when built).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
  if tfds and not cache:
    held = {r.path for r in tfds_source.read_records(tfds)}
    file_reasons = [None if r.path in held else f"not in the TFDS build {tfds}" for r in records]
  elif cache:
    held = cache_lib.cached_paths(cache)
    file_reasons = [None if r.path in held else f"not in the cache {cache}" for r in records]
  else:
    file_reasons = list(threaded.imap(_check_file, [r.path for r in records], threads))
  kept, skipped, seen = [], [], {}
  for i, (r, file_reason) in enumerate(zip(records, file_reasons, strict=True)):
    where = r.extras.get("row", f"record {i}")  # adapters put 'table.csv:LINE' there
    duplicate = f"duplicate path (also at {seen[r.path]})" if r.path in seen else None
    reason = _check_mos(r) or duplicate or file_reason
    seen.setdefault(r.path, where)
    if reason is None:
      kept.append(r)
      continue
    if on_error == "raise":
      error = images.ImageError if reason is file_reason else ValueError
      raise error(f"{r.path} ({where}): {reason}. Fix the file or its annotation row, "
                  "or set data.on_error=skip to skip it and log it.")
    skipped.append((r.path, reason))
  if skipped:
    logging.warning("Skipped %d of %d records (data.on_error=skip); first: %s: %s",
                    len(skipped), len(records), *skipped[0])
  return kept, skipped


def _preprocess(pp_fn):
  def apply(example: dict) -> dict:
    try:
      out = pp_fn(example)
    except images.ImageError:
      raise
    except Exception as e:
      raise images.ImageError(f"{example['path']}: preprocessing failed ({type(e).__name__}: "
                              f"{e}). Run check_records first, or fix the pp string.") from e
    return {k: out[k] for k in _BATCH_KEYS}
  return apply


def _pad_batch(batch_size: int):
  def pad(batch: dict) -> dict:
    n = len(batch["index"])
    out = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
           for k, v in batch.items()}
    out["index"][n:] = -1
    out["valid"] = np.arange(batch_size) < n
    return out
  return pad


class CachedSource(Sequence):
  """Records whose images come from a prepare cache: example dicts with 'image' already decoded.

  The cache must have been built with the first ops of `pp_str` (cache_lib.check_cache).
  """

  def __init__(self, records: Sequence[Record], cache: str, pp_str: str):
    self._base = RecordSource(records)
    self._images = cache_lib.open_cache(cache, [r.path for r in records], pp_str)

  def __len__(self) -> int:
    return len(self._base)

  def __getitem__(self, i: int) -> dict:
    return {**self._base[i], "image": self._images[i]}


@dataclasses.dataclass
class Loader:
  """An iterable of batches with a length; each iteration replays the same order.

  Each of `threads` threads (per worker process, if any) builds whole batches; PIL decodes and
  resizes without holding the GIL, so threads alone use several cores. None: cores / processes.
  """
  dataset: grain.MapDataset
  workers: int = 0
  threads: int | None = None

  def __len__(self) -> int:
    return len(self.dataset)

  def __iter__(self) -> Iterator[dict]:
    threads = self.threads or max((os.cpu_count() or 1) // max(self.workers, 1), 1)
    # The buffer holds batches: one in flight per thread keeps memory at threads x batch.
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2))
    ds = self.dataset.to_iter_dataset(read)
    if self.workers > 0:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; tests don't parse them
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    return iter(ds)


def epoch_seed(seed: int, epoch: int) -> int:
  """One shuffle seed per (seed, epoch), the same on any machine."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(n: int, seed: int, epoch: int, shard_index: int = 0,
                shard_count: int = 1) -> np.ndarray:
  """The record indices one shard trains on in one epoch, in order (the train loader's order).

  All shards shuffle range(n) alike with grain and take every shard_count-th index from the
  shard_index-th, so shards are disjoint; each takes n // shard_count, so all run the same
  number of steps.
  """
  ds = grain.MapDataset.range(n).shuffle(seed=epoch_seed(seed, epoch))
  per_shard = n // shard_count
  ds = ds[shard_index:per_shard * shard_count:shard_count]
  return np.fromiter((ds[i] for i in range(len(ds))), np.int64, len(ds))


def _source(records, cache, pp_str, tfds=None):
  if cache:
    return CachedSource(records, cache, pp_str)
  if tfds:
    return tfds_source.TfdsSource(records, tfds)
  return RecordSource(records)


def make_train_loader(records: Sequence[Record], pp_str: str, batch_size: int, *, seed: int,
                      epoch: int, workers: int = 0, shard_index: int = 0, shard_count: int = 1,
                      drop_remainder: bool = True, threads: int | None = None,
                      cache: str | None = None, tfds: str | None = None) -> Loader:
  """Shuffled batches {'image', 'mos', 'index'} of one epoch for this shard (JAX process), in
  epoch_order."""
  order = epoch_order(len(records), seed, epoch, shard_index, shard_count)
  source = _source(records, cache, pp_str, tfds)
  ds = grain.MapDataset.source(order.tolist()).map(functools.partial(operator.getitem, source))
  ds = ds.map(_preprocess(pp.get_preprocess_fn(pp_str)))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return Loader(ds, workers=workers, threads=threads)


def make_eval_loader(records: Sequence[Record], pp_str: str, batch_size: int, *,
                     workers: int = 0, threads: int | None = None,
                     cache: str | None = None, tfds: str | None = None) -> Loader:
  """Batches in record order; the last is zero-padded to batch_size, with a 'valid' mask."""
  ds = grain.MapDataset.source(_source(records, cache, pp_str, tfds))
  ds = ds.map(_preprocess(pp.get_preprocess_fn(pp_str)))
  ds = ds.batch(batch_size, drop_remainder=False).map(_pad_batch(batch_size))
  return Loader(ds, workers=workers, threads=threads)
