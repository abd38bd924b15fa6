"""`python -m iqa_jax.explain`: Grad-CAM and t-SNE of runs.

A thin entry point: the flags are parsed here, the work is done in iqa_jax.analysis.explain."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from iqa_jax import cli
from iqa_jax.analysis import explain
from iqa_jax.analysis.explain import (
    MIN_PER_SPLIT,
    band_target,
    gradcam_images,
    over_training_figure,
    tsne_figure,
)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.explain", description=explain.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  g = sub.add_parser("gradcam", help="Grad-CAM overlays of images for a run")
  g.add_argument("--workdir", required=True, help="run folder made by iqa_jax.train")
  g.add_argument("--out", required=True, help="folder for the PNGs")
  g.add_argument("--groups", default="", help="feature bands, e.g. top10,top50,10-30")
  g.add_argument("--which", default="best", choices=("best", "last"),
                 help="checkpoint: best validation epoch or the last one")
  g.add_argument("--over-training", action="store_true",
                 help="one row per epoch kept by --config.keep_epoch_checkpoints (Figure S6)")
  g.add_argument("--epochs", default="", help="with --over-training: the 1-based epochs to "
                 "draw, e.g. 1,4,12 (default: every kept epoch)")
  g.add_argument("images", nargs="+", help="files, folders, globs or @list.txt")
  t = sub.add_parser("tsne", help="t-SNE of encoder feature and head layers, with silhouettes")
  t.add_argument("--workdir", required=True, help="RUN or RUN1,RUN2,...")
  t.add_argument("--out", required=True, help="folder for tsne.png and tsne_silhouette.csv")
  t.add_argument("--per-split", type=int, default=400,
                 help=f"images drawn per split (at least {MIN_PER_SPLIT})")
  t.add_argument("--seed", type=int, default=0, help="t-SNE and sampling seed")
  a = ap.parse_args(argv)
  try:
    if Path(a.out).exists() and not Path(a.out).is_dir():
      raise ValueError(f"--out {a.out} is a file; {a.command} writes its PNG and CSV into a "
                       f"folder: pass a new or existing folder")
    if a.command == "tsne" and a.per_split < MIN_PER_SPLIT:
      raise ValueError(f"--per-split {a.per_split}: t-SNE and the silhouette score need at least "
                       f"{MIN_PER_SPLIT} images per split (default 400)")
    if a.command == "gradcam":
      from iqa_jax.inference.score_csv import expand_inputs
      groups = [x for x in a.groups.split(",") if x]
      for grp in groups:
        band_target(grp)  # a bad band stops here, before any work
      paths = expand_inputs(a.images)
      missing = [p for p in paths if not Path(p).is_file()]
      if missing or not paths:
        raise FileNotFoundError(f"image not found: {missing[0] if missing else a.images[0]}")
      if a.over_training:
        if groups:
          raise ValueError("--over-training maps the score only; drop --groups")
        try:
          epochs = [int(e) for e in a.epochs.split(",") if e]
        except ValueError:
          raise ValueError(f"--epochs {a.epochs!r}: use 1-based epoch numbers, e.g. 1,4,12"
                           ) from None
        png, rows = over_training_figure(a.workdir, paths, a.out, epochs)
        print("| epoch | " + " | ".join(Path(p).name for p in paths) + " |\n|---|"
              + "---|" * len(paths))
        for row in rows:
          print(f"| {row['epoch']} | " + " | ".join(f"{v:.4f}" for v in row["scores"]) + " |")
        print(f"png: {png}")
      else:
        for p in gradcam_images(a.workdir, paths, a.out, groups, a.which):
          print(f"png: {p}")
    else:
      png, rows = tsne_figure(a.workdir.split(","), a.out, a.per_split, a.seed)
      print("| run | split | stage | n | silhouette |\n|---|---|---|---|---|")
      for r in rows:
        print(f"| {r['run']} | {r['split']} | {r['stage']} | {r['n']} | {r['silhouette']} |")
      print(f"png: {png}")
      (Path(a.out) / "tsne_silhouette.json").write_text(json.dumps(rows, indent=1))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.run(main)
