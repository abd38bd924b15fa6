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
from collections.abc import Sequence

from iqa_jax import cli
from iqa_jax.defaults import parse_absl_flags
from iqa_jax.training import loop


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()  # private flags: main() can run twice in one process (tests)
  flags.DEFINE_string("workdir", None, "Run folder (default: checkpoints/<config name>).",
                      flag_values=fv)
  flags.DEFINE_bool("restart", False, "Clear the run folder's run files and train from scratch "
                    "(a rerun otherwise resumes, and only with the recorded config).",
                    flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip2_gated.py:"
                                  "head=gated; --config.FIELD=VALUE overrides a field.",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  code = parse_absl_flags(fv, argv, __doc__)
  if code is not None:
    return code
  try:
    if fv.config is None:
      raise ValueError("pass --config configs/siglip2_gated.py (or another file in configs/).")
    workdir = fv.workdir or os.path.join("checkpoints", fv.config.name)
    results = loop.train_and_evaluate(fv.config, workdir, restart=fv.restart)
  except (FileNotFoundError, ValueError, loop.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  loop.print_results_table(results)
  print(f"run folder: {workdir}")
  return 0 if results["status"] == "done" else 1


if __name__ == "__main__":
  cli.run(main, "the run folder keeps every finished epoch; the same command resumes "
               "after the last one")
