"""The gallery pages: numbers against the CSV and results.json they come from, thumbnails against
the image files, the page drawn in headless Chromium, and bad input."""
import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_demo_config
from PIL import Image
from scipy import stats

from iqa_jax import (
  metrics,
  report,  # the CLI: report gallery
)
from iqa_jax.analysis import browser, gallery
from iqa_jax.data import datasets, demo
from iqa_jax.data.images import load_image
from iqa_jax.runs import folder as run_folder
from iqa_jax.training import loop as train


class Page(HTMLParser):
  """Every <img> src; every element with an id; per table id its rows of (text, data-v) cells."""

  def __init__(self, text: str):
    super().__init__()
    self.images, self.ids, self.tables = [], {}, {}
    self._table, self._row, self._cell, self._open = None, None, None, []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "img":
      self.images.append(a.get("src", ""))
    if "id" in a:
      self.ids[a["id"]] = a
    if tag == "table":
      self._table = a.get("id")
      self.tables[self._table] = []
    elif tag == "tr" and self._table:
      self._row = []
    elif tag in ("td", "th") and self._row is not None:
      self._cell = [tag, "", a.get("data-v"), a]
    if self._cell is not None and tag == "img":
      self._cell[3] = {**self._cell[3], "src": a.get("src")}

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[1] += data

  def handle_endtag(self, tag):
    if tag in ("td", "th") and self._cell is not None:
      self._row.append(self._cell)
      self._cell = None
    elif tag == "tr" and self._row is not None:
      if any(c[0] == "td" for c in self._row):
        self.tables[self._table].append(self._row)
      self._row = None
    elif tag == "table":
      self._table = None


def decode(uri: str) -> np.ndarray:
  assert uri.startswith("data:image/png;base64,")
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def make_run(folder: Path, data_dir: Path, n_val: int = 40) -> tuple[Path, list, np.ndarray]:
  """A run folder as train writes it (its own writers), with known predictions for n_val demo
  images: config.json, splits.json, val_predictions.csv and results.json of 'epoch 3'."""
  records = demo.load(str(data_dir))
  rs = np.random.RandomState(0)
  val = [records[i] for i in sorted(rs.choice(len(records), n_val, replace=False))]
  pred = np.array([r.mos for r in val]) + rs.normal(0, 0.2, n_val)
  folder.mkdir(parents=True)
  config = tiny_demo_config(data_dir)
  run_folder.write_text(folder / "config.json", config.to_json_best_effort(indent=2))
  datasets.save_splits({"train": records[:8], "val": val}, str(folder))
  train.write_predictions(folder / "val_predictions.csv", val, pred)
  rows = list(csv.DictReader(open(folder / "val_predictions.csv")))
  m = metrics.compute_metrics([float(r["pred"]) for r in rows], [r.mos for r in val])
  run_folder.write_json(folder / "results.json", {
      "dataset": "demo", "head": config.model.head, "seed": config.seed, "epochs": 4,
      "n_train": 8, "n_val": n_val, "best": {"epoch": 2, **m}, "status": "done"})
  return folder, val, pred


def cell(row, i):
  return row[i][2]


