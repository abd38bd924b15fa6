"""One self-contained HTML page to look at the images a model judges:

  python -m iqa_jax.report gallery --workdir RUN --out PAGE.html [--top N] [--gradcam]
  python -m iqa_jax.report gallery --scores SCORES.csv --out PAGE.html [--top N] [--sample K]

A run's page: its header (dataset, split, seed, head, backbone, epochs), a scatter of prediction vs
MOS (val_predictions.csv, the best epoch) with SRCC/PLCC and the fitted VQEG logistic, the N
largest over- and under-predictions as thumbnails (with Grad-CAM overlays of the score with
--gradcam), and the error per group where the dataset has groups (KADID distortion and level, the
demo's distortion and level, AGIQA's generator). A score CSV's page: the model that made it (its
OUT.meta.json sidecar), a histogram of every score, the top and bottom N and an even sample in
between as thumbnails, and the failed rows with their errors.
Thumbnails are PNG (lossless: the page adds no artifacts to images judged for quality) inside the
file; tables sort on a header click and filter by text, in plain JavaScript; nothing is fetched.
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iqa_jax import metrics

GENERATOR = "iqa_jax.gallery"  # a page we wrote carries it; any other file at --out is refused
# KADID-10k's 25 distortion types, numbered as in its file names (I01_<type>_<level>.png).
KADID_DISTORTIONS = (
    "gaussian blur", "lens blur", "motion blur", "color diffusion", "color shift",
    "color quantization", "color saturation 1", "color saturation 2", "jpeg2000", "jpeg",
    "white noise", "white noise in color component", "impulse noise", "multiplicative noise",
    "denoise", "brighten", "darken", "mean shift", "jitter", "non-eccentricity patch", "pixelate",
    "quantization", "color block", "high sharpen", "contrast change")
SCATTER_POINTS = 5000  # more validation images than this are drawn as an even sample, said so
FAILED_ROWS = 1000  # failed rows listed on a page; the page says how many more the CSV holds


class GalleryError(ValueError):
  """Input the page cannot be made from: one line naming the file and the fix."""


@dataclasses.dataclass
class PageImage:
  """One row shown on a page: the path as recorded, and its numbers as the CSV spells them."""
  path: str
  values: dict[str, str]  # column -> CSV text ('' when empty)
  groups: dict[str, str] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ groups

def image_groups(dataset: str, path: str, raw_mos: float, extras: dict) -> dict[str, str]:
  """The groups an image belongs to: KADID/demo distortion and level, AGIQA generator."""
  name = dataset.split(":")[0]
  if name == "kadid10k" and "distortion" in extras:
    d = int(extras["distortion"])
    return {"distortion": f"{d:02d} {KADID_DISTORTIONS[d - 1]}", "level": str(extras["level"])}
  if name == "demo" and "distortion" in extras:  # demo dmos = 6 - level (data/demo.py)
    return {"distortion": str(extras["distortion"]), "level": str(round(6 - raw_mos))}
  if name in ("agiqa3k", "agiqa1k"):  # the release names files <generator>_...
    return {"generator": Path(path).name.split("_")[0]}
  return {}


def group_errors(images: Sequence[PageImage], key: str) -> list[dict]:
  """Per value of one group: n, mean signed error (pred - mos), mean |error|, SRCC inside."""
  by: dict[str, list[PageImage]] = {}
  for im in images:
    if key in im.groups:
      by.setdefault(im.groups[key], []).append(im)
  rows = []
  for value in sorted(by):
    pred = np.array([float(im.values["pred"]) for im in by[value]])
    mos = np.array([float(im.values["mos"]) for im in by[value]])
    err = pred - mos
    rows.append({"group": value, "n": len(err), "mean_error": float(err.mean()),
                 "mae": float(np.abs(err).mean()),
                 "srcc": metrics.compute_metrics(pred, mos)["srcc"]})
  return rows


# ------------------------------------------------------------------------------ images

def remap(path: str, image_root: tuple[str, str] | None) -> str:
  """The path with the recorded prefix OLD swapped for NEW (--image-root OLD=NEW)."""
  if image_root and path.startswith(image_root[0]):
    return image_root[1] + path[len(image_root[0]):]
  return path


def thumbnail(path: str, size: int) -> str | None:
  """A data: URI of the image as a PNG, longest side at most `size`; None if unreadable."""
  from PIL import Image as PILImage

  from iqa_jax.data.images import load_image
  try:
    image = PILImage.fromarray(load_image(path, draft_size=size))  # JPEGs decode at 1/2..1/8
  except (OSError, ValueError):
    return None
  image.thumbnail((size, size), PILImage.LANCZOS)
  return png_uri(np.asarray(image))


def png_uri(array: np.ndarray) -> str:
  from PIL import Image as PILImage
  buf = io.BytesIO()
  PILImage.fromarray(array).save(buf, "PNG", optimize=True)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def gradcam_uris(workdir: str, paths: Sequence[str], size: int) -> list[str | None]:
  """Grad-CAM overlays of the score (explain.py) as data: URIs; None for an unreadable image."""
  from PIL import Image as PILImage

  from iqa_jax.analysis import explain
  readable = [p for p in paths if os.path.isfile(p)]
  overlays = dict(zip(readable, explain.score_overlays(workdir, readable), strict=True))
  out = []
  for p in paths:
    if p not in overlays:
      out.append(None)
      continue
    image = PILImage.fromarray(overlays[p])
    image.thumbnail((size, size), PILImage.LANCZOS)
    out.append(png_uri(np.asarray(image)))
  return out


# ------------------------------------------------------------------------------ SVG charts

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _axes(x0, x1, y0, y1, w, h, pad, xlabel, ylabel, yfmt: str = ".2f"
          ) -> tuple[list[str], Callable, Callable]:
  """Frame, ticks and labels of a w x h plot; returns (svg parts, x->px, y->px)."""
  sx = lambda v: pad + (v - x0) / ((x1 - x0) or 1) * (w - 1.5 * pad)  # noqa: E731
  sy = lambda v: h - pad - (v - y0) / ((y1 - y0) or 1) * (h - 1.5 * pad)  # noqa: E731
  parts = [f'<rect x="{pad}" y="{pad / 2}" width="{w - 1.5 * pad}" height="{h - 1.5 * pad}" '
           f'fill="#fff" stroke="#333"/>']
  for v in _ticks(x0, x1):
    parts.append(f'<text x="{sx(v):.1f}" y="{h - pad + 14}" text-anchor="middle">{v:.2f}</text>')
  for v in _ticks(y0, y1):
    parts.append(f'<text x="{pad - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:{yfmt}}</text>')
  parts.append(f'<text x="{pad + (w - 1.5 * pad) / 2}" y="{h - 6}" text-anchor="middle">'
               f'{html.escape(xlabel)}</text>')
  parts.append(f'<text x="12" y="{h / 2}" text-anchor="middle" transform="rotate(-90 12 {h / 2})">'
               f'{html.escape(ylabel)}</text>')
  return parts, sx, sy


def _svg(element_id: str, w: int, h: int, parts: list[str]) -> str:
  return (f'<svg id="{element_id}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
          f'xmlns="http://www.w3.org/2000/svg" font-size="11">' + "".join(parts) + "</svg>")


def svg_scatter(pred: np.ndarray, mos: np.ndarray, beta: np.ndarray | None,
                w: int = 480, h: int = 420) -> str:
  """Prediction (x) vs MOS (y), the logistic fit in red; an even sample over SCATTER_POINTS."""
  lo = float(min(pred.min(), mos.min()))
  hi = float(max(pred.max(), mos.max()))
  parts, sx, sy = _axes(lo, hi, lo, hi, w, h, 44, "predicted score", "MOS (normalised)")
  keep = np.linspace(0, len(pred) - 1, min(len(pred), SCATTER_POINTS)).round().astype(int)
  parts += [f'<circle cx="{sx(pred[i]):.1f}" cy="{sy(mos[i]):.1f}" r="2.6" fill="#1f77b4" '
            f'fill-opacity="0.55"/>' for i in keep]
  if beta is not None:
    xs = np.linspace(pred.min(), pred.max(), 100)
    ys = metrics.logistic4(xs, *beta)
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True)
                   if lo <= y <= hi)
    parts.append(f'<polyline id="logistic" points="{pts}" fill="none" stroke="#d62728" '
                 f'stroke-width="3"/>')
  return _svg("scatter", w, h, parts)


def svg_histogram(scores: np.ndarray, bins: int = 20, w: int = 480, h: int = 260
                  ) -> tuple[str, np.ndarray, np.ndarray]:
  """-> (svg, counts, edges) of every score."""
  counts, edges = np.histogram(scores, bins=bins)
  parts, sx, sy = _axes(float(edges[0]), float(edges[-1]), 0.0, float(counts.max()), w, h, 44,
                        "score", "images", ".0f")
  for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
    parts.append(f'<rect class="bin" data-count="{c}" data-lo="{a!r}" data-hi="{b!r}" '
                 f'x="{sx(a):.1f}" y="{sy(c):.1f}" width="{max(sx(b) - sx(a) - 1, 1):.1f}" '
                 f'height="{sy(0) - sy(c):.1f}" fill="#1f77b4"/>')
  return _svg("histogram", w, h, parts), counts, edges


def svg_bars(rows: list[dict], key: str, w: int = 480) -> str:
  """Horizontal bars of the mean |error| per group value."""
  h = 30 + 18 * len(rows)
  top = max(r["mae"] for r in rows) or 1.0
  parts = []
  for i, r in enumerate(rows):
    y = 10 + 18 * i
    parts.append(f'<text x="170" y="{y + 12}" text-anchor="end">{html.escape(r["group"])}</text>')
    parts.append(f'<rect x="176" y="{y}" width="{(w - 240) * r["mae"] / top:.1f}" height="14" '
                 f'fill="#ff7f0e"/>')
    parts.append(f'<text x="{180 + (w - 240) * r["mae"] / top:.1f}" y="{y + 12}">'
                 f'{r["mae"]:.3f}</text>')
  return _svg(f"bars-{key}", w, h, parts)


# ------------------------------------------------------------------------------ HTML

STYLE = """
body{font:14px system-ui,sans-serif;margin:20px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#eee}table.sortable th{cursor:pointer}th.asc:after{content:" ▲"}
th.desc:after{content:" ▼"}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.path{font-size:12px;word-break:break-all;max-width:360px}.note{color:#8a4b00}
img.thumb{image-rendering:pixelated;display:block}.charts{display:flex;gap:24px;flex-wrap:wrap}
input.filter{margin:4px 0;padding:3px;width:320px}
table.grid thead tr{display:flex;flex-wrap:wrap}
table.grid tbody{display:flex;flex-wrap:wrap;gap:6px}
table.grid tbody tr{display:flex;flex-direction:column;border:1px solid #ccc}
table.grid tbody td{border:none;padding:1px 4px;font-size:12px;text-align:left}
table.grid td.path{font-size:10px;max-width:136px}
table.grid td[data-label]:before{content:attr(data-label) " ";color:#777}
"""
# Sort on a header click (numbers by data-v, else text); filter rows by a substring.
SCRIPT = """
function cellKey(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''&&!isNaN(+v))return +v;
  return td.textContent.toLowerCase();}
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th,col){
    th.addEventListener('click',function(){
      var asc=!th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(o){o.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=cellKey(a.cells[col]),y=cellKey(b.cells[col]);
        return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});});});});
