"""`python -m iqa_jax.export`: export a run as one self-contained folder.

A thin entry point: the flags are parsed here, the work is done in iqa_jax.inference.exported."""
from __future__ import annotations

import argparse
import sys

from iqa_jax import cli
from iqa_jax.defaults import OneLineParser
from iqa_jax.inference import exported
from iqa_jax.inference.exported import export_run


def main(argv=None) -> int:
  ap = OneLineParser(prog="python -m iqa_jax.export", description=exported.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="run folder made by iqa_jax.train")
  ap.add_argument("--out", required=True,
                  help="folder to write (new, empty, or an earlier export, which is replaced)")
  ap.add_argument("--which", default="best", choices=("best", "last"),
                  help="the run's checkpoint to export: best (validation SRCC) or last")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="backbone weights' dtype (head, gates stay float32)")
  ap.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                  help="fold each LoRA update into its base weight (default on)")
  a = ap.parse_args(argv)
  try:
    out = export_run(a.workdir, a.out, which=a.which, dtype=a.dtype, merge=a.merge_lora)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported {a.workdir} ({a.which}) -> {out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
