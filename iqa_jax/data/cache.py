"""The preparation cache as training reads it: a memory-mapped uint8 array of decoded, resized
images (images.npy) and its index.json, checked against the run's pp string before use.

`python -m iqa_jax.data.prepare` builds it; a feature cache (`python -m iqa_jax.features`) uses the
same index with `kind: features` and its own array. The pipeline reads both through here, so the
data modules import one way: prepare -> pipeline -> cache.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iqa_jax.data import pp

IMAGES, INDEX = "images.npy", "index.json"


def recipe(size: int, resample: str = "bilinear") -> str:
  """The pp string a cache's rows are made with."""
  return f"decode|resize({size}, {resample!r})"


def read_index(cache: str) -> dict:
  """A cache's index.json {'pp', 'size', 'resample', 'paths'}, or one line saying what is wrong."""
  index_file = Path(cache) / INDEX
  if not index_file.is_file():
    raise ValueError(f"{cache} is not a prepare cache (no {INDEX}); build it with "
                     "python -m iqa_jax.data.prepare.")
  try:
    index = json.loads(index_file.read_text())
    if index.get("kind") == "features":  # python -m iqa_jax.features: rows are feature vectors
      return {**index, "paths": list(index["paths"])}
    size, paths = int(index["size"]), list(index["paths"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index_file} is unreadable ({type(e).__name__}: {e}); delete {cache} and "
                     "rebuild it with python -m iqa_jax.data.prepare.") from None
  # Caches built before the pp string was stored: size and resample say the same.
  pp_str = index.get("pp") or recipe(size, index.get("resample", "bilinear"))
  return {**index, "pp": pp_str, "size": size, "paths": paths}


def check_cache(cache: str, pp_str: str) -> dict:
  """The cache's index when its rows are what the run's pp string makes from the files.

  The pp string must start with the cache's recipe (decode|resize(size, resample), in any
  spelling); its later ops then run on the cached rows. Anything else is refused, since the
  cached pixels would silently differ from what the run asks for.
  """
  index = read_index(cache)
  built = pp.canonical_ops(index["pp"])
  if pp.canonical_ops(pp_str)[:len(built)] != built:
    raise ValueError(
        f"The cache {cache} holds images made by {index['pp']!r}, but the run's pp string "
        f"{pp_str!r} does not start with that recipe, so the cached pixels would not be the ones "
        "it asks for. Build a cache with the size and resampling of the pp string "
        "(python -m iqa_jax.data.prepare --size N --resample R), or set --config.data.cache=''.")
  images = Path(cache) / IMAGES
  shape = (len(index["paths"]), index["size"], index["size"], 3)
  try:
    found = np.load(images, mmap_mode="r").shape
  except (OSError, ValueError) as e:
    raise ValueError(f"{images} is unreadable ({type(e).__name__}: {e}); delete {cache} and "
                     "rebuild it with python -m iqa_jax.data.prepare.") from None
  if found != shape:
    raise ValueError(f"{images} has shape {found} but {INDEX} describes {shape}; delete {cache} "
                     "and rebuild it with python -m iqa_jax.data.prepare.")
  return index


class CachedImages(Sequence):
  """Rows of a cache for the given paths, in their order; opens the memmap lazily per process."""

  def __init__(self, cache: str, paths: Sequence[str], pp_str: str):
    index = read_index(cache)
    if index.get("kind") == "features":
      self.file, self.size = str(Path(cache) / index["array"]), None
    else:
      index = check_cache(cache, pp_str)
      self.file, self.size = str(Path(cache) / IMAGES), index["size"]
    rows = {p: i for i, p in enumerate(index["paths"])}
    missing = [p for p in paths if p not in rows]
    if missing:
      raise ValueError(f"{len(missing)} images (e.g. {missing[0]}) are not in the cache {cache}; "
                       "rebuild it for this dataset and data_dir.")
    self.rows = np.array([rows[p] for p in paths], np.int64)
    self.cache, self._array = cache, None

  def __len__(self) -> int:
    return len(self.rows)

  def _open(self) -> np.ndarray:
    try:
      return np.load(self.file, mmap_mode="r")
    except (OSError, ValueError) as e:  # a cut file: "mmap length is greater than file size"
      tool = "iqa_jax.features" if self.size is None else "iqa_jax.data.prepare"
      raise ValueError(f"{self.file} is unreadable ({e}); it was cut or corrupted. Delete "
                       f"{self.cache} and build it again with python -m {tool}.") from None

  def __getitem__(self, i: int) -> np.ndarray:
    if self._array is None:
      self._array = self._open()
    return np.array(self._array[self.rows[i]])

  def to_array(self) -> np.ndarray:
    """Every row at once, (len, ...) in path order: a feature cache read into memory."""
    return self._open()[self.rows]

  def __getstate__(self):  # worker processes reopen the memmap instead of pickling the images
    return {**self.__dict__, "_array": None}


def open_cache(cache: str, paths: Sequence[str], pp_str: str) -> CachedImages:
  """The cached rows of `paths`, after checking the cache was built for `pp_str`."""
  return CachedImages(cache, paths, pp_str)


def cached_paths(cache: str) -> set[str]:
  """The image paths a cache holds (all decoded fine when it was built)."""
  return set(read_index(cache)["paths"])
