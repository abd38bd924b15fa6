"""The seven adapters on generated fixtures in each official layout, bad tables, and splits."""
import csv
import json
import logging
import math

import ml_collections
import numpy as np
import pytest
import scipy.io
from conftest import require
from PIL import Image

from iqa_jax.data import datasets, pipeline
from iqa_jax.data import records as records_lib
from iqa_jax.data.records import Record


def _image(path, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  x = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
  Image.fromarray(x).save(path)


def _csv(path, header, rows, quote=csv.QUOTE_MINIMAL):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f, quoting=quote)
    w.writerow(header)
    w.writerows(rows)


def _xlsx(path, header, rows):
  openpyxl = require("openpyxl")
  path.parent.mkdir(parents=True, exist_ok=True)
  wb = openpyxl.Workbook()
  ws = wb.active
  ws.append(header)
  for r in rows:
    ws.append(r)
  wb.save(path)


# First entries of the release's AllImages_release / AllMOS_release (as in pyiqa's meta info):
# t1.bmp ... t7.bmp are the practice images, kept in Images/trainingImages/.
CLIVE_ROWS = [("t1.bmp", 63.963406174124174), ("t2.bmp", 25.335306406685238),
              ("t3.bmp", 48.93656326246079), ("t4.bmp", 35.88633193863319),
              ("t5.bmp", 66.50923666782852), ("t6.bmp", 54.579700034879664),
              ("t7.bmp", 77.88214783821478), ("100.bmp", 32.56107532210109),
              ("101.bmp", 66.35954917017587), ("1001.JPG", 53.55747126436781)]


def make_clive(root):
  names = [n for n, _ in CLIVE_ROWS]
  cell = np.empty((len(names), 1), dtype=object)
  for i, n in enumerate(names):
    cell[i, 0] = np.array([n])
  (root / "Data").mkdir(parents=True)
  scipy.io.savemat(root / "Data/AllImages_release.mat", {"AllImages_release": cell})
  mos = np.array([[m for _, m in CLIVE_ROWS]])
  scipy.io.savemat(root / "Data/AllMOS_release.mat", {"AllMOS_release": mos})
  scipy.io.savemat(root / "Data/AllStdDev_release.mat", {"AllStdDev_release": mos / 4})
  for n in names[:7]:
    _image(root / "Images/trainingImages" / n)
  for i, n in enumerate(names[7:]):
    _image(root / "Images" / n, i)


KONIQ_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def make_koniq(root, rows=None):
  rows = rows or [["10004473376.jpg", 0, 0, 25, 73, 7, 105, 3.828571, 0.527278, 77.383621],
                  ["10007357496.jpg", 0, 3, 45, 47, 1, 96, 3.479167, 0.580003, 68.728235],
                  ["10012359024.jpg", 1, 8, 56, 29, 0, 94, 3.202128, 0.646894, 61.868532]]
  _csv(root / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, rows, csv.QUOTE_NONNUMERIC)
  for folder in ("1024x768", "512x384"):
    for i, r in enumerate(rows):
      _image(root / folder / r[0], i)


def make_kadid(root):
  rows = [[f"I{r:02d}_{d:02d}_{lvl:02d}.png", f"I{r:02d}.png", round(1 + (5 - lvl) * 0.9, 2), 0.5]
          for r in (1, 2, 3) for d in (1, 2) for lvl in (1, 5)]
  _csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
  for i, r in enumerate(rows):
    _image(root / "images" / r[0], i)
  return rows


def make_flive(root):
  rows = [["AVA__149.jpg", 72.5, 640, 480],
          ["voc_emotic_ava/VOC2012__2008_000007.jpg", 55, 500, 375],
          ["blur_dataset/motion0012.jpg", 18.25, 640, 427]]
  _csv(root / "labels_image.csv", ["name", "mos", "width", "height"], rows)
  for i, r in enumerate(rows):
    _image(root / "database" / r[0], i)


SPAQ_HEADER = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness",
               "Sharpness"]


def make_spaq(root):
  rows = [["00001.jpg", 42.65, 43.0, 39.1, 43.5, 40.0, 42.2],
          ["00002.jpg", 46.5, 52.0, 48.0, 50.2, 44.0, 49.1]]
  _xlsx(root / "Annotations/MOS and Image attribute scores.xlsx", SPAQ_HEADER, rows)
  for i, r in enumerate(rows):
    _image(root / "TestImage" / r[0], i)


