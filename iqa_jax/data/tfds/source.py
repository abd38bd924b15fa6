"""Reading the TFDS builds of iqa_jax.data.tfds_build: --config.data.source=tfds.

ArrayRecord through tfds.data_sources gives random access with no TensorFlow, so grain reads it
like the files. Records come back in the adapter's order with the same MOS and extras, so seed
splits equal those of the file source; a record's path is its file's path relative to the
release folder. A build whose version or variant differs from what this code reads is refused.
Only tensorflow_datasets and array_record are needed here, and only when source='tfds'.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iqa_jax.data.records import MOS_SCALES, Record, RecordSource, mos_scale
from iqa_jax.data.tfds import variants

SOURCES = ("files", "tfds")
SPLIT = "train"  # the one split a build holds
_READ_CHUNK = 256  # examples per read while listing records (bounds the image bytes held)


def tfds_dir(data_config) -> Path:
  """--config.data.tfds_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (as TFDS does)."""
  folder = data_config.get("tfds_dir") or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return Path(folder).expanduser()


def build_dir(data_config) -> str | None:
  """The version folder of the build that data_config asks for; None for source='files'.

  Refuses, naming the difference, a build of another variant (resolution, target, ...) or
  another builder version than tfds_build writes.
  """
  source = data_config.get("source", "files")
  if source not in SOURCES:
    raise ValueError(f"--config.data.source must be one of {SOURCES}, got {source!r}.")
  if source == "files":
    return None
  if data_config.get("cache"):
    raise ValueError("--config.data.cache and --config.data.source=tfds do not combine (the cache "
                     "is built from the files); drop one of them.")
  try:
    import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ValueError(f"--config.data.source=tfds needs tensorflow-datasets ({e}): pip install "
                     "tensorflow-datasets array_record (no TensorFlow needed to read).") from None
  name = data_config.name
  config = variants.find_variant(name, dict(data_config.get("options") or {}))
  root = tfds_dir(data_config) / name
  variant = root / config.name if config else root
  folder = variant / variants.VERSION
  if (folder / "dataset_info.json").is_file():
    return str(folder)
  command = _build_command(name, config, data_config)
  versions = sorted(p.name for p in variant.glob("*") if (p / "dataset_info.json").is_file())
  if versions:
    raise ValueError(f"{name}: {variant} holds version {', '.join(versions)} but this iqa_jax "
                     f"reads version {variants.VERSION} "
                     f"({variants.RELEASE_NOTES[variants.VERSION]}). "
                     f"Rebuild: {command}")
  others = [c for c in variants.variants_of(name) if (root / c.name / variants.VERSION).is_dir()]
  if config and others:
    built = ", ".join(variants.describe_options(c.options) for c in others)
    raise ValueError(f"{name}: {root} was built for {built}, but the config asks for "
                     f"{variants.describe_options(config.options)}. Set "
                     f"--config.data.options to the built variant, or build this one: {command}")
  raise ValueError(f"{name}: no TFDS build in {folder}. Build it: {command} "
                   "(or set --config.data.tfds_dir).")


def _build_command(name: str, config, data_config) -> str:
  """The tfds_build command line that makes the build data_config asks for."""
  options = "".join(f" --option {k}={v}" for k, v in (config.options if config else {}).items())
  return (f"python -m iqa_jax.data.tfds_build --dataset {name} --manual_dir RELEASE_FOLDER "
          f"--data_dir {tfds_dir(data_config)}{options}")


def open_source(folder: str):
  """tfds.data_sources' ArrayRecord reader of a build's one split (no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_from_directory(folder).as_data_source(SPLIT)


def release_fingerprint(root: Path, files: Sequence[str]) -> dict[str, str]:
  """{annotation file: sha256} of a release folder (files it lacks are left out)."""
  return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files
          if (root / f).is_file()}


def check_release(folder: str, data_dir: str) -> None:
  """With data.dir also set, the build must come from that release: same annotation files."""
  metadata = json.loads((Path(folder) / "metadata.json").read_text())
  built = metadata.get("release_files", {})
  now = release_fingerprint(Path(data_dir).expanduser().resolve(), tuple(built))
  for file, digest in built.items():
    if now.get(file) != digest:
      found = f"sha256 {now[file][:12]}" if file in now else "no such file"
      raise ValueError(f"{metadata['dataset']}: the TFDS build {folder} was made from a release "
                       f"whose {file} has sha256 {digest[:12]}, but {Path(data_dir) / file} has "
                       f"{found}. Delete {folder} and build from this release, or (to "
                       "train from the build as it is) drop --config.data.dir.")


@functools.lru_cache(maxsize=8)
def _read_records(folder: str, stamp: float) -> tuple[Record, ...]:
  del stamp  # part of the cache key only: a rebuilt folder is read again
  source = open_source(folder)
  records = []
  for start in range(0, len(source), _READ_CHUNK):
    for ex in source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))):
      if int(ex["index"]) != len(records):
        raise ValueError(f"{folder}: row {len(records)} holds record {int(ex['index'])}; the "
                         "build is not in the adapter's order. Rebuild it.")
      records.append(Record(ex["file_name"].decode(), float(ex["mos"]), float(ex["raw_mos"]),
                            json.loads(ex["extras"])))
  return tuple(records)


def read_records(folder: str) -> list[Record]:
  """Every record of a build in row order (read once per process; image bytes are not kept)."""
  return list(_read_records(folder, (Path(folder) / "dataset_info.json").stat().st_mtime))


def load_records(data_config) -> list[Record]:
  """pipeline.load_records for source='tfds': the build's records, checked against data.dir."""
  folder = build_dir(data_config)
  if data_config.get("dir"):
    check_release(folder, data_config.dir)
  records = read_records(folder)
  scale, offset = mos_scale(data_config)  # a build holds App. B's mos; the run may ask another
  if (scale, offset) != MOS_SCALES.get(data_config.name, (scale, offset)):
    records = [dataclasses.replace(r, mos=(r.raw_mos - offset) / scale) for r in records]
  return records


class TfdsSource(Sequence):
  """Example dicts of RecordSource plus the image file's bytes ('encoded') from a build."""

  def __init__(self, records: Sequence[Record], folder: str):
    self._base = RecordSource(records)
    self._folder = folder
    row_of = {r.path: i for i, r in enumerate(read_records(folder))}
    missing = [r.path for r in records if r.path not in row_of]
    if missing:
      raise ValueError(f"{len(missing)} records (e.g. {missing[0]}) are not in the TFDS build "
                       f"{folder}; the records must come from that build.")
    self._rows = np.array([row_of[r.path] for r in records], np.int64)
    self._source = None

  def __len__(self) -> int:
    return len(self._base)

  def __getitem__(self, i: int) -> dict:
    if self._source is None:  # opened lazily, once per worker process
      self._source = open_source(self._folder)
    return {**self._base[i], "encoded": self._source[int(self._rows[i])]["image"]}

  def __getstate__(self):
    return {**self.__dict__, "_source": None}
