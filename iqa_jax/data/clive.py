"""LIVE In the Wild Challenge (CLIVE): Data/AllImages_release.mat + Data/AllMOS_release.mat.

1169 entries; the first 7 are the practice images t1.bmp ... t7.bmp, kept by the release in
Images/trainingImages/, that everyone drops, leaving 1162 in Images/. MOS is on 0-100 -> MOS / 100
(App. B).
"""
from __future__ import annotations

import numpy as np
import scipy.io

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

PRACTICE = 7


def _mat_variable(path, name: str, dataset: str = "clive") -> np.ndarray:
  data = scipy.io.loadmat(str(path))
  if name not in data:
    found = [k for k in data if not k.startswith("__")]
    raise ValueError(f"{dataset}: {path} lacks variable {name!r}; it has {found} "
                     f"({datasets.DOCS}).")
  return data[name].ravel()


def load(data_dir: str, image_dir: str = "", drop_practice: bool = True, **_) -> list[Record]:
  """Records of CLIVE (ChallengeDB_release folder as data_dir), practice images dropped."""
  if not isinstance(drop_practice, bool):  # a text 'false' would count as true
    raise ValueError(f"clive: drop_practice must be True or False, got {drop_practice!r}.")
  names_file = datasets.annotation_file(data_dir, "Data/AllImages_release.mat", "clive")
  mos_file = datasets.annotation_file(data_dir, "Data/AllMOS_release.mat", "clive")
  names = [str(np.squeeze(v)) for v in _mat_variable(names_file, "AllImages_release")]
  mos = _mat_variable(mos_file, "AllMOS_release")
  if len(names) != len(mos):
    raise ValueError(f"clive: {names_file.name} lists {len(names)} images but "
                     f"{mos_file.name} has {len(mos)} MOS values.")
  std_file = names_file.parent / "AllStdDev_release.mat"
  std = _mat_variable(std_file, "AllStdDev_release") if std_file.is_file() else None
  folder = datasets.image_folder(data_dir, ("Images",), names[PRACTICE:], "clive", image_dir,
                                 names_file)
  folders = [folder] * len(names)
  if not drop_practice:
    folders[:PRACTICE] = [datasets.image_folder(str(folder), ("trainingImages", "."),
                                                names[:PRACTICE], "clive", table=names_file)
                          ] * PRACTICE
  start = PRACTICE if drop_practice else 0
  records = []
  for i in range(start, len(names)):
    extras = {"std": float(std[i])} if std is not None else {}
    records.append(datasets.make_record("clive", folders[i] / names[i], mos[i],
                                        f"{names_file.name}:{i + 1}", **extras))
  return records