AGIQA3K_HEADER = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality",
                  "mos_align", "std_align"]
# Rows of the release's data.csv (lcysyzxdxc/AGIQA-3k-Database).
AGIQA3K_ROWS = [
    ["AttnGAN_normal_000.jpg", "statue of a man", "", "", "", 0.965602553, 0.223270101,
     0.40889324, 0.615607722],
    ["AttnGAN_normal_001.jpg", "a tray of sushi", "", "", "", 1.361853219, 0.645422466,
     0.428796637, 0.667071153],
    ["xl2.2_normal_299.jpg", "beautiful fluffy baby giraffe cheetah hybrid mixed creature "
     "character concept, hyper detail, HDR lighting, baroque style", "hyper detail",
     "HDR lighting", "baroque style", 3.60083465, 0.486499893, 3.467108847, 0.549443718]]


def make_agiqa3k(root, image_dir="AGIQA-3K"):
  """data.csv and the images in the folder the release's AGIQA-3K.zip unpacks to."""
  _csv(root / "data.csv", AGIQA3K_HEADER, AGIQA3K_ROWS)
  for i, r in enumerate(AGIQA3K_ROWS):
    _image(root / image_dir / r[0], i)


# Rows of the release's AIGC_MOS_Zscore.xlsx (lcysyzxdxc/AGIQA-1k-Database): its first rows and
# its last four, where dreamStudio_8_9_1_1.jpg is listed twice (Excel rows 1080 and 1081).
AGIQA1K_ROWS = [
    ["deepai_0_0_0_0.jpg", "bird, driving aircraft, city, anime style", 2.7934105045636524],
    ["deepai_0_0_0_1.jpg", "bird, driving aircraft, city, realistic style", 4.159969360254004],
    ["dreamStudio_8_9_0_1.jpg", "alien, wearing shirt, city, realistic style",
     0.016814677712928286],
    ["dreamStudio_8_9_1_0.jpg", "alien, wearing shirt, wild, anime style", 0.6081769257617308],
    ["dreamStudio_8_9_1_1.jpg", "alien, wearing shirt, wild, realistic style", 0.4414155439958131],
    ["dreamStudio_8_9_1_1.jpg", "alien, wearing shirt, wild, realistic style", 2.084115711537598]]


def make_agiqa1k(root, rows=AGIQA1K_ROWS):
  _xlsx(root / "AIGC_MOS_Zscore.xlsx", ["Image", "Prompt", "MOS"], rows)
  for i, r in enumerate(rows):
    _image(root / "file" / r[0], i)


def _load(name, root, **options):
  config = ml_collections.ConfigDict({"name": name, "dir": str(root), "options": options})
  records = datasets.load_records(config)
  kept, skipped = pipeline.check_records(records)
  assert kept == records and not skipped
  return records


def test_clive(tmp_path):
  make_clive(tmp_path)
  recs = _load("clive", tmp_path)
  assert len(recs) == 3  # 10 entries, the 7 practice images dropped
  assert [r.path for r in recs] == [str(tmp_path / "Images" / n) for n in
                                    ("100.bmp", "101.bmp", "1001.JPG")]
  np.testing.assert_allclose([r.raw_mos for r in recs], [m for _, m in CLIVE_ROWS[7:]])
  np.testing.assert_allclose([r.mos for r in recs], [m / 100 for _, m in CLIVE_ROWS[7:]])
  assert recs[0].extras["std"] == pytest.approx(CLIVE_ROWS[7][1] / 4)
  assert recs[0].extras["row"] == "AllImages_release.mat:8"


def test_clive_keeps_practice_images_from_training_images(tmp_path):
  """Issue 10 item 15: drop_practice=False looked for t1.bmp ... in Images/; the release keeps
  them in Images/trainingImages/."""
  make_clive(tmp_path)
  recs = _load("clive", tmp_path, drop_practice=False)
  assert [r.path for r in recs] == (
      [str(tmp_path / "Images/trainingImages" / f"t{i}.bmp") for i in range(1, 8)]
      + [str(tmp_path / "Images" / n) for n in ("100.bmp", "101.bmp", "1001.JPG")])
  np.testing.assert_allclose([r.raw_mos for r in recs], [m for _, m in CLIVE_ROWS])
  assert recs[0].extras["row"] == "AllImages_release.mat:1"
  with pytest.raises(ValueError, match="drop_practice must be True or False, got 'false'"):
    datasets.get_adapter("clive")(str(tmp_path), drop_practice="false")


