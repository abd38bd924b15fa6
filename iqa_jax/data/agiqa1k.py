"""AGIQA-1K: AIGC_MOS_Zscore.xlsx (Image, Prompt, MOS); images in file/ (as the release's
file.zip unpacks) or images/. The spreadsheet's normalised MOS / 5 (App. B).
"""
from __future__ import annotations

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

IMAGE_DIRS = ("file", "images", "image")


def load(data_dir: str, image_dir: str = "", **_) -> list[Record]:
  """Records of AGIQA-1K with the prompt in extras (content splits group by it)."""
  table = datasets.annotation_file(data_dir, "AIGC_MOS_Zscore.xlsx", "agiqa1k")
  folder = datasets.image_folder(data_dir, IMAGE_DIRS, image_dir)
  return [datasets.make_record("agiqa1k", folder / str(v["Image"]).strip(), v["MOS"], row,
                               prompt=str(v["Prompt"]).strip())
          for row, v in datasets.read_xlsx(table, ("Image", "Prompt", "MOS"), "agiqa1k")]