document.querySelectorAll('input.filter').forEach(function(input){
  input.addEventListener('input',function(){
    var q=input.value.toLowerCase(),table=document.getElementById(input.dataset.table);
    Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
      r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});});
"""


def esc(value) -> str:
  return html.escape(str(value), quote=True)


def number_cell(text: str, digits: int = 4, label: str = "") -> str:
  """A number as the source spells it in data-v, shown rounded."""
  try:
    shown = f"{float(text):.{digits}f}" if text != "" and math.isfinite(float(text)) else "—"
  except ValueError:
    shown = text
  label = f' data-label="{esc(label)}"' if label else ""
  return f'<td class="num" data-v="{esc(text)}"{label}>{esc(shown)}</td>'


def image_table(table_id: str, images: Sequence[PageImage], columns: Sequence[str],
                thumbs: Sequence[str | None], size: int, overlays: Sequence[str | None] = (),
                groups: Sequence[str] = (), grid: bool = False) -> str:
  """A sortable, filterable table: rank, thumbnail (and Grad-CAM), numbers, groups, path;
  `grid` lays each row out as a card (CSS only: sorting and filtering stay the same)."""
  head = ["#", "image"] + (["Grad-CAM"] if overlays else []) + list(columns) + list(groups) \
      + ["path"]
  out = [f'<input class="filter" data-table="{table_id}" placeholder="filter by path or group">',
         f'<table id="{table_id}" class="sortable{" grid" if grid else ""}"><thead><tr>'
         + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr></thead><tbody>"]
  for i, im in enumerate(images):
    cells = [f'<td class="num" data-v="{i + 1}">{i + 1}</td>']
    for uri in [thumbs[i]] + ([overlays[i]] if overlays else []):
      cells.append(f'<td><img class="thumb" width="{size}" src="{uri}" alt="{esc(im.path)}">'
                   "</td>" if uri else '<td class="note">image not found</td>')
    cells += [number_cell(im.values.get(c, ""), label=c) for c in columns]
    cells += [f'<td data-label="{esc(g)}">{esc(im.groups.get(g, ""))}</td>' for g in groups]
    cells.append(f'<td class="path">{esc(im.path)}</td>')
    out.append("<tr>" + "".join(cells) + "</tr>")
  return "\n".join(out) + "</tbody></table>"


def key_table(table_id: str, rows: Sequence[tuple[str, object]]) -> str:
  return (f'<table id="{table_id}">' + "".join(
      f'<tr><th>{esc(k)}</th><td data-key="{esc(k)}">{esc(v)}</td></tr>' for k, v in rows)
      + "</table>")


def page(title: str, body: Sequence[str]) -> str:
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          f'<meta name="generator" content="{GENERATOR}"><title>{esc(title)}</title>'
          f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(body)
          + f"\n<script>{SCRIPT}</script></body></html>\n")


def _metric(key: str, value) -> str:
  """A metric shown with 4 decimals, its full value in data-v (tests and scripts read it)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return f'<b id="{key}" data-v="">—</b>'
  return f'<b id="{key}" data-v="{value!r}">{value:.4f}</b>'


