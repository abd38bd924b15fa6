"""The one record type every dataset adapter returns."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Record:
  path: str                 # absolute path of the image file
  mos: float                # MOS normalised to [0, 1], higher is better (App. B)
  raw_mos: float            # MOS on the dataset's own scale
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # std, ref_img, prompt, ...
