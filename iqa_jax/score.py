"""`python -m iqa_jax.score`: score images into a CSV.

A thin entry point: the flags are parsed here, the work is done in iqa_jax.inference.score_csv."""
from __future__ import annotations

import argparse
import contextlib
import sys

from iqa_jax import cli, parallel, xla_cpu
from iqa_jax.defaults import OneLineParser
from iqa_jax.inference import score_csv
from iqa_jax.inference.score_csv import (
  VIEWS,
  UsageError,
  check_arguments,
  expand_inputs,
  merge_parts,
  parse_shard,
  score_paths,
)


def _merge_main(argv) -> int:
  ap = OneLineParser(prog="python -m iqa_jax.score merge",
                     description="Join the CSVs of `score --shard K/N` runs.")
  ap.add_argument("out", help="merged CSV to write: a new path or a CSV score wrote")
  ap.add_argument("parts", nargs="+", help="the N part CSVs")
  a = ap.parse_args(argv)
  try:
    n = merge_parts(a.out, a.parts)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"merged {len(a.parts)} parts, {n} rows -> {a.out}")
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["merge"]:
    return _merge_main(argv[1:])
  ap = OneLineParser(prog="python -m iqa_jax.score", description=score_csv.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("images", nargs="+", help="files, folders, globs or @list.txt")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="run folder made by iqa_jax.train")
  src.add_argument("--model", help="model folder made by iqa_jax.export")
  ap.add_argument("--out", default="scores.csv",
                  help="CSV to write: a new path or a CSV score wrote (default scores.csv)")
  ap.add_argument("--which", default=None, choices=("best", "last"),
                  help="a run folder's checkpoint (default best); refused for an exported model")
  ap.add_argument("--batch-size", type=int, default=32,
                  help="images per forward pass (each batch is padded to it: one compile)")
  ap.add_argument("--workers", type=int, default=4, help="decoding threads")
  ap.add_argument("--view", default=None, choices=VIEWS,
                  help="test-time view (default: the one the model records)")
  ap.add_argument("--crops", type=int, default=None, help="crops per image for --view crops")
  ap.add_argument("--shard", default=None, help="K/N: score every N-th input from the K-th")
  ap.add_argument("--resume", action="store_true",
                  help="keep scored rows of --out; score the rest, a cut last line and errors")
  ap.add_argument("--fail-on-error", action=argparse.BooleanOptionalAction, default=True,
                  help="exit 1 when any input could not be scored (default on)")
  ap.add_argument("--no-progress", action="store_true",
                  help="no progress bar (img/s, ETA) on stderr")
  ap.add_argument("--compilation-cache", default="", metavar="DIR",
                  help="persistent XLA compilation cache: a rerun skips compiling")
  a = ap.parse_args(argv)
  try:
    check_arguments(a.out, a.batch_size, a.workers, a.crops, a.view)
    shard = parse_shard(a.shard) if a.shard is not None else None
    paths = expand_inputs(a.images)
    if not paths:
      raise UsageError(f"no images found in {' '.join(a.images)}")
    cache = (parallel.persistent_compile_cache(a.compilation_cache) if a.compilation_cache
             else contextlib.nullcontext())  # else $JAX_COMPILATION_CACHE_DIR, if set, holds
    with cache:
      summary = score_paths(a.model or a.workdir, paths, a.out, batch_size=a.batch_size,
                            which=a.which, resume=a.resume, workers=a.workers,
                            progress=not a.no_progress, view=a.view, crops=a.crops, shard=shard)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.compilation_cache and (note := xla_cpu.cache_note(summary["cpu_dots"])):
    print(note, file=sys.stderr)
  print(f"scored {summary['scored']}, failed {summary['failed']}"
        + (f", kept {summary['kept']}, rescored {summary['rescored']}" if a.resume else "")
        + f" -> {a.out}")
  if summary["failed"]:
    print(f"{summary['failed']} input(s) could not be scored; see the 'error' column of {a.out}"
          f"; fix or remove those files, then the same command with --resume scores only them",
          file=sys.stderr)
    return 1 if a.fail_on_error else 0
  return 0


if __name__ == "__main__":
  cli.run(main, "the rows scored so far are in --out; the same command with --resume keeps "
               "them and scores the rest (without --resume they are replaced)")
