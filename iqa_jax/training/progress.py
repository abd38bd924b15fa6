"""The progress bar of training, evaluation and feature extraction (stderr, images per second)."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="img", unit_scale=False, dynamic_ncols=True,
              disable=not enabled, leave=False, file=sys.stderr)
