"""SPAQ: Annotations/MOS and Image attribute scores.xlsx (Image name, MOS on 0-100, attribute
scores); images in TestImage/. MOS / 100 (App. B). The photos are large (about 4000x3000):
`decode(draft=512)` in the pp string or the prepare cache saves most of the decoding time.
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

TABLE = "Annotations/MOS and Image attribute scores.xlsx"
ATTRIBUTES = ("Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness")


def load(data_dir: str, image_dir: str = "", **_) -> list[Record]:
  """Records of SPAQ with its five attribute scores as extras (lower-cased names)."""
  table = datasets.annotation_file(data_dir, TABLE, "spaq")
  rows = [(row, {**v, "Image name": str(v["Image name"]).strip()})
          for row, v in datasets.read_xlsx(table, ("Image name", "MOS"), "spaq")]
  folder = datasets.image_folder(data_dir, ("TestImage",), [v["Image name"] for _, v in rows],
                                 "spaq", image_dir, table)
  records = []
  for row, v in rows:
    extras = {a.lower(): datasets.number(v[a]) for a in ATTRIBUTES if a in v}
    records.append(datasets.make_record("spaq", folder / v["Image name"], v["MOS"], row,
                                        **extras))
  return records
