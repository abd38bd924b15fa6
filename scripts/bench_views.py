"""Does a model rank graded distortions of full-size photos? resize vs crops, as a user would try.

  python scripts/bench_views.py --model checkpoints/demo/model [--photos rocket,coins] [--crops 3]

Writes each photo (full size, several hundred pixels wide) clean and with blur, noise and JPEG
at three levels the demo set never uses, scores them with the test-time views `resize` and
`crops`, and prints the mean within-photo SRCC between the scores and the true order of the
levels (clean best), per view. --model is an exported folder or a run folder.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# Levels unlike the demo set's (blur 0.6-4.5, noise 6-64, JPEG q 40-2), clean first.
LEVELS = {
    "blur": lambda img, i: img.filter(ImageFilter.GaussianBlur((0, 1.0, 2.4, 3.6)[i])),
    "noise": lambda img, i: _noise(img, (0, 10, 24, 48)[i]),
    "jpeg": lambda img, i: _jpeg(img, (None, 30, 12, 4)[i]),
}


def _noise(img: Image.Image, sigma: float) -> Image.Image:
  a = np.asarray(img, np.float32)
  a = a + np.random.default_rng(int(sigma)).normal(0, sigma, a.shape)
  return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _jpeg(img: Image.Image, quality: int | None) -> Image.Image:
  if quality is None:
    return img
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def graded_photos(folder: Path, photos: list[str]) -> list[tuple[str, str, str, int]]:
  """-> (path, photo, distortion, level) for every photo x distortion x level 0..3 (0: clean)."""
  import skimage

  from iqa_jax.data.demo import FILES
  rows = []
  for name in photos:
    img = Image.open(Path(skimage.__file__).parent / "data" / FILES[name]).convert("RGB")
    for dist, fn in LEVELS.items():
      for level in range(4):
        path = folder / f"{name}_{dist}_{level}.png"
        fn(img, level).save(path)
        rows.append((str(path), name, dist, level))
  return rows


def mean_within_photo_srcc(rows, scores) -> float:
  """Mean over (photo, distortion) of SRCC(score, -level): 1 = every level ranked right."""
  from scipy import stats
  groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
  for (_, photo, dist, level), s in zip(rows, scores, strict=True):
    groups.setdefault((photo, dist), []).append((level, s))
  return float(np.mean([stats.spearmanr([-lv for lv, _ in g], [s for _, s in g])[0]
                        for g in groups.values()]))


def main() -> None:
  from iqa_jax.inference.scorer import Scorer, load_model
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True)
  ap.add_argument("--photos", default="rocket,coins,motorcycle_left,brick")
  ap.add_argument("--crops", type=int, default=3)
  a = ap.parse_args()
  loaded = load_model(a.model)
  with tempfile.TemporaryDirectory() as tmp:
    rows = graded_photos(Path(tmp), a.photos.split(","))
    paths = [r[0] for r in rows]
    for view in ("resize", "crops"):
      scores = Scorer(loaded, view=view, crops=a.crops)(paths)
      print(f"{view:6s} mean within-photo SRCC {mean_within_photo_srcc(rows, scores):+.3f} "
            f"({len(rows) // 4} photo x distortion groups of 4 levels, model input "
            f"{loaded.input_size} px)")


if __name__ == "__main__":
  main()
