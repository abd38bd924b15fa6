"""AGIQA-1K: AIGC_MOS_Zscore.xlsx (Image, Prompt, MOS); images deepai_i_j_k_l.jpg and
dreamStudio_i_j_k_l.jpg in file/ (as the release's file.zip unpacks) or images/.
The spreadsheet's normalised MOS / 5 (App. B).

The spreadsheet as released lists dreamStudio_8_9_1_1.jpg twice, in its last two rows (Excel rows
1080 and 1081, MOS 0.441 and 2.084); the first is kept, with one logged line (docs/datasets.md).
"""
from __future__ import annotations

from absl import logging

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

TABLE = "AIGC_MOS_Zscore.xlsx"
IMAGE_DIRS = ("file", "images", "image", "AGIQA-1K", ".")
# Names the release lists twice; any other repeated name is reported by check_records.
KNOWN_DUPLICATES = ("dreamStudio_8_9_1_1.jpg",)


def _drop_known_duplicates(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
  """The release's repeated rows after the first, each said in one logged line."""
  first: dict[str, tuple[str, dict]] = {}
  kept = []
  for row, v in rows:
    name = v["Image"]
    if name in KNOWN_DUPLICATES and name in first:
      first_row, first_values = first[name]
      logging.warning("agiqa1k: %s lists %s again at %s (MOS %s), a known quirk of the release; "
                      "keeping the first row, %s (MOS %s) (docs/datasets.md).", TABLE, name,
                      row.split(":")[-1], v["MOS"], first_row.split(":")[-1], first_values["MOS"])
      continue
    first.setdefault(name, (row, v))
    kept.append((row, v))
  return kept


def load(data_dir: str, image_dir: str = "", **_) -> list[Record]:
  """Records of AGIQA-1K with the prompt in extras (content splits group by it)."""
  table = datasets.annotation_file(data_dir, TABLE, "agiqa1k")
  rows = [(row, {**v, "Image": str(v["Image"]).strip()})
          for row, v in datasets.read_xlsx(table, ("Image", "Prompt", "MOS"), "agiqa1k")]
  rows = _drop_known_duplicates(rows)
  folder = datasets.image_folder(data_dir, IMAGE_DIRS, [v["Image"] for _, v in rows], "agiqa1k",
                                 image_dir, table)
  return [datasets.make_record("agiqa1k", folder / v["Image"], v["MOS"], row,
                               prompt=str(v["Prompt"]).strip())
          for row, v in rows]
