"""The paper's full shape on a CPU (issue 9, A3): SigLIP2-SO400M/16@512 through train and score.

python scripts/so400m_cpu.py [--root DIR] [--images 15] [--keep]

1. saves a randomly initialised transformers.SiglipVisionModel with the released
   SO400M/16@512 configuration (27 layers, width 1152, MLP 4304, 16 heads, patch 16, 512 px)
   with save_pretrained, as a local checkpoint folder;
2. writes a handful of synthetic 512 px JPEGs and labels.csv (the `csv` dataset layout);
3. runs the UNCHANGED configs/siglip2_gated.py (LoRA r4 on q/k, gated head, bf16, remat,
   batch 12 = 2 x 6) for one epoch with `python -m iqa_jax.train` (overrides: data, init,
   epochs only), then `python -m iqa_jax.score` on the images;
4. prints each stage's wall time and peak RSS.

Not a test: it needs several GB of RAM and tens of minutes on two cores (README).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def save_checkpoint(folder: Path) -> None:
  """A random SO400M/16@512 vision tower + its preprocessor, as save_pretrained writes them."""
  import torch
  import transformers

  from iqa_jax.models.siglip import VARIANTS  # the release's vision_config, in HF's names
  arch = dataclasses.asdict(VARIANTS["so400m/16@512"])
  assert (arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"],
          arch["num_attention_heads"], arch["patch_size"], arch["image_size"]) == (
              27, 1152, 4304, 16, 16, 512), arch
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**arch))
  model.save_pretrained(folder)
  # The release's preprocessor_config.json: 512x512, bilinear (resample=2), mean = std = 0.5.
  transformers.SiglipImageProcessor(size={"height": 512, "width": 512}, resample=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
                                        folder)
  n = sum(p.numel() for p in model.parameters())
  print(f"checkpoint: {n / 1e6:.1f}M parameters -> {folder}", flush=True)


def write_images(folder: Path, n: int) -> None:
  """n smooth random 512 px JPEGs (photo-like, so JPEG sizes are realistic) + labels.csv."""
  from PIL import Image
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  rows = ["path,mos"]
  for i in range(n):
    coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((512, 512), Image.BICUBIC)
    img.save(folder / f"img_{i:03d}.jpg", quality=90)
    rows.append(f"img_{i:03d}.jpg,{rng.uniform():.4f}")
  (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def timed(cmd: list[str], stage: str, results: list) -> None:
  """Runs cmd as a child, streaming its output; records its wall time and peak RSS."""
  print(f"\n$ {' '.join(cmd)}", flush=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  child = subprocess.Popen(cmd, cwd=ROOT, env=env)
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - t0
  code = os.waitstatus_to_exitcode(status)
  results.append((stage, wall, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime))
  if code != 0:
    raise SystemExit(f"{stage} failed with exit status {code}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
  ap.add_argument("--images", type=int, default=15,
                  help="synthetic images; 15 -> 12 train (one step of batch 12) + 3 val")
  ap.add_argument("--keep", action="store_true", help="keep the work folder")
  a = ap.parse_args(argv)
  root = Path(a.root or tempfile.mkdtemp(prefix="so400m_cpu_"))
  root.mkdir(parents=True, exist_ok=True)
  ckpt, data, run = root / "siglip_so400m_512", root / "images", root / "run"
  results: list = []
  t_all = time.perf_counter()
  try:
    t0 = time.perf_counter()
    save_checkpoint(ckpt)
    write_images(data, a.images)
    import resource
    results.append(("save checkpoint + images", time.perf_counter() - t0,
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None))
    py = sys.executable
    timed([py, "-m", "iqa_jax.train", "--config", "configs/siglip2_gated.py",
           f"--config.model.init={ckpt}", "--config.data.name=csv", f"--config.data.dir={data}",
           "--config.optim.epochs=1", f"--workdir={run}"], "train (1 epoch)", results)
    timed([py, "-m", "iqa_jax.score", "--workdir", str(run), "--out", str(root / "scores.csv"),
           "--no-progress", str(data)], "score", results)
  finally:
    print("\n| stage | wall | peak RSS | CPU time |\n|---|---|---|---|")
    for stage, wall, rss, cpu in results:
      print(f"| {stage} | {wall:.0f} s | {rss:.2f} GiB | "
            + ("" if cpu is None else f"{cpu:.0f} s") + " |")
    print(f"total wall {time.perf_counter() - t_all:.0f} s on {os.cpu_count()} CPUs; "
          f"work folder {root}" + ("" if a.keep or a.root else " (removed)"), flush=True)
    if not (a.keep or a.root):
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