def _missing_note(thumbs: Sequence[str | None], images: Sequence[PageImage], image_root) -> str:
  missing = [im.path for im, t in zip(images, thumbs, strict=True) if t is None]
  if not missing:
    return ""
  return (f'<p class="note" id="missing">{len(missing)} of {len(images)} images shown here '
          f"could not be read (first: {esc(missing[0])}); if their folder moved, pass "
          f"--image-root OLD=NEW{' (now ' + esc('='.join(image_root)) + ')' if image_root else ''}"
          ".</p>")


# ------------------------------------------------------------------------------ run page

def read_run(workdir: str) -> tuple[list[PageImage], dict, dict, list[str]]:
  """-> (validation images of the best epoch, results.json or {}, config.json, notes)."""
  from iqa_jax.data import datasets
  from iqa_jax.runs import folder as run_folder
  w = Path(workdir)
  config = run_folder.read_config(w).to_dict()
  results = run_folder.read_json(w / run_folder.RESULTS) if (w / run_folder.RESULTS).exists() \
      else {}
  notes = [] if results else [f"{w / run_folder.RESULTS} not found: the run has not finished; "
                              "numbers are from its best epoch so far."]
  predictions = w / "val_predictions.csv"
  if not predictions.exists():
    why = results.get("error") or "no epoch has finished with a finite validation SRCC yet"
    raise GalleryError(f"{predictions} not found ({why}); train the run to the end of an epoch "
                       "(python -m iqa_jax.train ... --workdir RUN) or pass another --workdir")
  with open(predictions, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"path", "mos", "pred"} <= set(rows[0]):
    raise GalleryError(f"{predictions}: expected columns path,mos,pred with at least one row")
  extras = {}
  if (w / "splits.json").exists():
    extras = {r.path: r for r in datasets.load_splits(str(w)).get("val", [])}
  else:
    notes.append(f"{w / 'splits.json'} not found: no groups.")
  name = config["data"]["name"]
  images = []
  for line, r in enumerate(rows, start=2):
    try:
      values = {"mos": r["mos"], "pred": r["pred"],
                "error": repr(float(r["pred"]) - float(r["mos"]))}
    except (TypeError, ValueError):
      raise GalleryError(f"{predictions} line {line}: mos {r['mos']!r} and pred {r['pred']!r} "
                         "must be numbers (the file was cut or edited); restore it, or "
                         "retrain with --restart") from None
    rec = extras.get(r["path"])
    groups = image_groups(name, r["path"], rec.raw_mos, rec.extras) if rec else {}
    images.append(PageImage(r["path"], values, groups))
  return images, results, config, notes


