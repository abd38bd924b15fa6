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

from iqa_jax.training import features


def main(argv: Sequence[str] | None = None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("out", None, "Folder of the feature cache.")
  flags.DEFINE_string("workdir", None, "A trained run whose backbone (LoRA / full) to use.")
  flags.DEFINE_list("taps", [], "Backbone intermediates to store too, e.g. encoded,layer_20.")
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
  config_flags.DEFINE_config_file("config", None, "Config file (its model and data).",
                                  lock_config=False)

  def _main(_):
    f = flags.FLAGS
    if f.config is None or not f.out:
      print("error: pass --config configs/<file>.py and --out FOLDER", file=sys.stderr)
      sys.exit(2)
    try:
      features.extract_features(f.config, f.out, workdir=f.workdir, taps=f.taps,
                                batch_size=f.batch_size, progress=f.config.get("progress", True))
    except (FileNotFoundError, ValueError, KeyError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv)
  return 0


if __name__ == "__main__":
  main()
