"""KonIQ-10k: koniq10k_scores_and_distributions.csv (image_name, c1-c5, c_total, MOS, SD,
MOS_zscore); images in 1024x768/ or 512x384/. MOS on 1-5 -> MOS / 5 (App. B); option
koniq_mos_divisor=100 gives the official code's MOS / 100 (docs/official_code.md).
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

TABLE = "koniq10k_scores_and_distributions.csv"
RESOLUTIONS = ("1024x768", "512x384")


def load(data_dir: str, resolution: str = "1024x768", image_dir: str = "",
         koniq_mos_divisor: float = 5.0, **_) -> list[Record]:
  """Records of KonIQ-10k; `resolution` picks the image folder the release ships."""
  if resolution not in RESOLUTIONS:
    raise ValueError(f"koniq10k: resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
  if not float(koniq_mos_divisor) > 0:
    raise ValueError(f"koniq10k: data.options.koniq_mos_divisor must be > 0 (5: the paper, 100: "
                     f"the official code), got {koniq_mos_divisor!r}.")
  table = datasets.annotation_file(data_dir, TABLE, "koniq10k")
  rows = list(datasets.read_csv(table, ("image_name", "MOS"), "koniq10k"))
  folder = datasets.image_folder(data_dir, (resolution,), [v["image_name"] for _, v in rows],
                                 "koniq10k", image_dir, table)
  records = []
  for row, v in rows:
    extras = {k: datasets.number(v[c]) for k, c in (("std", "SD"), ("mos_zscore", "MOS_zscore"))
              if c in v}
    records.append(datasets.make_record("koniq10k", folder / v["image_name"], v["MOS"], row,
                                        scale=(float(koniq_mos_divisor), 0.0), **extras))
  return records