def run_header(config: dict, results: dict) -> list[tuple[str, object]]:
  data, model = config["data"], config["model"]
  best = (results.get("best") or {})
  split = f"{data.get('split', 'random')}, val {data.get('val_fraction')}" + (
      f", test {data['test_fraction']}" if data.get("test_fraction") else "")
  return [("dataset", data["name"]), ("split", split), ("seed", config.get("seed")),
          ("head", model.get("head")), ("backbone", model.get("backbone")),
          ("init", model.get("init") or "random"), ("finetune", model.get("finetune")),
          ("epochs", results.get("epochs", config["optim"]["epochs"])),
          ("best epoch", best["epoch"] + 1 if "epoch" in best else "—"),
          ("train / val images", f"{results.get('n_train', '?')} / {results.get('n_val', '?')}"),
          ("status", results.get("status", "unfinished"))]


def run_page(workdir: str, top: int = 12, gradcam: bool = False, thumb: int = 128,
             image_root: tuple[str, str] | None = None) -> tuple[str, dict]:
  """The run's HTML page and a summary {'images', 'shown', 'missing'}."""
  images, results, config, notes = read_run(workdir)
  pred = np.array([float(im.values["pred"]) for im in images])
  mos = np.array([float(im.values["mos"]) for im in images])
  m = metrics.compute_metrics(pred, mos)
  try:
    beta = metrics.fit_logistic(pred, mos) if len(pred) > 4 and np.ptp(pred) > 0 else None
  except (RuntimeError, ValueError):
    beta = None
  err = pred - mos
  order = np.argsort(err, kind="stable")
  n = min(top, len(images))
  over = [images[i] for i in order[::-1][:n]]
  under = [images[i] for i in order[:n]]
  best = results.get("best") or {}
  notes = "".join(f'<p class="note">{esc(x)}</p>' for x in notes)
  body = [f'<div class="charts"><div>{key_table("header", run_header(config, results))}{notes}'
          f"</div>{svg_scatter(pred, mos, beta)}</div>"]
  body.append(
      "<p>Prediction vs MOS (validation, best epoch). results.json, best epoch: SRCC "
      f"{_metric('srcc', best.get('srcc'))}, PLCC {_metric('plcc', best.get('plcc'))}. From "
      f"val_predictions.csv ({len(images)} images"
      + (f", {SCATTER_POINTS} drawn, evenly sampled" if len(images) > SCATTER_POINTS else "")
      + f"): SRCC {_metric('csv_srcc', m['srcc'])}, PLCC {_metric('csv_plcc', m['plcc'])}, "
      "PLCC after the 4-parameter logistic (red) "
      f"{_metric('csv_plcc_logistic', m['plcc_logistic'])}"
      + (f'; logistic β <span id="beta" data-v="{esc(json.dumps(beta.tolist()))}">'
         f"{', '.join(f'{b:.3g}' for b in beta)}</span>" if beta is not None else "") + ".</p>")
  group_keys = list(dict.fromkeys(k for im in images for k in im.groups))
  groups = []
  for key in group_keys:
    rows = group_errors(images, key)
    groups.append(
        f"<div><h2>Error per {esc(key)}</h2><table id=\"group-{key}\" class=\"sortable\"><thead>"
        f"<tr><th>{esc(key)}</th><th>n</th><th>mean error</th><th>mean |error|</th><th>SRCC</th>"
        "</tr></thead><tbody>"
        + "".join(f"<tr><td>{esc(r['group'])}</td>" + number_cell(str(r["n"]), 0)
                  + "".join(number_cell(repr(r[c])) for c in ("mean_error", "mae", "srcc"))
                  + "</tr>" for r in rows)
        + f"</tbody></table>{svg_bars(rows, key)}</div>")
  if groups:
    body.append(f'<div class="charts">{"".join(groups)}</div>')
  paths = [remap(im.path, image_root) for im in over + under]
  thumbs = [thumbnail(p, thumb) for p in paths]
  overlays = gradcam_uris(workdir, paths, thumb) if gradcam else []
  for table_id, title, ims, t, o in (
      ("over", f"The {n} largest over-predictions (score above MOS)", over, thumbs[:n],
       overlays[:n]),
      ("under", f"The {n} largest under-predictions (score below MOS)", under, thumbs[n:],
       overlays[n:])):
    body.append(f"<h2>{esc(title)}</h2>")
    body.append(image_table(table_id, ims, ("mos", "pred", "error"), t, thumb, o, group_keys))
  body.append(_missing_note(thumbs, over + under, image_root))
  title = f"{config['data']['name']} · {config['model'].get('head')} head · seed " \
          f"{config.get('seed')} · {Path(workdir).resolve().name}"
  return page(title, body), {"images": len(images), "shown": 2 * n,
                             "missing": sum(t is None for t in thumbs)}


