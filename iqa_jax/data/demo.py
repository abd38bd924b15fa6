"""An embedded KADID-style demo set built from the photographs shipped inside scikit-image.

Each reference photo gives its 40 most textured 64 px tiles (four zooms); each crop is degraded
by four distortion types at five graded levels and saved in KADID-10k's layout
(`images/I01_02_03_c1.png` = photo 1, distortion 2, level 3, crop 1; `dmos.csv` with dist_img,
ref_img, dmos, var). ref_img names the photo, so a content split keeps all crops of a photo on
one side.
Label: level 1 (mildest) .. 5 (strongest) -> dmos = 6 - level, i.e. 5, 4, 3, 2, 1 on KADID's
1-5 scale; the adapter then normalises like KADID (App. B: (dmos - 1) / 4), so mos is
1.0, 0.75, 0.5, 0.25, 0.0. Same level, same label, whatever the distortion type.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from iqa_jax.data import datasets
from iqa_jax.data.records import Record

# Real photographs in skimage/data (no download). Grayscale ones exercise the L -> RGB path.
# Photos where the distortions show; near-black or flat ones (hubble, moon, cell) are left out.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "ihc",
          "motorcycle_left", "motorcycle_right", "page", "retina", "rocket")
FILES = {"astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png",
         "cell": "cell.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
         "coins": "coins.png", "grass": "grass.png", "gravel": "gravel.png",
         "hubble_deep_field": "hubble_deep_field.jpg", "ihc": "ihc.png",
         "microaneurysms": "microaneurysms.png", "moon": "moon.png",
         "motorcycle_left": "motorcycle_left.png", "page": "page.png", "retina": "retina.jpg",
         "rocket": "rocket.jpg", "text": "text.png", "motorcycle_right": "motorcycle_right.png"}
LEVELS = 5


def _blur(img: Image.Image, level: int) -> Image.Image:
  return img.filter(ImageFilter.GaussianBlur(radius=(0.6, 1.2, 2.0, 3.0, 4.5)[level - 1]))


def _noise(img: Image.Image, level: int, seed: int) -> Image.Image:
  sigma = (6, 14, 26, 42, 64)[level - 1]
  a = np.asarray(img, np.float32)
  a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
  return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _jpeg(img: Image.Image, level: int) -> Image.Image:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=(40, 20, 10, 5, 2)[level - 1])
  return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _pixelate(img: Image.Image, level: int) -> Image.Image:
  f = (1.5, 2.5, 4, 6, 9)[level - 1]
  small = img.resize((max(1, round(img.width / f)), max(1, round(img.height / f))), Image.BOX)
  return small.resize(img.size, Image.NEAREST)


DISTORTIONS = {1: ("gaussian_blur", _blur), 2: ("white_noise", _noise), 3: ("jpeg", _jpeg),
               4: ("pixelate", _pixelate)}


def _texture(tile: Image.Image) -> float:
  g = np.asarray(tile.convert("L"), np.float32)
  return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def _crops(name: str, size: int, keep: int = 40) -> list[Image.Image]:
  """The `keep` most textured size x size tiles of the photo seen at four zooms.

  Many tiles at several zooms stop a model from memorising each clean tile (it must learn what
  a distortion looks like instead), and blur, JPEG and pixelation are invisible on flat tiles
  (sky, black background), where a label taken from the level would be wrong.
  """
  import skimage
  photo = Image.open(Path(skimage.__file__).parent / "data" / FILES[name]).convert("RGB")
  tiles = []
  for n in (2, 4, 6, 8):  # short side = n tiles
    scale = n * size / min(photo.size)
    img = photo.resize((max(n * size, round(photo.width * scale)),
                        max(n * size, round(photo.height * scale))), Image.BICUBIC)
    left, top = (img.width - n * size) // 2, (img.height - n * size) // 2
    tiles += [img.crop((left + x, top + y, left + x + size, top + y + size))
              for y in range(0, n * size, size) for x in range(0, n * size, size)]
  order = sorted(range(len(tiles)), key=lambda i: -_texture(tiles[i]))[:keep]
  return [tiles[i] for i in sorted(order)]


def build_demo(out_dir: str, size: int = 64, photos=PHOTOS, tiles: int = 40) -> Path:
  """Writes the set once (idempotent) and returns the folder."""
  out = Path(out_dir)
  table = out / "dmos.csv"
  if table.exists():
    return out
  (out / "images").mkdir(parents=True, exist_ok=True)
  rows = []
  for r, name in enumerate(photos, start=1):
    ref_name = f"I{r:02d}.png"
    for c, crop in enumerate(_crops(name, size, tiles), start=1):
      crop.save(out / "images" / f"I{r:02d}_c{c:02d}.png")
      for d, (_, fn) in DISTORTIONS.items():
        for level in range(1, LEVELS + 1):
          seed = r * 1000 + c * 100 + d * 10 + level
          img = fn(crop, level, seed=seed) if fn is _noise else fn(crop, level)
          dist_name = f"I{r:02d}_{d:02d}_{level:02d}_c{c:02d}.png"
          img.save(out / "images" / dist_name)
          rows.append((dist_name, ref_name, float(6 - level), 0.0))
  tmp = table.with_suffix(".tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["dist_img", "ref_img", "dmos", "var"])
    w.writerows(rows)
  os.replace(tmp, table)  # the table appears last, so a killed build is rebuilt
  return out


def load(data_dir: str, distortions: str = "", **_) -> list[Record]:
  """Records of the demo set; `distortions='gaussian_blur,jpeg'` keeps a subset of types."""
  folder = build_demo(data_dir)
  keep = {d.strip() for d in distortions.split(",") if d.strip()}
  names = {f"{d:02d}": n for d, (n, _) in DISTORTIONS.items()}
  records = []
  for row, v in datasets.read_csv(folder / "dmos.csv", ("dist_img", "ref_img", "dmos"), "demo"):
    parts = v["dist_img"].split("_")  # I01_02_03_c01.png: photo, distortion, level, crop
    dist = names.get(parts[1]) if len(parts) == 4 else None
    if dist is None:
      raise ValueError(f"demo: {folder / 'dmos.csv'}, {row}: dist_img {v['dist_img']!r} is not "
                       f"a demo image name (I<photo>_<distortion 01-04>_<level>_c<crop>.png); "
                       f"delete {folder} to rebuild the demo set.")
    if keep and dist not in keep:
      continue
    records.append(datasets.make_record("demo", (folder / "images" / v["dist_img"]).resolve(),
                                        v["dmos"], row, ref_img=v["ref_img"], distortion=dist))
  return records