def test_koniq10k(tmp_path):
  make_koniq(tmp_path)
  recs = _load("koniq10k", tmp_path)
  assert recs[0].path == str(tmp_path / "1024x768/10004473376.jpg")
  np.testing.assert_allclose([r.mos for r in recs], [3.828571 / 5, 3.479167 / 5, 3.202128 / 5])
  assert recs[1].extras["std"] == 0.580003 and recs[1].extras["mos_zscore"] == 68.728235
  assert recs[0].extras["row"] == "koniq10k_scores_and_distributions.csv:2"
  small = _load("koniq10k", tmp_path, resolution="512x384")
  assert small[0].path == str(tmp_path / "512x384/10004473376.jpg")


def test_koniq10k_official_mos_divisor(tmp_path):
  """data.options.koniq_mos_divisor=100: the official dataset.py's MOS / 100 on the 1-5 column
  (3.828571 -> 0.03828571); the run's MOS scale follows, so scores map back to 1-5 MOS."""
  import ml_collections

  from iqa_jax.data.records import mos_scale
  make_koniq(tmp_path)
  recs = _load("koniq10k", tmp_path, koniq_mos_divisor=100.0)
  np.testing.assert_allclose([r.mos for r in recs], [0.03828571, 0.03479167, 0.03202128])
  assert recs[0].raw_mos == 3.828571
  data = ml_collections.ConfigDict({"name": "koniq10k", "options": {"koniq_mos_divisor": 100.0}})
  assert mos_scale(data) == (100.0, 0.0)
  data.options.koniq_mos_divisor = 5.0
  assert mos_scale(data) == (5.0, 0.0)
  with pytest.raises(ValueError, match="koniq_mos_divisor must be > 0"):
    _load("koniq10k", tmp_path, koniq_mos_divisor=0.0)


def test_kadid10k(tmp_path):
  rows = make_kadid(tmp_path)
  recs = _load("kadid10k", tmp_path)
  assert len(recs) == 12
  assert recs[0].path == str(tmp_path / "images/I01_01_01.png")
  assert recs[0].raw_mos == 4.6 and recs[0].mos == pytest.approx(0.9)  # (4.6 - 1) / 4
  assert recs[1].raw_mos == 1.0 and recs[1].mos == 0.0
  assert recs[0].extras | {"row": None} == {"ref_img": "I01.png", "var": 0.5, "distortion": 1,
                                            "level": 1, "row": None}
  assert [r.extras["ref_img"] for r in recs] == [r[1] for r in rows]


def test_flive(tmp_path):
  make_flive(tmp_path)
  recs = _load("flive", tmp_path)
  assert recs[1].path == str(tmp_path / "database/voc_emotic_ava/VOC2012__2008_000007.jpg")
  np.testing.assert_allclose([r.mos for r in recs], [0.725, 0.55, 0.1825])


def test_spaq(tmp_path):
  make_spaq(tmp_path)
  recs = _load("spaq", tmp_path)
  assert recs[0].path == str(tmp_path / "TestImage/00001.jpg")
  assert recs[0].mos == pytest.approx(0.4265) and recs[0].raw_mos == 42.65
  assert recs[1].extras["sharpness"] == 49.1
  assert recs[1].extras["row"] == "MOS and Image attribute scores.xlsx:3"


def test_agiqa3k(tmp_path):
  make_agiqa3k(tmp_path)
  recs = _load("agiqa3k", tmp_path)
  assert [r.path for r in recs] == [str(tmp_path / "AGIQA-3K" / r[0]) for r in AGIQA3K_ROWS]
  np.testing.assert_allclose([r.mos for r in recs], [r[5] / 5 for r in AGIQA3K_ROWS])
  assert recs[2].extras["prompt"] == AGIQA3K_ROWS[2][1] and recs[2].extras["std"] == 0.486499893
  assert recs[2].extras["style"] == "baroque style" and recs[2].extras["mos_align"] == 3.467108847
  align = _load("agiqa3k", tmp_path, target="align")
  np.testing.assert_allclose([r.mos for r in align], [r[7] / 5 for r in AGIQA3K_ROWS])
  assert align[2].extras["std"] == 0.549443718


