"""The one record type every dataset adapter returns."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Record:
  path: str                 # absolute path of the image file
  mos: float                # MOS normalised to [0, 1], higher is better (App. B)
  raw_mos: float            # MOS on the dataset's own scale
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # std, ref_img, prompt, ...


# normalised = (raw - offset) / scale (App. B), so raw = normalised * scale + offset.
MOS_SCALES: dict[str, tuple[float, float]] = {
    "clive": (100.0, 0.0), "koniq10k": (5.0, 0.0), "kadid10k": (4.0, 1.0), "flive": (100.0, 0.0),
    "spaq": (100.0, 0.0), "agiqa3k": (5.0, 0.0), "agiqa1k": (5.0, 0.0), "demo": (4.0, 1.0),
}


class RecordSource(Sequence):
  """Random access to records as example dicts {'path', 'mos', 'index'}."""

  def __init__(self, records: Sequence[Record]):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    r = self._records[i]
    return {"path": r.path, "mos": np.float32(r.mos), "index": np.int32(i)}


def csv_mos_scale(mos_range: str) -> tuple[float, float] | None:
  """data.options.mos_range, the csv dataset's MOS scale 'LO,HI' (e.g. '1,5') -> (scale,
  offset) = (HI - LO, LO), as MOS_SCALES gives them; '' -> None (mos is already in [0, 1])."""
  if not str(mos_range).strip():
    return None
  try:
    lo, hi = (float(x) for x in str(mos_range).split(","))
  except ValueError:
    raise ValueError(f"data.options.mos_range={mos_range!r}: expected LO,HI, the ends of the mos "
                     "column's scale, e.g. 1,5 or 0,100") from None
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise ValueError(f"data.options.mos_range={mos_range!r}: needs finite LO < HI, e.g. 1,5")
  return hi - lo, lo


def mos_scale(data_config) -> tuple[float, float]:
  """(scale, offset) of config.data: MOS_SCALES, with KonIQ's data.options.koniq_mos_divisor
  (the official code divides KonIQ's 1-5 MOS by 100) and the csv dataset's mos_range."""
  scale = MOS_SCALES.get(data_config.name, (1.0, 0.0))
  options = data_config.get("options") or {}
  if data_config.name == "koniq10k":
    scale = (float(options.get("koniq_mos_divisor", scale[0])), 0.0)
  if data_config.name == "csv":
    scale = csv_mos_scale(options.get("mos_range", "")) or scale
  return scale
