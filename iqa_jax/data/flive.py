"""FLIVE (PaQ-2-PiQ / LIVE-FB): labels_image.csv (name, mos on 0-100, ...) -> mos / 100 (App. B).

`name` is a path relative to the image root (e.g. voc_emotic_ava/VOC2012__2008_000007.jpg); the
root is the first of database/ and data_dir itself that holds the first listed image.
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record


def load(data_dir: str, image_dir: str = "", **_) -> list[Record]:
  """Records of FLIVE's whole-image labels (the patch labels are not used)."""
  table = datasets.annotation_file(data_dir, "labels_image.csv", "flive")
  rows = list(datasets.read_csv(table, ("name", "mos"), "flive"))
  folder = datasets.image_folder(data_dir, ("database", "."), [v["name"] for _, v in rows],
                                 "flive", image_dir, table)
  return [datasets.make_record("flive", folder / v["name"], v["mos"], row) for row, v in rows]