@pytest.mark.parametrize("image_dir", ["AGIQA-3K", "AGIQA-3k", "Images", "image", "file", "."])
def test_agiqa3k_finds_the_image_folder(tmp_path, image_dir):
  """Issue 10 item 14: the release's AGIQA-3K.zip and public loaders use other folder names than
  file/, images/, image/; the folder holding the first listed image is found, ignoring case."""
  make_agiqa3k(tmp_path, image_dir)
  (tmp_path / "images").mkdir(exist_ok=True)  # an empty decoy is passed over
  recs = _load("agiqa3k", tmp_path)
  assert recs[0].path == str((tmp_path / image_dir / AGIQA3K_ROWS[0][0]).resolve())


def test_missing_image_folder_lists_where_it_looked(tmp_path):
  _csv(tmp_path / "data.csv", AGIQA3K_HEADER, AGIQA3K_ROWS)
  (tmp_path / "file").mkdir()
  with pytest.raises(ValueError, match=r"agiqa3k: none of the 3 images listed in data.csv "
                     r"\(first: AttnGAN_normal_000.jpg\) is in .*/ AGIQA-3K/, images/, image/, "
                     r"file/, all/, ./ .*image_dir"):
    datasets.get_adapter("agiqa3k")(str(tmp_path))
  with pytest.raises(ValueError, match=r"image folder .*/nope \(data.options.image_dir\)"):
    datasets.get_adapter("agiqa3k")(str(tmp_path), image_dir="nope")


def test_agiqa1k(tmp_path, caplog):
  """Issue 10 item 13: the release's spreadsheet lists dreamStudio_8_9_1_1.jpg twice; the first
  row is kept with one logged line (on_error=raise used to stop there)."""
  make_agiqa1k(tmp_path)
  with caplog.at_level(logging.WARNING):
    recs = _load("agiqa1k", tmp_path)
  assert [r.path for r in recs] == [str(tmp_path / "file" / r[0]) for r in AGIQA1K_ROWS[:5]]
  np.testing.assert_allclose([r.mos for r in recs], [r[2] / 5 for r in AGIQA1K_ROWS[:5]])
  assert recs[4].extras == {"row": "AIGC_MOS_Zscore.xlsx:6", "prompt": AGIQA1K_ROWS[4][1]}
  quirk = [r.getMessage() for r in caplog.records if "dreamStudio_8_9_1_1.jpg" in r.getMessage()]
  assert quirk == ["agiqa1k: AIGC_MOS_Zscore.xlsx lists dreamStudio_8_9_1_1.jpg again at 7 "
                   "(MOS 2.084115711537598), a known quirk of the release; keeping the first row, "
                   "6 (MOS 0.4414155439958131) (docs/datasets.md)."]
  # Any other repeated name is still an error of the table.
  make_agiqa1k(tmp_path / "other", AGIQA1K_ROWS[:2] + AGIQA1K_ROWS[:1])
  with pytest.raises(ValueError, match=r"deepai_0_0_0_0.jpg \(AIGC_MOS_Zscore.xlsx:4\): "
                     r"duplicate path \(also at AIGC_MOS_Zscore.xlsx:2\)"):
    _load("agiqa1k", tmp_path / "other")


def test_generic_csv(tmp_path):
  _image(tmp_path / "imgs/a.png")
  _image(tmp_path / "imgs/b.png", 1)
  _csv(tmp_path / "labels.csv", ["path", "mos", "raw_mos", "ref_img"],
       [["imgs/a.png", 0.25, 2.0, "x"], [str(tmp_path / "imgs/b.png"), 0.5, "", "y"]])
  recs = _load("csv", tmp_path)
  assert recs[0] == Record(str(tmp_path / "imgs/a.png"), 0.25, 2.0,
                           {"row": "labels.csv:2", "ref_img": "x"})
  assert recs[1].raw_mos == 0.5 and recs[1].path == str(tmp_path / "imgs/b.png")
  assert _load("csv", tmp_path / "labels.csv") == recs


