"""Train a quality model: python -m iqa_jax.train --config configs/siglip2_gated.py --workdir DIR

Per epoch: train with a progress bar (img/s, ETA), evaluate SRCC/PLCC on the validation split,
save `ckpt/last` and, when validation SRCC improves, `ckpt/best`. Rerunning on the same workdir
resumes after the last finished epoch, and only with the config the folder records
(iqa_jax/runs/folder.py); --restart starts it over.

Batches come from the grain pipeline, one jitted step each (`epochs_from_loader`). A run on a
feature cache (data.features: the head alone) holds the cache's rows on the devices and runs
each epoch as one jitted scan of the same step over the same batches (`epochs_in_memory`).
"""
from __future__ import annotations

import os
import sys

from iqa_jax.defaults import flag_error
from iqa_jax.training import loop


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Run folder (default: checkpoints/<config name>).")
  flags.DEFINE_bool("restart", False, "Clear the run folder's run files and train from scratch "
                    "(a rerun otherwise resumes, and only with the recorded config).")
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip2_gated.py.",
                                  lock_config=True)

  def _main(_):
    config = flags.FLAGS.config
    if config is None:
      raise app.UsageError("Pass --config configs/siglip2_gated.py (or another file in configs/).")
    workdir = flags.FLAGS.workdir or os.path.join("checkpoints", config.name)
    try:
      results = loop.train_and_evaluate(config, workdir, restart=flags.FLAGS.restart)
    except (FileNotFoundError, ValueError, loop.NonFiniteLossError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    loop.print_results_table(results)
    print(f"run folder: {workdir}")
    if results["status"] != "done":
      sys.exit(1)

  def _parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:  # a bad --config argument or field: one line, exit 2
      print(f"error: {flag_error(e)}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv, flags_parser=_parse)
  return 0


if __name__ == "__main__":
  main()
