"""The steps of scripts/gpu_check.sh (issue 9, Part B); each appends one JSON line to a file.

python scripts/gpu_check.py parity  --out R.jsonl --ckpt DIR [--tiny]
python scripts/gpu_check.py e2e     --out R.jsonl --ckpt DIR --work DIR [--tiny]
python scripts/gpu_check.py record  --out R.jsonl --name NAME --from LOG  (its last JSON line)
python scripts/gpu_check.py summary --out R.jsonl

--tiny is the CPU smoke mode: the anchors' tiny tower at 64 px instead of SO400M/16@512.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tower_config(tiny: bool) -> dict:
  """The released SO400M/16@512 vision config in transformers' names, or the tiny tower."""
  from iqa_jax import bench
  from iqa_jax.models.siglip import VARIANTS
  cfg = dataclasses.asdict(VARIANTS["so400m/16@512"])
  if tiny:
    cfg.update(bench.TINY_ARCH)
  return cfg


def append(out: str, record: dict) -> None:
  with open(out, "a") as f:
    f.write(json.dumps(record) + "\n")
  print("RESULT " + json.dumps(record), flush=True)


def parity(a) -> None:
  """Pooled feature of the same random weights: transformers (float32, no TF32) vs ours in
  float32 (XLA attention, highest matmul precision) and in bf16 with cuDNN attention."""
  import torch
  import transformers
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg = tower_config(a.tiny)
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg)).eval()
  with torch.no_grad():  # random init leaves biases at 0 and LN at 1: perturb every tensor
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(a.ckpt)
  size = cfg["image_size"]
  transformers.SiglipImageProcessor(size={"height": size, "width": size},
                                    resample=2).save_pretrained(a.ckpt)
  images = np.random.default_rng(0).standard_normal((4, size, size, 3)).astype(np.float32)
  model = model.to(dev)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).to(dev)
                ).pooler_output.float().cpu().numpy()
  del model
  if dev == "cuda":
    torch.cuda.empty_cache()

  import jax
  import jax.numpy as jnp

  from iqa_jax.models.siglip import load_hf_siglip
  on_gpu = jax.default_backend() == "gpu"

  def feature(dtype, attention, precision=None):
    module, params, _ = load_hf_siglip(a.ckpt, dtype=dtype, attention_impl=attention)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[0].astype(jnp.float32))
    with jax.default_matmul_precision(precision) if precision else _nothing():
      return np.asarray(fn(params, images))

  f32 = feature(jnp.float32, "xla", "highest")
  f32_default = feature(jnp.float32, "xla")
  bf16_attention = "cudnn" if on_gpu else "xla"
  bf16 = feature(jnp.bfloat16, bf16_attention)
  cos = (bf16 * ref).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(ref, axis=1)
  append(a.out, {"step": "parity", "tiny": a.tiny, "torch_device": dev,
                 "jax_device": jax.devices()[0].device_kind, "feature_dim": int(ref.shape[1]),
                 "ref_abs_max": float(np.abs(ref).max()),
                 "f32_max_abs": float(np.abs(f32 - ref).max()),
                 "f32_default_precision_max_abs": float(np.abs(f32_default - ref).max()),
                 "bf16_attention": bf16_attention, "bf16_min_cosine": float(cos.min())})


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def e2e(a) -> None:
  """`python -m iqa_jax.train` from the checkpoint folder on synthetic JPEGs, batch 32 (as the
  bench), several epochs: the last epoch's img/s is decode + pp + prefetch + step, compiled."""
  from PIL import Image
  size = tower_config(a.tiny)["image_size"]
  data = Path(a.work) / "images"
  data.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  rows = ["path,mos"]
  t0 = time.perf_counter()
  for i in range(a.images):
    coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # smooth, photo-like JPEG sizes
    Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(data / f"{i:04d}.jpg",
                                                                      quality=90)
    rows.append(f"{i:04d}.jpg,{rng.uniform():.4f}")
  (data / "labels.csv").write_text("\n".join(rows) + "\n")
  print(f"e2e: {a.images} JPEGs at {size} px in {time.perf_counter() - t0:.1f} s", flush=True)
  run = Path(a.work) / "run"
  cmd = [sys.executable, "-m", "iqa_jax.train", "--config", "configs/siglip2_gated.py",
         f"--config.model.init={a.ckpt}", "--config.data.name=csv", f"--config.data.dir={data}",
         f"--config.data.image_size={size}", f"--config.data.workers={a.workers}",
         f"--config.optim.epochs={a.epochs}", f"--config.optim.batch_size={a.batch}",
         "--config.optim.grad_accum=1", "--config.optim.schedule=constant",
         f"--config.eval_batch_size={a.batch}", f"--workdir={run}"]
  if a.cache:
    cmd.append(f"--config.compilation_cache={a.cache}")
  print("$ " + " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True)
  wall = time.perf_counter() - t0
  history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x]
  append(a.out, {"step": "e2e", "tiny": a.tiny, "images": a.images, "batch": a.batch,
                 "workers": a.workers, "wall_s": wall,
                 "epoch_img_s": [h["train_img_per_s"] for h in history],
                 "train_img_s": history[-1]["train_img_per_s"]})