def test_registry():
  from iqa_jax.data import demo
  assert datasets.get_adapter("demo") is demo.load
  with pytest.raises(ValueError, match="Unknown dataset 'koniq'.*koniq10k"):
    datasets.get_adapter("koniq")
  with pytest.raises(ValueError, match="data.dir"):
    datasets.load_records(ml_collections.ConfigDict({"name": "clive", "dir": "", "options": {}}))


# ---- Bad tables and rows -------------------------------------------------------------------------

def test_missing_annotation_file(tmp_path):
  with pytest.raises(ValueError, match="kadid10k: annotation file .*dmos.csv not found"):
    datasets.get_adapter("kadid10k")(str(tmp_path))
  with pytest.raises(ValueError, match="AIGC_MOS_Zscore.xlsx not found"):
    datasets.get_adapter("agiqa1k")(str(tmp_path))


def test_wrong_columns(tmp_path):
  _csv(tmp_path / "koniq10k_scores_and_distributions.csv", ["image_name", "mos"], [["a.jpg", 3]])
  with pytest.raises(ValueError, match="koniq10k_scores_and_distributions.csv lacks column.*'MOS'"):
    datasets.get_adapter("koniq10k")(str(tmp_path))
  _xlsx(tmp_path / "Annotations/MOS and Image attribute scores.xlsx", ["Image", "MOS"], [["a", 1]])
  with pytest.raises(ValueError, match="lacks column.*'Image name'"):
    datasets.get_adapter("spaq")(str(tmp_path))
  scipy.io.savemat(tmp_path / "mat.mat", {"other": np.zeros(3)})
  (tmp_path / "Data").mkdir()
  for f in ("AllImages_release", "AllMOS_release"):
    scipy.io.savemat(tmp_path / f"Data/{f}.mat", {"other": np.zeros(3)})
  with pytest.raises(ValueError, match="AllImages_release.mat lacks variable 'AllImages_release'"):
    datasets.get_adapter("clive")(str(tmp_path))


def test_bad_rows_name_file_and_row(tmp_path):
  rows = [["1.jpg", 0, 0, 0, 0, 0, 0, 3.0, 0.5, 0], ["2.jpg", 0, 0, 0, 0, 0, 0, "", 0.5, 0],
          ["3.jpg", 0, 0, 0, 0, 0, 0, 7.5, 0.5, 0], ["1.jpg", 0, 0, 0, 0, 0, 0, 3.0, 0.5, 0],
          ["4.jpg", 0, 0, 0, 0, 0, 0, 2.0, 0.5, 0], ["5.jpg", 0, 0, 0, 0, 0, 0, 4.0, 0.5, 0]]
  make_koniq(tmp_path, rows)
  (tmp_path / "1024x768/4.jpg").unlink()
  (tmp_path / "1024x768/5.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt")
  recs = datasets.get_adapter("koniq10k")(str(tmp_path))
  assert math.isnan(recs[1].mos)
  table = "koniq10k_scores_and_distributions.csv"
  expected = [(ValueError, rf"2.jpg \({table}:3\): MOS is not a number"),
              (ValueError, rf"3.jpg \({table}:4\): normalised MOS 1.5 \(raw 7.5\) is outside"),
              (ValueError, rf"1.jpg \({table}:5\): duplicate path \(also at {table}:2\)"),
              (Exception, rf"4.jpg \({table}:6\): file not found"),
              (Exception, rf"5.jpg \({table}:7\): cannot decode")]
  for i, (error, pattern) in enumerate(expected, start=1):
    with pytest.raises(error, match=pattern):
      pipeline.check_records([recs[0], recs[i]])
  kept, skipped = pipeline.check_records(recs, on_error="skip")
  assert kept == [recs[0]] and len(skipped) == 5
  assert [s[0].rsplit("/", 1)[1] for s in skipped] == ["2.jpg", "3.jpg", "1.jpg", "4.jpg", "5.jpg"]


# ---- Splits --------------------------------------------------------------------------------------

def _records(n, groups=None):
  return [Record(f"/x/{i}.png", i / n, float(i), {"ref_img": f"r{i % groups}"} if groups else {})
          for i in range(n)]


