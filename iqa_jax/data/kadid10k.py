"""KADID-10k: dmos.csv (dist_img, ref_img, dmos, var); images in images/.
DMOS on 1-5, higher is better -> (dmos - 1) / 4 (App. B). ref_img allows content-disjoint splits.
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record


def load(data_dir: str, image_dir: str = "", **_) -> list[Record]:
  """Records of KADID-10k with extras ref_img, var, distortion (1-25) and level (1-5)."""
  table = datasets.annotation_file(data_dir, "dmos.csv", "kadid10k")
  rows = list(datasets.read_csv(table, ("dist_img", "ref_img", "dmos"), "kadid10k"))
  folder = datasets.image_folder(data_dir, ("images",), [v["dist_img"] for _, v in rows],
                                 "kadid10k", image_dir, table)
  records = []
  for row, v in rows:
    extras = {"ref_img": v["ref_img"]}
    if "var" in v:
      extras["var"] = datasets.number(v["var"])
    parts = v["dist_img"].split(".")[0].split("_")  # I01_02_03.png: reference, type, level
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
      extras.update(distortion=int(parts[1]), level=int(parts[2]))
    records.append(datasets.make_record("kadid10k", folder / v["dist_img"], v["dmos"], row,
                                        **extras))
  return records
