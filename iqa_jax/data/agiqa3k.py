"""AGIQA-3K: data.csv (name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
std_align); images such as AttnGAN_normal_000.jpg in the folder the release's AGIQA-3K.zip
unpacks to, or where public loaders keep them (images/, image/, file/, next to data.csv).
mos_quality / 5 is the target (App. B); target='align' trains on mos_align / 5 instead.
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

COLUMNS = ("name", "prompt", "mos_quality", "std_quality", "mos_align", "std_align")
IMAGE_DIRS = ("AGIQA-3K", "images", "image", "file", "all", ".")


def load(data_dir: str, target: str = "quality", image_dir: str = "", **_) -> list[Record]:
  """Records of AGIQA-3K; extras hold the prompt (content splits), both MOS and both std."""
  if target not in ("quality", "align"):
    raise ValueError(f"agiqa3k: target must be 'quality' or 'align', got {target!r}.")
  table = datasets.annotation_file(data_dir, "data.csv", "agiqa3k")
  rows = list(datasets.read_csv(table, COLUMNS, "agiqa3k"))
  folder = datasets.image_folder(data_dir, IMAGE_DIRS, [v["name"] for _, v in rows], "agiqa3k",
                                 image_dir, table)
  records = []
  for row, v in rows:
    extras = {"prompt": v["prompt"], "std": datasets.number(v[f"std_{target}"])}
    extras.update({k: v[k] for k in ("adj1", "adj2", "style") if k in v})
    extras.update({k: datasets.number(v[k]) for k in COLUMNS[2:]})
    records.append(datasets.make_record("agiqa3k", folder / v["name"], v[f"mos_{target}"], row,
                                        **extras))
  return records