def record(a) -> None:
  """The last BENCH_JSON (bench) or bare JSON (torch_reference.py) line of a log."""
  found = None
  for line in Path(getattr(a, "from")).read_text().splitlines():
    line = line.strip()
    if line.startswith("BENCH_JSON "):
      found = json.loads(line[len("BENCH_JSON "):])
    elif line.startswith("{") and line.endswith("}"):
      try:
        found = json.loads(line)
      except json.JSONDecodeError:
        pass
  append(a.out, {"step": a.name, **(found or {"missing": True})})


def summary(a) -> None:
  """Issue 9's Part B table from the recorded steps, with each goal and whether it was met."""
  steps = {}
  for line in Path(a.out).read_text().splitlines():
    r = json.loads(line)
    steps[r["step"]] = r
  get = lambda step, key: steps.get(step, {}).get(key)  # noqa: E731
  card = get("bench_cold", "device") or get("parity", "jax_device") or "?"

  def row(check, value, goal, ok):
    mark = "n/a" if ok is None else ("met" if ok else "MISSED")
    print(f"| {check} | {value} | {goal} | {mark} |")

  def num(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)

  train, infer = get("bench_cold", "train_img_s"), get("bench_cold", "infer_img_s")
  eager, compiled = get("torch_eager", "train_img_s"), get("torch_compile", "train_img_s")
  peak = get("bench_cold", "train_peak_mib")
  e2e_ips = get("e2e", "train_img_s")
  f32, cos = get("parity", "f32_max_abs"), get("parity", "bf16_min_cosine")
  print(f"\nPart B on {card} (one call); tiny={get('parity', 'tiny')}\n")
  print("| check | measured | goal | |\n|---|---|---|---|")
  row("SO400M@512 pooled feature vs transformers, float32", f"max abs {num(f32, '{:.2e}')}",
      "<= 1e-3", None if f32 is None else f32 <= 1e-3)
  row(f"same, bf16 + {get('parity', 'bf16_attention')} attention",
      f"min cosine {num(cos, '{:.5f}')}", ">= 0.999", None if cos is None else cos >= 0.999)
  row("train img/s, batch 32, LoRA + gated head, bf16", num(train), ">= 200 on H100",
      None if train is None else train >= 200)
  row("  vs PyTorch eager + peft (same call)",
      f"{num(eager)} img/s, x{num(train / eager if train and eager else None, '{:.2f}')}",
      ">= 1.95x", None if not (train and eager) else train / eager >= 1.95)
  row("  vs torch.compile (same call)",
      f"{num(compiled)} img/s, x{num(train / compiled if train and compiled else None, '{:.2f}')}",
      ">= 1.4x", None if not (train and compiled) else train / compiled >= 1.4)
  row("inference img/s, batch 64", num(infer), ">= 550 on H100",
      None if infer is None else infer >= 550)
  row("peak GPU memory, train batch 32", f"{num(peak, '{:.0f}')} MiB", "<= 8 GB",
      None if peak is None else peak * 2**20 <= 8e9)
  row("python -m iqa_jax.train end to end (last epoch)",
      f"{num(e2e_ips)} img/s = {num(e2e_ips / train * 100 if e2e_ips and train else None)}%"
      " of bench", ">= 90%", None if not (e2e_ips and train) else e2e_ips >= 0.9 * train)
  row("train-step compile, cold / persistent cache",
      f"{num(get('bench_cold', 'train_compile_s'))} s / "
      f"{num(get('bench_cached', 'train_compile_s'))} s", "reported", None)
  print(f"\ntorch: {get('torch_eager', 'device')}, torch {get('torch_eager', 'torch')}; "
        f"e2e img/s per epoch {get('e2e', 'epoch_img_s')}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("step", choices=("parity", "e2e", "record", "summary"))
  ap.add_argument("--out", required=True, help="results .jsonl (appended)")
  ap.add_argument("--ckpt", default="/tmp/gpu_check/siglip_so400m_512")
  ap.add_argument("--work", default="/tmp/gpu_check")
  ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: the tiny tower at 64 px")
  ap.add_argument("--images", type=int, default=800)
  ap.add_argument("--epochs", type=int, default=3)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--cache", default="", help="persistent compilation cache folder")
  ap.add_argument("--name", default="")
  ap.add_argument("--from", default="")
  a = ap.parse_args(argv)
  {"parity": parity, "e2e": e2e, "record": record, "summary": summary}[a.step](a)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  sys.exit(main())
