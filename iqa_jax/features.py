"""A feature cache: run a backbone once, then train heads on its features in seconds.

  python -m iqa_jax.features --config configs/demo.py --out FEATS [--workdir RUN] [--taps encoded]
  python -m iqa_jax.train --config configs/demo.py --config.model.finetune=frozen \
      --config.data.features=FEATS --workdir runs/frozen_from_cache

A frozen backbone computes the same feature for an image in every epoch, so a frozen run spends
almost all its time recomputing it. The cache stores one float32 row per record: FEATS/
features.npy (N, d) and index.json (the image paths in row order, the backbone's fingerprint).
The model is then the head alone (`FeatureHeadModel`): training holds the rows on the devices,
one jitted scan per epoch (train.epochs_in_memory); pmap and multi-process runs read the cache
through the pipeline, which takes it as a prepare cache of the same layout. With --workdir the
backbone is a trained run's (LoRA-adapted or fully fine-tuned). Taps (--taps NAME,...) store more
of the backbone's intermediates, token- or space-averaged to one vector per image, in
taps/NAME.npy.
Writes are resumable: a killed extraction continues after its last flushed batch.
A run trained on a cache records in RUN/features.json which backbone made the features, so
`score`, `evaluate` and `export` put that backbone back under its head
(runs/backbone.py: `scoring_backbone`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from iqa_jax import cli
from iqa_jax.defaults import parse_absl_flags
from iqa_jax.training import features


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()  # private flags: main() can run twice in one process (tests)
  flags.DEFINE_string("out", None, "Folder of the feature cache.", flag_values=fv)
  flags.DEFINE_string("workdir", None, "A trained run whose backbone (LoRA / full) to use.",
                      flag_values=fv)
  flags.DEFINE_list("taps", [], "Backbone intermediates to store too, e.g. encoded,layer_20.",
                    flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=fv)
  flags.DEFINE_alias("batch-size", "batch_size", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Config file (its model and data), e.g. "
                                  "configs/demo.py; --config.FIELD=VALUE overrides a field.",
                                  flag_values=fv, lock_config=False, sys_argv=argv)
  code = parse_absl_flags(fv, argv, __doc__)
  if code is not None:
    return code
  try:
    if fv.config is None or not fv.out:
      raise ValueError("pass --config configs/<file>.py and --out FOLDER")
    features.extract_features(fv.config, fv.out, workdir=fv.workdir, taps=fv.taps,
                              batch_size=fv.batch_size, progress=fv.config.get("progress", True))
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.run(main, "the batches written so far are kept; the same command continues after "
               "them")