def test_run_page_numbers_equal_the_csv_and_results(tiny_demo_dir, tmp_path, monkeypatch):
  workdir, val, _ = make_run(tmp_path / "run", tiny_demo_dir)
  text, summary = gallery.run_page(str(workdir), top=5)
  page = Page(text)
  assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
  assert summary == {"images": 40, "shown": 10, "missing": 0}
  rows = list(csv.DictReader(open(workdir / "val_predictions.csv")))
  err = np.array([float(r["pred"]) - float(r["mos"]) for r in rows])
  results = json.loads((workdir / "results.json").read_text())
  # Header and metrics: results.json copied; the CSV's SRCC/PLCC recomputed by scipy.
  header = {r[0][1]: r[1][1] for r in page.tables["header"]}
  assert header["best epoch"] == "3" and header["seed"] == "8" and header["dataset"] == "demo"
  assert float(page.ids["srcc"]["data-v"]) == results["best"]["srcc"]
  assert float(page.ids["plcc"]["data-v"]) == results["best"]["plcc"]
  pred, mos = (np.array([float(r[k]) for r in rows]) for k in ("pred", "mos"))
  assert float(page.ids["csv_srcc"]["data-v"]) == pytest.approx(stats.spearmanr(pred, mos)[0],
                                                                abs=1e-12)
  assert float(page.ids["csv_plcc"]["data-v"]) == pytest.approx(stats.pearsonr(pred, mos)[0],
                                                                abs=1e-12)
  # The largest over- and under-predictions, in order, with the CSV's own strings.
  for table, order in (("over", np.argsort(-err, kind="stable")), ("under", np.argsort(err))):
    shown = page.tables[table]
    assert [r[-1][1] for r in shown] == [rows[i]["path"] for i in order[:5]]
    for r, i in zip(shown, order[:5], strict=True):
      assert (cell(r, 2), cell(r, 3)) == (rows[i]["mos"], rows[i]["pred"])
      assert float(cell(r, 4)) == float(rows[i]["pred"]) - float(rows[i]["mos"])
      # 32 px tiles under a 128 px thumbnail: the PNG holds the file's pixels exactly.
      np.testing.assert_array_equal(decode(r[1][3]["src"]), load_image(rows[i]["path"]))
      rec = next(v for v in val if v.path == rows[i]["path"])
      assert r[5][1] == rec.extras["distortion"] and r[6][1] == str(round(6 - rec.raw_mos))
  # Error per distortion: n, mean error and mean |error| from the CSV with numpy.
  by = {}
  for r, v in zip(rows, val, strict=True):
    by.setdefault(v.extras["distortion"], []).append(float(r["pred"]) - float(r["mos"]))
  got = {r[0][1]: r for r in page.tables["group-distortion"]}
  assert set(got) == set(by)
  for name, e in by.items():
    assert int(cell(got[name], 1)) == len(e)
    assert float(cell(got[name], 2)) == pytest.approx(np.mean(e), abs=1e-12)
    assert float(cell(got[name], 3)) == pytest.approx(np.mean(np.abs(e)), abs=1e-12)
  assert {r[0][1] for r in page.tables["group-level"]} == {"1", "2", "3", "4", "5"} & {
      str(round(6 - v.raw_mos)) for v in val}
  assert text.count("<circle") == 40  # every point drawn ...
  monkeypatch.setattr(gallery, "SCATTER_POINTS", 25)  # ... until there are more than this
  text, _ = gallery.run_page(str(workdir), top=5)
  assert text.count("<circle") == 25 and "(40 images, 25 drawn, evenly sampled)" in text


def write_scores(path: Path, paths: list[str], scores: np.ndarray, failed: dict) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(("path", "score", "mos", "error"))
    for p, s in zip(paths, scores, strict=True):
      w.writerow((p, f"{s:.6f}", f"{4 * s + 1:.6f}", ""))
    for p, e in failed.items():
      w.writerow((p, "", "", e))


def test_scores_page_samples_with_counts_and_lists_failed_rows(tiny_demo_dir, tmp_path,
                                                              monkeypatch):
  paths = sorted(str(p) for p in (tiny_demo_dir / "images").glob("I01_*.png"))[:60]
  scores = np.random.RandomState(1).rand(60)
  failed = {str(tmp_path / "gone.png"): "ImageError: gone.png: file not found",
            str(tmp_path / "bad.jpg"): "ImageError: bad.jpg: not a readable image"}
  out = tmp_path / "scores.csv"
  write_scores(out, paths, scores, failed)
  text, summary = gallery.scores_page(str(out), top=5, sample=10)
  page = Page(text)
  assert all(src.startswith("data:image/png;base64,") for src in page.images)
  assert len(page.images) == 20
  counts = page.ids["counts"]
  assert (counts["data-rows"], counts["data-scored"], counts["data-failed"],
          counts["data-shown"]) == ("62", "60", "2", "20")
  # Ranks shown: the 5 best, 10 evenly spaced (rank 5 .. 54 in 11 steps), the 5 worst.
  ranked = np.argsort(-scores, kind="stable")
  middle = np.linspace(5, 54, 12)[1:-1].round().astype(int)
  want = list(range(5)) + middle.tolist() + list(range(55, 60))
  shown = page.tables["images"]
  assert [int(r[4][1]) - 1 for r in shown] == want
  assert [r[-1][1] for r in shown] == [paths[ranked[k]] for k in want]
  assert [float(cell(r, 2)) for r in shown] == [float(f"{scores[ranked[k]]:.6f}") for k in want]
  # The histogram counts every scored row.
  bins = page.ids["histogram"]
  assert bins is not None
  hist_counts, _ = np.histogram([float(f"{s:.6f}") for s in scores], bins=20)
  assert summary["counts"] == hist_counts.tolist() and sum(summary["counts"]) == 60
  assert text.count('class="bin"') == 20
  assert [(r[0][1], r[1][1]) for r in page.tables["failed"]] == list(failed.items())
  assert "model-missing" in page.ids  # written by hand: no OUT.meta.json beside it
  monkeypatch.setattr(gallery, "FAILED_ROWS", 1)  # more failed rows than a page lists: said so
  page = Page(gallery.scores_page(str(out), top=5, sample=10)[0])
  assert len(page.tables["failed"]) == 1 and "failed-sampled" in page.ids