# ------------------------------------------------------------------------------ scores page

def model_record(scores: str) -> dict | None:
  """What score recorded beside the CSV (its OUT.meta.json sidecar), flat for the page; or None."""
  from iqa_jax.inference.score_csv import UsageError, read_sidecar
  try:
    found = read_sidecar(scores)
  except UsageError as e:
    raise GalleryError(str(e)) from None
  if found is None or "model" not in found[1]:  # none, or an older shard's .shard.json
    return None
  meta = found[1]
  about = meta.get("about") or {}
  return {"model": about.get("path", meta["model_source"]), "fingerprint": meta["model"],
          **{k: v for k, v in about.items() if k != "path"}, "view": meta["view"],
          "crops": meta["crops"]}


def pick_shown(n: int, top: int, sample: int) -> list[tuple[int, str]]:
  """Ranks (0 = highest score) to show: the top and bottom `top`, `sample` evenly in between."""
  if n <= 2 * top + sample:
    return [(i, "top" if i < top else "bottom" if i >= n - top else "sample") for i in range(n)]
  middle = np.linspace(top, n - top - 1, sample + 2)[1:-1].round().astype(int)
  return ([(i, "top") for i in range(top)] + [(int(i), "sample") for i in middle]
          + [(i, "bottom") for i in range(n - top, n)])


