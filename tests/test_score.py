"""Scoring CLI: one row per input, bad inputs reported in their row and the exit status, every
pixel format scored, streaming + --resume, and scores equal the run's own predictions."""
import csv

import numpy as np
import pytest
from PIL import Image

from iqa_jax import evaluate, score


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory, tiny_demo_dir):
  d = tmp_path_factory.mktemp("inputs")
  base = Image.open(next((tiny_demo_dir / "images").glob("I01_01_01_*.png"))).convert("RGB")
  base = base.resize((48, 40))
  base.convert("L").save(d / "gray.png")
  base.convert("CMYK").save(d / "cmyk.jpg")
  rgba = base.convert("RGBA"); rgba.putalpha(128); rgba.save(d / "alpha.png")
  Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(d / "sixteen.png")
  exif = Image.Exif(); exif[0x0112] = 6  # rotate 90 on display
  base.save(d / "exif.jpg", exif=exif.tobytes())
  base.resize((3, 3)).save(d / "tiny.png")  # smaller than a patch
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (d / "notes.txt").write_text("not an image and not picked up from a folder")
  return d


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_folder_scoring_with_bad_inputs(trained_run, odd_inputs, tmp_path, capsys):
  _, workdir, _ = trained_run
  out = tmp_path / "s.csv"
  missing = str(odd_inputs / "missing.png")
  rc = score.main(["--workdir", str(workdir), "--out", str(out), "--no-progress",
                   "--batch-size", "4", str(odd_inputs), missing])
  assert rc == 1  # some inputs failed
  rows = {r["path"]: r for r in _rows(out)}
  assert len(rows) == 8  # 7 image files in the folder + the missing one; .txt is not an image
  for name in ("gray.png", "cmyk.jpg", "alpha.png", "sixteen.png", "exif.jpg", "tiny.png"):
    r = rows[str(odd_inputs / name)]
    assert r["error"] == "" and np.isfinite(float(r["score"]))
    assert float(r["mos"]) == pytest.approx(float(r["score"]) * 4 + 1, abs=1e-5)  # KADID scale
  for bad in (str(odd_inputs / "corrupt.jpg"), missing):
    assert rows[bad]["score"] == "" and bad.split("/")[-1] in rows[bad]["error"]
  assert "could not be scored" in capsys.readouterr().err
  rc = score.main(["--workdir", str(workdir), "--out", str(tmp_path / "t.csv"), "--no-progress",
                   "--no-fail-on-error", missing])
  assert rc == 0


def test_scores_equal_the_runs_validation_predictions(trained_run, tmp_path):
  _, workdir, _ = trained_run
  preds = _rows(workdir / "val_predictions.csv")
  lst = tmp_path / "list.txt"
  lst.write_text("\n".join(r["path"] for r in preds[:10]) + "\n")
  out = tmp_path / "v.csv"
  assert score.main(["--workdir", str(workdir), "--out", str(out), "--no-progress",
                     "--batch-size", "4", "@" + str(lst)]) == 0
  got = _rows(out)
  assert [r["path"] for r in got] == [r["path"] for r in preds[:10]]
  np.testing.assert_allclose([float(r["score"]) for r in got],
                             [float(r["pred"]) for r in preds[:10]], atol=1e-5)
  # --resume: the 10 rows stay, only new paths are appended.
  lst.write_text("\n".join(r["path"] for r in preds[:14]) + "\n")
  assert score.main(["--workdir", str(workdir), "--out", str(out), "--no-progress", "--resume",
                     "@" + str(lst)]) == 0
  again = _rows(out)
  assert [r["path"] for r in again] == [r["path"] for r in preds[:14]]
  assert again[:10] == got


def test_exif_rotation_is_applied_before_scoring(trained_run, odd_inputs, tmp_path):
  """The EXIF-rotated file scores like the same pixels stored upright."""
  _, workdir, _ = trained_run
  upright = Image.open(odd_inputs / "exif.jpg")
  from PIL import ImageOps
  ImageOps.exif_transpose(upright).save(tmp_path / "upright.png")
  out = tmp_path / "e.csv"
  score.main(["--workdir", str(workdir), "--out", str(out), "--no-progress",
              str(odd_inputs / "exif.jpg"), str(tmp_path / "upright.png")])
  a, b = (float(r["score"]) for r in _rows(out))
  assert a == pytest.approx(b, abs=1e-5)


def test_cross_dataset_evaluation_writes_metrics_and_csv(trained_run, tiny_demo_dir, tmp_path):
  from scipy import stats
  config, workdir, _ = trained_run
  dc = evaluate.data_config_for(config, "demo", str(tiny_demo_dir))
  r = evaluate.evaluate_run(str(workdir), dc, out_dir=str(tmp_path))
  rows = _rows(tmp_path / "eval_demo.csv")
  assert r["n"] == len(rows) == 240
  pred, mos = [float(x["pred"]) for x in rows], [float(x["mos"]) for x in rows]
  assert r["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-6)
  assert r["plcc"] == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-6)
