"""Dataset registry (name -> adapter), annotation-table readers shared by the adapters, and splits.

Adapters read a dataset's official files and return one Record per annotation row; values that
are wrong per row (NaN or out-of-range MOS, missing images, duplicates) go through as they are
and pipeline.check_records raises or skips them, naming the file and the annotation row
(extras['row']). Problems with a whole table (missing file, wrong columns) raise here.
"""
from __future__ import annotations

import csv
import importlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iqa_jax.data.records import MOS_SCALES, Record, csv_mos_scale

REGISTRY = {
    "clive": "iqa_jax.data.clive:load",
    "koniq10k": "iqa_jax.data.koniq10k:load",
    "kadid10k": "iqa_jax.data.kadid10k:load",
    "flive": "iqa_jax.data.flive:load",
    "spaq": "iqa_jax.data.spaq:load",
    "agiqa3k": "iqa_jax.data.agiqa3k:load",
    "agiqa1k": "iqa_jax.data.agiqa1k:load",
    "csv": "iqa_jax.data.datasets:load_csv",
    "demo": "iqa_jax.data.demo:load",
}
DOCS = "docs/datasets.md"


def get_adapter(name: str) -> Callable[..., list[Record]]:
  if name not in REGISTRY:
    raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}.")
  module, fn = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), fn)


def load_records(data_config) -> list[Record]:
  """config.data {name, dir, options} -> the records of the release's files (unchecked; see
  check_records). pipeline.load_records also reads TFDS builds (config.data.source)."""
  if data_config.get("source", "files") != "files":
    raise ValueError(f"config.data.source={data_config.source!r}: datasets.load_records reads "
                     "the release's files; read a build with pipeline.load_records.")
  if not data_config.dir:
    raise ValueError(f"Set --config.data.dir to the {data_config.name} folder (see {DOCS}).")
  options = dict(data_config.get("options") or {})
  return get_adapter(data_config.name)(str(data_config.dir), **options)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def typed_option(key: str, text: str, where: str) -> Any:
  """An adapter option written as text (a run-matrix spec, prepare --option) typed like the config
  field data.options.<key> it sets: 'false' must not reach drop_practice as a truthy string.

  Keys without such a field stay text; the caller reports them as unknown.
  """
  from iqa_jax import defaults  # pylint: disable=g-import-not-at-top  (the fields' types)
  fields = defaults.base_config().data.options
  if key not in fields:
    return text
  like = fields[key]
  if isinstance(like, bool):
    if text.strip().lower() in _TRUE + _FALSE:
      return text.strip().lower() in _TRUE
    raise ValueError(f"{where}: {key} is true or false, got {text!r}.")
  if isinstance(like, (int, float)):
    try:
      return type(like)(text)
    except ValueError:
      raise ValueError(f"{where}: {key} is a number ({type(like).__name__}), got "
                       f"{text!r}.") from None
  return text


# ---- Reading annotation tables -------------------------------------------------------------------

def annotation_file(data_dir: str, name: str, dataset: str) -> Path:
  """data_dir/name, or a clear error saying which official file is expected where."""
  path = Path(data_dir).expanduser().resolve() / name
  if not path.is_file():
    raise ValueError(f"{dataset}: annotation file {path} not found. Point --config.data.dir at the "
                     f"folder holding the official release ({DOCS}, section {dataset}).")
  return path


def _find_dirs(root: Path, relative: str) -> list[Path]:
  """The folders root/relative names, each component matched ignoring case (exact case first)."""
  folders = [root]
  for part in Path(relative).parts:
    found = []
    for folder in folders:
      if not folder.is_dir():
        continue
      exact = [folder / part] if (folder / part).is_dir() else []
      found += exact + sorted(p for p in folder.iterdir() if p.is_dir() and p.name != part
                              and p.name.lower() == part.lower())
    folders = found
  return folders