def scores_page(scores: str, top: int = 12, sample: int = 48, thumb: int = 128,
                image_root: tuple[str, str] | None = None) -> tuple[str, dict]:
  """The score CSV's HTML page and a summary {'images', 'scored', 'failed', 'shown', 'missing'}."""
  from iqa_jax.inference.score_csv import UsageError, read_score_csv
  if not os.path.isfile(scores):
    raise GalleryError(f"--scores {scores} not found: pass a CSV written by python -m "
                       "iqa_jax.score")
  try:
    rows, cut = read_score_csv(scores)
  except UsageError as e:
    raise GalleryError(str(e).replace("; pass another --out or drop --resume", "")) from None
  failed = [r for r in rows if r[3] != "" or r[1] == ""]
  scored = [PageImage(r[0], {"score": r[1], "mos": r[2]}) for r in rows
            if r[3] == "" and r[1] != ""]
  if not scored:
    raise GalleryError(f"{scores} holds no scored rows ({len(failed)} failed); nothing to show")
  scored.sort(key=lambda im: -float(im.values["score"]))
  record = model_record(scores)
  body = []
  if record:
    body.append("<h2>Model</h2>" + key_table("model", [(k, v) for k, v in record.items()
                                                        if not isinstance(v, dict)]))
  else:
    body.append(f'<p class="note" id="model-missing">{esc(scores)}.meta.json not found: the '
                "model that made this CSV is not recorded (a CSV from before iqa_jax recorded "
                "it).</p>")
  if cut:
    body.append('<p class="note">The last line of the CSV was cut (an unfinished score run); '
                "it is left out.</p>")
  values = np.array([float(im.values["score"]) for im in scored])
  hist, counts, edges = svg_histogram(values)
  shown = pick_shown(len(scored), top, sample)
  body.append(f'<p id="counts" data-rows="{len(rows)}" data-scored="{len(scored)}" '
              f'data-failed="{len(failed)}" data-shown="{len(shown)}">{len(rows)} rows: '
              f"{len(scored)} scored, {len(failed)} failed. Shown as thumbnails: "
              + (f"all {len(shown)}" if len(shown) == len(scored) else
                 f"{len(shown)} of {len(scored)} (the top {top} and bottom {top} by score, and "
                 f"{len(shown) - 2 * top} evenly spaced by rank in between)")
              + ". The histogram counts every scored row.</p>")
  body = [f'<div class="charts"><div style="max-width:560px">{"".join(body)}</div>'
          f'<div><h2>Scores</h2>{hist}</div></div>']
  ims = [scored[i] for i, _ in shown]
  for im, (i, part) in zip(ims, shown, strict=True):
    im.groups = {"rank": str(i + 1), "part": part}
  thumbs = [thumbnail(remap(im.path, image_root), thumb) for im in ims]
  body.append("<h2>Images by score (highest first)</h2>")
  body.append(image_table("images", ims, ("score", "mos"), thumbs, thumb,
                          groups=("rank", "part"), grid=True))
  body.append(_missing_note(thumbs, ims, image_root))
  body.append(f"<h2>Failed rows ({len(failed)})</h2>")
  if len(failed) > FAILED_ROWS:
    body.append(f'<p class="note" id="failed-sampled">The first {FAILED_ROWS} of {len(failed)} '
                f"failed rows; all of them are in {esc(scores)}.</p>")
  if failed:
    body.append('<table id="failed" class="sortable"><thead><tr><th>path</th><th>error</th></tr>'
                "</thead><tbody>" + "".join(f'<tr><td class="path">{esc(r[0])}</td>'
                                            f"<td>{esc(r[3])}</td></tr>"
                                            for r in failed[:FAILED_ROWS])
                + "</tbody></table>")
  else:
    body.append("<p>none</p>")
  summary = {"images": len(rows), "scored": len(scored), "failed": len(failed),
             "shown": len(shown), "missing": sum(t is None for t in thumbs),
             "counts": counts.tolist(), "edges": edges.tolist()}
  return page(f"scores · {Path(scores).name}", body), summary