def test_random_split_is_80_20_and_deterministic():
  recs = _records(100)
  s8 = datasets.make_splits(recs, 8)
  assert set(s8) == {"train", "val"} and len(s8["train"]) == 80 and len(s8["val"]) == 20
  assert sorted(r.path for r in s8["train"] + s8["val"]) == sorted(r.path for r in recs)
  assert s8 == datasets.make_splits(recs, 8)
  assert s8["val"] != datasets.make_splits(recs, 19)["val"]
  # Pinned: numpy's PCG64 gives the same permutation on every machine.
  assert [int(r.raw_mos) for r in s8["val"][:5]] == [1, 4, 12, 15, 16]
  three = datasets.make_splits(recs, 25, val_fraction=0.1, test_fraction=0.2)
  assert [len(three[k]) for k in ("train", "val", "test")] == [70, 10, 20]
  assert datasets.make_splits(recs, 8, val_fraction=0.0)["val"] == []


def test_content_split_keeps_groups_together():
  recs = _records(60, groups=12)  # 12 reference images, 5 distortions each
  s = datasets.make_splits(recs, 19, split="content", val_fraction=0.2, test_fraction=0.2)
  refs = {k: {r.extras["ref_img"] for r in v} for k, v in s.items()}
  assert not refs["train"] & refs["val"] and not refs["train"] & refs["test"]
  assert not refs["val"] & refs["test"]
  assert [len(s[k]) for k in ("train", "val", "test")] == [40, 10, 10]
  prompts = [Record(f"/p/{i}", 0.5, 2.5, {"prompt": f"p{i // 3}"}) for i in range(30)]
  s = datasets.make_splits(prompts, 8, split="content")
  assert not {r.extras["prompt"] for r in s["train"]} & {r.extras["prompt"] for r in s["val"]}
  with pytest.raises(ValueError, match="split='content' needs"):
    datasets.make_splits(_records(10), 8, split="content")


def test_save_and_load_splits(tmp_path):
  s = datasets.make_splits(_records(10, groups=2), 8)
  path = datasets.save_splits(s, str(tmp_path))
  assert path.name == "splits.json" and len(json.loads(path.read_text())["val"]) == 2
  assert datasets.load_splits(str(tmp_path)) == s


@pytest.mark.parametrize("name", ["kadid10k", "csv"])
def test_a_short_row_is_a_bad_row_not_a_key_error(tmp_path, name):
  """Issue 23 item 9: a row with fewer cells than the header raised KeyError ('mos', 'dmos'),
  even with on_error=skip. Now its MOS reads as NaN: one error naming file and line, or skipped
  and counted."""
  if name == "kadid10k":
    rows = make_kadid(tmp_path)
    table = tmp_path / "dmos.csv"
    with open(table, "a") as f:
      f.write(f"{rows[1][0]},{rows[1][1]}\n")  # dmos and var cut off: line 14
    line, cells = f"dmos.csv:{len(rows) + 2}", "2 of 4"
  else:
    _image(tmp_path / "imgs/a.png")
    _image(tmp_path / "imgs/b.png", 1)
    _csv(tmp_path / "labels.csv", ["path", "mos"], [["imgs/a.png", 0.25], ["imgs/b.png"]])
    line, cells = "labels.csv:3", "1 of 2"
  config = ml_collections.ConfigDict({"name": name, "dir": str(tmp_path), "options": {}})
  records = datasets.load_records(config)
  with pytest.raises(ValueError, match=rf"\({line} \(short row: {cells} cells\)\): MOS is not a "
                                       "number"):
    pipeline.check_records(records)
  kept, skipped = pipeline.check_records(records, on_error="skip")
  assert len(kept) == len(records) - 1 and len(skipped) == 1


def _fake_demo(root, rows):
  _csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
  for i, r in enumerate(rows):
    _image(root / "images" / r[0], i)