def image_folder(data_dir: str, candidates: Sequence[str], names: Sequence[str], dataset: str,
                 override: str = "", table: Path | None = None) -> Path:
  """The folder under data_dir that holds the annotated images.

  Releases unpack to different folder names (AGIQA-3K.zip, file.zip, Images/), so the first of
  `candidates` (case-insensitive; '.' is data_dir itself) holding the first annotated image that
  exists anywhere wins. `override` (data.options.image_dir, relative to data_dir) skips the
  search. None found: an error listing where it looked, rather than one 'file not found' per row.
  """
  root = Path(data_dir).expanduser().resolve()
  if override:
    folder = root / override
    if not folder.is_dir():
      raise ValueError(f"{dataset}: image folder {folder} (data.options.image_dir) not found.")
    return folder
  if not names:
    raise ValueError(f"{dataset}: {table or root} lists no images ({DOCS}, section {dataset}).")
  folders = []
  for c in candidates:
    folders += [f for f in _find_dirs(root, c) if f not in folders]
  for name in names:
    for folder in folders:
      if (folder / name).is_file():
        return folder
  looked = ", ".join(c.rstrip("/") + "/" for c in candidates)
  raise ValueError(f"{dataset}: none of the {len(names)} images listed in "
                   f"{(table or root).name} (first: {names[0]}) is in {root}/ {looked} (folder "
                   f"names ignoring case). Unpack the release's images into one of them, or set "
                   f"--config.data.options.image_dir ({DOCS}, section {dataset}).")


def _check_columns(path: Path, header: list[str], columns: tuple[str, ...], dataset: str):
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f"{dataset}: {path} lacks column(s) {missing}; it has {header}. Expected the "
                     f"official file with columns {list(columns)} ({DOCS}).")


def read_csv(path: Path, columns: tuple[str, ...], dataset: str) -> Iterator[tuple[str, dict]]:
  """Rows of a CSV with a header as ('file.csv:LINE', {column: text}); empty lines skipped."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    _check_columns(path, header, columns, dataset)
    for row in reader:
      if any(v.strip() for v in row):
        values = dict(zip(header, (v.strip() for v in row), strict=False))
        where = f"{path.name}:{reader.line_num}"
        if len(row) < len(header):  # empty cells: the MOS reads as NaN and check_records names
          values.update((c, "") for c in header if c not in values)  # the row, or skips it
          where += f" (short row: {len(row)} of {len(header)} cells)"
        yield where, values


def read_xlsx(path: Path, columns: tuple[str, ...], dataset: str) -> Iterator[tuple[str, dict]]:
  """Rows of the first sheet of an .xlsx, as read_csv gives them (row numbers as Excel shows)."""
  import openpyxl  # pylint: disable=g-import-not-at-top  (only SPAQ and AGIQA-1K need it)
  workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
  try:
    rows = workbook.worksheets[0].iter_rows(values_only=True)
    header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
    _check_columns(path, header, columns, dataset)
    for number, row in enumerate(rows, start=2):
      if any(v is not None and str(v).strip() for v in row):
        yield f"{path.name}:{number}", dict(zip(header, row, strict=False))
  finally:
    workbook.close()


def number(value: Any) -> float:
  """A table cell as float; NaN when empty or not a number (check_records then names the row)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def make_record(dataset: str, path: Path, raw_mos: Any, row: str,
                scale: tuple[float, float] | None = None, **extras) -> Record:
  """Normalises as App. B: (raw - offset) / scale, e.g. KonIQ y/5, KADID (y - 1)/4; `scale`
  (scale, offset) replaces MOS_SCALES[dataset]."""
  scale, offset = scale or MOS_SCALES[dataset]
  raw = number(raw_mos)
  return Record(str(path), (raw - offset) / scale, raw, {"row": row, **extras})


def load_csv(data_dir: str, mos_range: str = "", **_) -> list[Record]:
  """A CSV (data_dir, or data_dir/labels.csv) with columns path, mos [, raw_mos, ...].

  mos is in [0, 1], or on the scale mos_range='LO,HI' names (then normalised as App. B does,
  (mos - LO) / (HI - LO), and kept as raw_mos). Relative paths are resolved against the CSV's
  folder; other columns (ref_img, prompt) -> extras.
  """
  table = Path(data_dir).expanduser().resolve()
  if table.is_dir():
    table = table / "labels.csv"
  if not table.is_file():
    raise ValueError(f"csv: {table} not found; pass the CSV file (or its folder holding "
                     "labels.csv) as --config.data.dir.")
  scale = csv_mos_scale(mos_range)
  records = []
  for row, values in read_csv(table, ("path", "mos"), "csv"):
    path = (table.parent / values.pop("path")).resolve()
    if scale:
      if values.pop("raw_mos", ""):
        raise ValueError(f"csv: {row} has a raw_mos and data.options.mos_range={mos_range!r} "
                         "makes mos the raw score; drop one of them.")
      records.append(make_record("csv", path, values.pop("mos"), row, scale=scale, **values))
      continue
    mos = number(values.pop("mos"))
    raw = number(values.pop("raw_mos")) if values.get("raw_mos") else mos
    records.append(Record(str(path), mos, raw, {"row": row, **values}))
  if not scale:
    _check_unit_scale(table, records)
  return records