def test_bad_input_is_one_line_or_a_page_that_says_what_is_missing(tiny_demo_dir, tmp_path,
                                                                    capsys):
  workdir, val, _ = make_run(tmp_path / "run", tiny_demo_dir, n_val=12)
  out = tmp_path / "page.html"
  # A run without val_predictions.csv: one line naming it.
  (workdir / "val_predictions.csv").rename(tmp_path / "kept.csv")
  assert report.main(["gallery", "--workdir", str(workdir), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "val_predictions.csv not found" in err[0] and not out.exists()
  (tmp_path / "kept.csv").rename(workdir / "val_predictions.csv")
  with pytest.raises(SystemExit) as exit_:  # a flag mistake
    report.main(["gallery", "--workdir", str(workdir)])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_.value.code == 2 and len(err) == 1 and "--out" in err[0]
  # A CSV that is not a score CSV, and a file at --out that is not a gallery page.
  bad = tmp_path / "labels.csv"
  bad.write_text("path,mos\na.png,0.5\n")
  assert report.main(["gallery", "--scores", str(bad), "--out", str(out)]) == 2
  assert "is not a score CSV" in capsys.readouterr().err
  precious = tmp_path / "notes.html"
  precious.write_text("<html>mine</html>")
  assert report.main(["gallery", "--workdir", str(workdir), "--out", str(precious)]) == 2
  assert "is not a gallery page" in capsys.readouterr().err
  assert precious.read_text() == "<html>mine</html>"
  # The image folder moved: the page says which images it could not read, and --image-root
  # OLD=NEW finds them again.
  images = Path(val[0].path).parent
  moved = tmp_path / "moved_images"
  shutil.copytree(images, moved)
  old = tmp_path / "data_copy"
  shutil.move(str(images), str(old))  # the recorded folder is gone
  try:
    assert report.main(["gallery", "--workdir", str(workdir), "--out", str(out),
                        "--top", "3"]) == 0
    io_ = capsys.readouterr()
    assert "6 of 6 images could not be read" in io_.err and len(io_.err.splitlines()) == 1
    page = Page(out.read_text())
    assert not page.images and "missing" in page.ids
    assert out.read_text().count("image not found") == 6
    assert report.main(["gallery", "--workdir", str(workdir), "--out", str(out), "--top", "3",
                        "--image-root", f"{images}={moved}"]) == 0
    assert capsys.readouterr().err == ""
    assert len(Page(out.read_text()).images) == 6
  finally:
    shutil.move(str(old), str(images))


def _pixels(png: bytes, rect: dict) -> np.ndarray:
  im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  x, y, w, h = (round(rect[k]) for k in ("x", "y", "width", "height"))
  return im[y:y + h, x:x + w]


def _near(region: np.ndarray, rgb, tol: int = 40) -> int:
  """Pixels within `tol` (sum of |channel differences|) of the colour."""
  return int((np.abs(region - np.array(rgb)).sum(-1) < tol).sum())


BLUE = (31, 119, 180)         # #1f77b4: points and bars
PALE_BLUE = (132, 180, 214)   # a point alone: #1f77b4 at 55% opacity on white
RED = (214, 39, 40)           # #d62728: the logistic fit


RECT = "(function(){var r=document.querySelector(%r).getBoundingClientRect();" \
       "return {x:r.x+scrollX,y:r.y+scrollY,width:r.width,height:r.height};})()"


@pytest.mark.skipif(browser.find_browser() is None, reason="needs Chromium (.ci/run installs it)")
def test_pages_draw_in_chromium_without_console_errors(tiny_demo_dir, tmp_path):
  workdir, _, _ = make_run(tmp_path / "run", tiny_demo_dir)
  run_html = gallery.write_page(gallery.run_page(str(workdir), top=4)[0], tmp_path / "run.html")
  paths = sorted(str(p) for p in (tiny_demo_dir / "images").glob("I02_*.png"))[:30]
  write_scores(tmp_path / "s.csv", paths, np.linspace(0, 1, 30), {"x.png": "ImageError: x"})
  scores_html = gallery.write_page(gallery.scores_page(str(tmp_path / "s.csv"), top=3,
                                                       sample=4)[0], tmp_path / "scores.html")
  broken = tmp_path / "broken.html"  # the check itself must see an error and a fetch
  broken.write_text('<html><body><img src="http://127.0.0.1:9/x.png">'
                    "<script>undefinedFunction();</script></body></html>")
  # Click the 'mean |error|' header of a table the screenshot does not look at.
  sort_js = ("(function(){var t=document.getElementById('group-distortion');"
             "t.tHead.rows[0].cells[3].click();return Array.prototype.map.call(t.tBodies[0].rows,"
             "function(r){return +r.cells[3].dataset.v;});})()")
  with browser.Browser() as b:
    run_view = b.open(run_html, evaluate={"scatter": RECT % "#scatter",
                                          "thumb": RECT % "#over img.thumb",
                                          "sorted": sort_js})
    scores_view = b.open(scores_html, evaluate={"hist": RECT % "#histogram",
                                                "thumb": RECT % "#images img.thumb"})
    broken_view = b.open(broken)
  assert run_view.errors == [] and run_view.requests == []
  assert scores_view.errors == [] and scores_view.requests == []
  assert any("undefinedFunction" in e for e in broken_view.errors)
  assert broken_view.requests == ["http://127.0.0.1:9/x.png"]
  # The scatter: blue points and the red logistic curve drawn inside its box.
  scatter = _pixels(run_view.png, run_view.values["scatter"])
  assert _near(scatter, PALE_BLUE) > 150  # measured 504 (40 points, r 2.6)
  assert _near(scatter, RED) > 300        # measured 1064
  hist = _pixels(scores_view.png, scores_view.values["hist"])
  assert _near(hist, BLUE, 10) > 15000    # measured 54708
  # Thumbnails: the first over-prediction and the top score are drawn as their images: the
  # 32 px tile at 4x, pixelated, pixel for pixel (measured: identical).
  rows = list(csv.DictReader(open(workdir / "val_predictions.csv")))
  first = max(rows, key=lambda r: float(r["pred"]) - float(r["mos"]))["path"]
  for view, path in ((run_view, first), (scores_view, paths[-1])):
    region = _pixels(view.png, view.values["thumb"])
    assert region.shape[:2] == (128, 128) and region.std() > 5
    np.testing.assert_array_equal(region, load_image(path).repeat(4, 0).repeat(4, 1))
  # A click on a header sorts the table (ascending).
  got = run_view.values["sorted"]
  assert len(got) == 4 and got == sorted(got) and got != [float(cell(r, 3)) for r in
                                                          Page(run_html.read_text()).tables[
                                                              "group-distortion"]]


@pytest.mark.slow  # two eager Grad-CAM passes: 16.4 s CPU, 52.5 s wall at load 11 on 2 cores
def test_gradcam_overlays_are_explains_gradcam_of_each_image(trained_run):
  from iqa_jax.analysis import explain
  from iqa_jax.inference.loaded import load_run
  _, workdir, _ = trained_run
  over = Page(gallery.run_page(str(workdir), top=1, gradcam=True)[0]).tables["over"]
  # The reference: explain's Grad-CAM of this one image (the page maps its images in one batch).
  loaded = load_run(str(workdir))
  (x, image), = explain._model_inputs(loaded, [over[0][-1][1]])
  want = explain.overlay(image, np.asarray(explain.gradcam(loaded.model, loaded.params, x)[0][0]))
  got = decode(over[0][2][3]["src"]).astype(int)  # PNG: lossless
  assert np.abs(got - want).max() <= 1  # float32 maps of a batch of 2 vs 1; measured 0


def test_score_records_its_model_and_the_scores_page_shows_it(trained_run, tmp_path):
  """The sidecar beside the CSV names the model; the page shows it; --resume with another view
  is refused before any row."""
  from iqa_jax.inference import score_csv as score
  config, workdir, _ = trained_run
  paths = [r.path for r in datasets.load_splits(str(workdir))["val"][:3]]
  out = str(tmp_path / "s.csv")
  score.score_paths(str(workdir), paths, out, batch_size=4, progress=False)
  meta = json.loads(Path(out + ".meta.json").read_text())
  about = meta["about"]
  assert about["path"] == str(Path(workdir).resolve()) and about["kind"] == "run"
  assert (about["head"], about["dataset"], meta["view"]) == (config.model.head, "demo",
                                                              config.data.test_view)
  shown = {r[0][1]: r[1][1] for r in Page(gallery.scores_page(out, top=1)[0]).tables["model"]}
  assert shown["head"] == config.model.head and shown["model"] == about["path"]
  assert shown["fingerprint"] == meta["model"]
  before = Path(out).read_text()
  other = "resize" if config.data.test_view == "crops" else "crops"
  with pytest.raises(score.UsageError, match="view"):
    score.score_paths(str(workdir), paths, out, batch_size=4, progress=False, resume=True,
                      view=other)
  assert Path(out).read_text() == before