# ------------------------------------------------------------------------------ CLI

def write_page(text: str, out: str) -> Path:
  """Atomically; a file at `out` that this module did not write is never replaced."""
  from iqa_jax.runs import folder as run_folder
  path = Path(out)
  if path.is_dir():
    raise GalleryError(f"--out {out} is a folder; pass a file, e.g. {out}/gallery.html")
  if path.exists():
    with open(path, errors="replace") as f:
      start = f.read(4096)
    if f'content="{GENERATOR}"' not in start:
      raise GalleryError(f"--out {out} exists and is not a gallery page; remove it or pass "
                         "another --out")
  path.parent.mkdir(parents=True, exist_ok=True)
  run_folder.write_text(path, text)
  return path


def _image_root(text: str | None) -> tuple[str, str] | None:
  if not text:
    return None
  if "=" not in text:
    raise GalleryError(f"--image-root {text!r}: use OLD=NEW (the recorded folder = where it is "
                       "now)")
  old, new = text.split("=", 1)
  return old, new


def main(argv: Sequence[str] | None = None) -> int:
  from iqa_jax.defaults import OneLineParser  # a flag mistake is one line, as in score
  ap = OneLineParser(prog="python -m iqa_jax.report gallery", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="run folder made by iqa_jax.train")
  src.add_argument("--scores", help="CSV made by iqa_jax.score")
  ap.add_argument("--out", required=True, help="the HTML file to write")
  ap.add_argument("--top", type=int, default=12, help="largest errors (run) or top and bottom "
                  "scores (CSV) shown as thumbnails")
  ap.add_argument("--sample", type=int, default=48, help="CSV: thumbnails evenly spaced by rank "
                  "between the top and bottom N")
  ap.add_argument("--thumb", type=int, default=128, help="thumbnail size in pixels")
  ap.add_argument("--gradcam", action="store_true", help="run: Grad-CAM overlays of the score")
  ap.add_argument("--image-root", default=None, help="OLD=NEW: images recorded under OLD are "
                  "read from NEW (a moved image folder)")
  a = ap.parse_args(argv)
  try:
    if a.top < 1 or a.sample < 0 or a.thumb < 8:
      raise GalleryError("--top must be >= 1, --sample >= 0 and --thumb >= 8")
    if a.gradcam and a.scores:
      raise GalleryError("--gradcam needs --workdir (a score CSV holds no model to explain)")
    root = _image_root(a.image_root)
    if a.workdir:
      text, summary = run_page(a.workdir, a.top, a.gradcam, a.thumb, root)
    else:
      text, summary = scores_page(a.scores, a.top, a.sample, a.thumb, root)
    path = write_page(text, a.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if summary["missing"]:
    print(f"warning: {summary['missing']} of {summary['shown']} images could not be read (the "
          "page says which); if their folder moved, pass --image-root OLD=NEW", file=sys.stderr)
  if summary.get("failed"):
    print(f"note: {summary['failed']} failed rows are listed on the page", file=sys.stderr)
  print(f"gallery: {path} ({summary['shown']} thumbnails of {summary['images']} images, "
        f"{path.stat().st_size / 1e6:.1f} MB)")
  return 0