def _check_unit_scale(table: Path, records: list[Record]) -> None:
  """Most mos values outside [0, 1]: the column is on another scale, not a few bad rows (those
  check_records names, or skips)."""
  finite = [r.mos for r in records if math.isfinite(r.mos)]
  outside = sum(not 0 <= m <= 1 for m in finite)
  if outside * 2 > len(finite):
    raise ValueError(f"csv: {outside} of {len(finite)} mos values in {table} are outside [0, 1] "
                     f"(they run {min(finite):g} to {max(finite):g}); name the scale's ends with "
                     "--config.data.options.mos_range=LO,HI (e.g. 1,5 or 0,100), or write mos "
                     "in [0, 1].")


# ---- Splits --------------------------------------------------------------------------------------

def _content_key(r: Record):
  return r.extras.get("ref_img") or r.extras.get("prompt")


def make_splits(records: list[Record], seed: int, *, split: str = "random",
                val_fraction: float = 0.2, test_fraction: float = 0.0) -> dict[str, list[Record]]:
  """{'train', 'val'[, 'test']}: App. B's 80/20 random split per seed, or content-disjoint.

  'content' keeps all images of one reference image (KADID) or prompt (AGIQA) in one split.
  numpy's PCG64 seeded with `seed` makes it the same on any machine; splits keep record order.
  """
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(f"Need 0 <= val_fraction, test_fraction and their sum < 1; got "
                     f"{val_fraction}, {test_fraction}.")
  n = len(records)
  rng = np.random.Generator(np.random.PCG64(seed))
  if split == "random":
    groups = [[i] for i in rng.permutation(n)]
  elif split == "content":
    keys = [_content_key(r) for r in records]
    if any(k is None for k in keys):
      raise ValueError("split='content' needs extras['ref_img'] or extras['prompt'] on every "
                       f"record (e.g. {records[keys.index(None)].path}); use "
                       "--config.data.split=random.")
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
      members.setdefault(str(k), []).append(i)
    names = sorted(members)
    groups = [members[names[j]] for j in rng.permutation(len(names))]
  else:
    raise ValueError(f"split must be 'random' or 'content', got {split!r}.")
  # At least one record in a split asked for, so tiny sets still get a val set.
  targets = [("test", test_fraction), ("val", val_fraction)]
  out: dict[str, list[int]] = {"train": []}
  g = 0
  for name, fraction in targets:
    if name == "test" and fraction == 0:
      continue
    out[name] = []
    target = max(round(n * fraction), 1) if fraction > 0 else 0
    # Whole groups, while each one brings the split closer to its target size.
    while target and g < len(groups) and (not out[name] or abs(
        len(out[name]) + len(groups[g]) - target) < abs(len(out[name]) - target)):
      out[name].extend(groups[g])
      g += 1
  for group in groups[g:]:
    out["train"].extend(group)
  if not out["train"]:
    raise ValueError(f"No training records left out of {n}; lower val/test fractions.")
  return {name: [records[i] for i in sorted(idx)] for name, idx in out.items()}


def save_splits(splits: dict[str, list[Record]], workdir: str) -> Path:
  """Writes workdir/splits.json: per split the records (path, mos, raw_mos, extras)."""
  path = Path(workdir) / "splits.json"
  path.write_text(json.dumps({name: [{"path": r.path, "mos": r.mos, "raw_mos": r.raw_mos,
                                      "extras": r.extras} for r in recs]
                              for name, recs in splits.items()}, indent=1, default=str))
  return path


def load_splits(workdir: str) -> dict[str, list[Record]]:
  """Reads back save_splits' splits.json."""
  data = json.loads((Path(workdir) / "splits.json").read_text())
  return {name: [Record(d["path"], d["mos"], d["raw_mos"], d.get("extras", {})) for d in recs]
          for name, recs in data.items()}
