"""Wall time of the paper's 30-epoch head recipe on a KonIQ-sized feature cache.

  python scripts/bench_feature_head.py [--n 10073] [--dim 1152] [--epochs 30] [--loop-epochs 2]

Writes a synthetic cache (N random float32 rows of SO400M's width, each carrying its MOS along
one direction so the head has something to learn) and a CSV of fake paths and MOS, then runs
`train.train_and_evaluate` with configs/siglip2_gated.py (gated head, batch 12 = 6 x 2, Adam,
step decay at 15 and 25, 80/20 split, checkpoints and validation every epoch) and
finetune=frozen on it: the whole recipe, start to results.json. --loop-epochs K also times K
epochs of the per-batch loop over the same cache (one jitted step per batch via grain), the
path pmap and multi-process runs take.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def gated_config(data_dir: Path, feats: Path, epochs: int):
  from iqa_jax.defaults import load_config_file
  c = load_config_file(Path(__file__).resolve().parent.parent / "configs" / "siglip2_gated.py")
  c.model.finetune = "frozen"
  c.data.update(name="csv", dir=str(data_dir), features=str(feats))
  c.optim.epochs = epochs
  c.progress = False
  return c


def synthetic_cache(root: Path, n: int, dim: int, epochs: int):
  """labels.csv and a feature cache of n rows whose fingerprint is the gated config's."""
  from iqa_jax.training import features
  rng = np.random.default_rng(0)
  mos = rng.uniform(0, 1, n)
  paths = [str(root / "images" / f"{i:05d}.jpg") for i in range(n)]
  (root / "labels.csv").write_text(
      "path,mos\n" + "".join(f"images/{i:05d}.jpg,{m:.6f}\n" for i, m in enumerate(mos)))
  direction = rng.normal(size=dim) / np.sqrt(dim)
  rows = (rng.normal(size=(n, dim)) + 4 * (mos[:, None] - 0.5) * direction).astype(np.float32)
  feats = root / "feats"
  feats.mkdir()
  np.save(feats / features.FEATURES, rows)
  config = gated_config(root, feats, epochs)
  (feats / features.INDEX).write_text(json.dumps({
      "kind": "features", "array": features.FEATURES, "fingerprint": features.fingerprint(config),
      "pp": "", "taps": [], "paths": paths, "mos": mos.tolist(), "dataset": "csv", "dim": dim}))
  return config


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=10073, help="images (KonIQ-10k: 10,073)")
  ap.add_argument("--dim", type=int, default=1152, help="feature width (SO400M: 1152)")
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--loop-epochs", type=int, default=0,
                  help="also time this many epochs of the per-batch loop")
  a = ap.parse_args()
  import jax

  from iqa_jax.runs import checkpoint
  from iqa_jax.training import loop as train
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    config = synthetic_cache(root, a.n, a.dim, a.epochs)
    t0 = time.perf_counter()
    results = train.train_and_evaluate(config, str(root / "scan"))
    wall = time.perf_counter() - t0
    hist = checkpoint.read_history(root / "scan")
    steady = [h["train_img_per_s"] for h in hist[1:]]
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
    print(f"{a.n} x {a.dim} cache, gated head, {a.epochs} epochs of "
          f"{results['n_train']} images, batch {config.optim.batch_size} "
          f"({config.optim.grad_accum} x {config.optim.batch_size // config.optim.grad_accum})")
    print(f"scanned epochs: whole run {wall:.1f} s (start to results.json); epoch 1 "
          f"{hist[0]['time_s']:.1f} s with compilation; later epochs "
          f"{np.mean([h['time_s'] for h in hist[1:]]):.2f} s each, train "
          f"{np.median(steady):.0f} img/s (median); best val SRCC {results['best']['srcc']:.4f}")
    if a.loop_epochs:
      loop_config = gated_config(root, root / "feats", a.loop_epochs)
      train.in_memory = lambda config: False  # the per-batch loop over the same cache
      t0 = time.perf_counter()
      train.train_and_evaluate(loop_config, str(root / "loop"))
      loop_wall = time.perf_counter() - t0
      loop = checkpoint.read_history(root / "loop")
      per_epoch = np.mean([h["time_s"] for h in loop[1:]] or [loop[0]["time_s"]])
      print(f"per-batch loop: {a.loop_epochs} epochs in {loop_wall:.1f} s; {per_epoch:.1f} s "
            f"per epoch ({np.median([h['train_img_per_s'] for h in loop]):.0f} img/s), "
            f"~{per_epoch * a.epochs:.0f} s for {a.epochs} epochs")
  print(f"peak host memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
        f"MiB")


if __name__ == "__main__":
  main()