def test_demo_adapter_reads_its_table_like_the_other_adapters(tmp_path):
  """Issue 23 item 9: a renamed header, a short row or a non-numeric dmos gave tracebacks
  (KeyError, ValueError: could not convert string to float)."""
  from iqa_jax.data import demo
  good = [["I01_01_01_c01.png", "I01.png", 5.0, 0.0], ["I01_03_05_c01.png", "I01.png", 1.0, 0.0]]
  _fake_demo(tmp_path / "ok", good)
  records = demo.load(str(tmp_path / "ok"))
  assert [(r.mos, r.raw_mos, r.extras["distortion"]) for r in records] == [
      (1.0, 5.0, "gaussian_blur"), (0.0, 1.0, "jpeg")]  # (dmos - 1) / 4
  assert [r.path for r in demo.load(str(tmp_path / "ok"), distortions="jpeg")] == [records[1].path]
  _fake_demo(tmp_path / "bad", good + [["I01_02_03_c01.png", "I01.png", "high", 0.0]])
  with open(tmp_path / "bad" / "dmos.csv", "a") as f:
    f.write("I01_04_02_c01.png,I01.png\n")
  _image(tmp_path / "bad" / "images" / "I01_04_02_c01.png")
  bad = demo.load(str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"\(dmos.csv:4\): MOS is not a number"):
    pipeline.check_records(bad)
  kept, skipped = pipeline.check_records(bad, on_error="skip")
  assert kept == bad[:2] and len(skipped) == 2
  _csv(tmp_path / "renamed" / "dmos.csv", ["image", "ref_img", "dmos"], [good[0][:3]])
  with pytest.raises(ValueError, match=r"demo: .*dmos.csv lacks column\(s\) \['dist_img'\]"):
    demo.load(str(tmp_path / "renamed"))
  _fake_demo(tmp_path / "odd", [["photo.png", "I01.png", 5.0, 0.0]])
  with pytest.raises(ValueError, match=r"dmos.csv:2: dist_img 'photo.png' is not a demo image"):
    demo.load(str(tmp_path / "odd"))


def test_csv_on_its_own_scale_with_mos_range(tmp_path):
  """A csv whose mos column runs 1-5 is refused naming the range and the option; mos_range=1,5
  normalises it as App. B does KADID's, and the MOS scale maps scores back to 1-5."""
  for name in "abc":
    _image(tmp_path / f"imgs/{name}.png")
  _csv(tmp_path / "labels.csv", ["path", "mos", "prompt"],
       [["imgs/a.png", 1.0, "p"], ["imgs/b.png", 4.2, "q"], ["imgs/c.png", 5, "q"]])
  with pytest.raises(ValueError, match=r"csv: 2 of 3 mos values in .*labels.csv are outside "
                     r"\[0, 1\] \(they run 1 to 5\); name the scale's ends with "
                     r"--config.data.options.mos_range=LO,HI \(e.g. 1,5 or 0,100\)"):
    _load("csv", tmp_path)
  recs = _load("csv", tmp_path, mos_range="1,5")
  assert [(r.mos, r.raw_mos) for r in recs] == [(0.0, 1.0), (0.8, 4.2), (1.0, 5.0)]
  assert recs[1].extras == {"row": "labels.csv:3", "prompt": "q"}
  config = ml_collections.ConfigDict({"name": "csv", "options": {"mos_range": "1,5"}})
  scale, offset = records_lib.mos_scale(config)
  assert (scale, offset) == (4.0, 1.0)
  assert [r.mos * scale + offset for r in recs] == [r.raw_mos for r in recs]
  for bad, says in (("1-5", "expected LO,HI"), ("5,1", "needs finite LO < HI"),
                    ("1,nan", "needs finite LO < HI")):
    with pytest.raises(ValueError, match=rf"data.options.mos_range='{bad}': {says}"):
      _load("csv", tmp_path, mos_range=bad)


def test_csv_few_rows_off_the_unit_scale_are_bad_rows(tmp_path):
  """One typo among [0, 1] values is a row error (skippable), not a scale problem; a raw_mos
  column beside mos_range is refused."""
  for name in "abc":
    _image(tmp_path / f"imgs/{name}.png")
  _csv(tmp_path / "labels.csv", ["path", "mos", "raw_mos"],
       [["imgs/a.png", 0.2, 1], ["imgs/b.png", 42, 2], ["imgs/c.png", 0.9, 3]])
  config = ml_collections.ConfigDict({"name": "csv", "dir": str(tmp_path), "options": {}})
  records = datasets.load_records(config)
  with pytest.raises(ValueError, match=r"b.png \(labels.csv:3\): normalised MOS 42"):
    pipeline.check_records(records)
  with pytest.raises(ValueError, match=r"csv: labels.csv:2 has a raw_mos and "
                     r"data.options.mos_range='0,100' makes mos the raw score"):
    _load("csv", tmp_path, mos_range="0,100")
