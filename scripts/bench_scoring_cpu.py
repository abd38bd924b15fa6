"""The whole scoring path on a CPU, side by side: JPEG decode + preprocessing + forward.

  python scripts/bench_scoring_cpu.py [--width 768 --layers 12 --heads 12 --mlp 3072 --size 224]
                                      [--images 96 --batch 16 --workers 4]

Writes --images JPEGs (the scikit-image photos, 300-640 px wide, cycled), builds one random
SigLIP tower of the given shape in PyTorch (HF SiglipVisionModel, saved with save_pretrained) and
loads the same weights into iqa_jax (config.model.init = that folder), then times, in one call:
- iqa_jax: `Scorer` on the JPEG paths (its decode + pp string + jitted forward with the gated
  head, batches padded to --batch, the next batch decoded while one runs);
- PyTorch: PIL decode + the HF SiglipImageProcessor + SiglipVisionModel's pooled output under
  torch.no_grad() (no head: that only flatters the PyTorch side), batches of --batch.
Each side runs once to warm up (compiles, allocator) and is then timed over all images. It
prints img/s of both and the ratio; the first batch's features are compared, as a check that
the two towers see the same pixels (cosine similarity of the pooled features).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpegs(folder: Path, n: int) -> list[str]:
  import skimage

  from iqa_jax.data.demo import FILES
  photos = [Image.open(Path(skimage.__file__).parent / "data" / f).convert("RGB")
            for f in FILES.values()]
  paths = []
  for i in range(n):
    path = folder / f"img{i:04d}.jpg"
    photos[i % len(photos)].save(path, quality=90)
    paths.append(str(path))
  return paths


def torch_side(folder: str, paths: list[str], batch: int) -> tuple[float, np.ndarray]:
  import torch
  from transformers import SiglipImageProcessor, SiglipVisionModel
  model = SiglipVisionModel.from_pretrained(folder).eval()
  processor = SiglipImageProcessor.from_pretrained(folder)

  def run(items):
    out = []
    with torch.no_grad():
      for s in range(0, len(items), batch):
        images = [Image.open(p).convert("RGB") for p in items[s:s + batch]]
        x = processor(images=images, return_tensors="pt")["pixel_values"]
        out.append(model(pixel_values=x).pooler_output.numpy())
    return np.concatenate(out)

  run(paths[:batch])  # warm-up
  t0 = time.perf_counter()
  feats = run(paths)
  return len(paths) / (time.perf_counter() - t0), feats[:batch]


def jax_side(folder: str, size: int, paths: list[str], batch: int, workers: int
             ) -> tuple[float, np.ndarray]:
  from iqa_jax.data import pp
  from iqa_jax.defaults import base_config
  from iqa_jax.inference.loaded import LoadedModel
  from iqa_jax.inference.scorer import Scorer
  from iqa_jax.models.model import create_model
  config = base_config()
  config.model.init = folder
  config.model.dtype = "float32"
  config.model.remat = "none"
  config.data.image_size = size
  model, params, preprocessing = create_model(config)
  loaded = LoadedModel(model=model, params=params, pp_str=pp.run_pp(config.data, preprocessing),
                       input_size=size)
  scorer = Scorer(loaded, batch_size=batch)
  scorer(paths[:batch], workers=workers)  # warm-up: the compile
  t0 = time.perf_counter()
  scorer(paths, workers=workers)
  ips = len(paths) / (time.perf_counter() - t0)
  x = np.stack([scorer.views(p)[0] for p in paths[:batch]])
  _, out = model.apply({"params": params}, x)
  return ips, np.asarray(out["feature"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in dict(width=768, layers=12, heads=12, mlp=3072, size=224, patch=16, images=96,
                   batch=16, workers=4).items():
    ap.add_argument(f"--{k}", type=int, default=v)
  a = ap.parse_args()
  import torch
  from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "tower"
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=a.width, intermediate_size=a.mlp,
                             num_hidden_layers=a.layers, num_attention_heads=a.heads,
                             patch_size=a.patch, image_size=a.size)
    SiglipVisionModel(cfg).save_pretrained(folder)
    SiglipImageProcessor(size={"height": a.size, "width": a.size}).save_pretrained(folder)
    paths = write_jpegs(Path(tmp), a.images)
    jax_ips, jax_feat = jax_side(str(folder), a.size, paths, a.batch, a.workers)
    torch_ips, torch_feat = torch_side(str(folder), paths, a.batch)
  cos = float(np.min(np.sum(jax_feat * torch_feat, -1) / (
      np.linalg.norm(jax_feat, axis=-1) * np.linalg.norm(torch_feat, axis=-1))))
  r = {"shape": f"width {a.width}, {a.layers} layers, {a.size}px", "batch": a.batch,
       "images": a.images, "threads": torch.get_num_threads(), "iqa_jax_img_s": round(jax_ips, 2),
       "torch_img_s": round(torch_ips, 2), "ratio": round(jax_ips / torch_ips, 2),
       "feature_cos_min": round(cos, 6)}
  print(f"scoring {r['images']} JPEGs, {r['shape']}, batch {a.batch}: iqa_jax Scorer "
        f"{r['iqa_jax_img_s']} img/s, PyTorch + HF processor {r['torch_img_s']} img/s, ratio "
        f"{r['ratio']}x (pooled features cos >= {r['feature_cos_min']})")
  print("BENCH_JSON " + json.dumps(r))


if __name__ == "__main__":
  main()
