"""Train and inference throughput on random weights (nothing is downloaded; issue 6).

python -m iqa_jax.bench --config configs/siglip2_gated.py --batch 32
python -m iqa_jax.bench --config configs/siglip2_gated.py --batch 8 --tiny          # runs on CPU
python -m iqa_jax.bench --config configs/dinov2.py --batch 8 --tiny --flops-only    # no compile
python -m iqa_jax.bench --config configs/siglip2_gated.py --set model.remat=dots --set donate=False
python -m iqa_jax.bench --config configs/siglip2_gated.py --vs-torch scratch/torch_reference.py
python -m iqa_jax.bench --tiny --batch 8 --vs-torch ../shared/anchors/torch_cpu_reference.py

Prints train img/s, inference img/s, peak device memory, compile time and TFLOP/s, then one
`BENCH_JSON {...}` line. `--set KEY=VALUE` overrides a config field (the levers: model.remat,
model.attention, model.param_dtype, cpu_dots, parallel, donate, prefetch, compilation_cache).
`--vs-torch` runs the paper's PyTorch stack in a subprocess and prints the ratios: on a GPU
../shared/anchors/torch_reference.py first (where torch sees CUDA); on a CPU
../shared/anchors/torch_cpu_reference.py after the JAX side, at the SigLIP shape, batches and
steps it timed (`--set model.arch=...`, `--set data.image_size=...`, `--batch`, `--infer-batch`).
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from iqa_jax import cli, huge_pages, xla_cpu
from iqa_jax.analysis import xprof
from iqa_jax.analysis.compute import compiled_bytes as _compiled_bytes
from iqa_jax.analysis.compute import xla_flops as _xla_flops
from iqa_jax.defaults import load_config_file

# The anchors' --tiny tower (torch_reference.py), small enough for a CPU.
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, patch_size=16, image_size=64)
TINY_SIZE = TINY_ARCH["image_size"]
# --tiny for every family: config.model fields that shrink its tower to about the same size
# (width 64, 2 blocks, 64 px). Each family names its architecture fields its own way.
TINY_MODEL = {
    "siglip": {"arch": TINY_ARCH},
    "clip": {"arch": dict(TINY_ARCH, projection_dim=32)},
    "dinov2": {"arch": dict(hidden_size=64, mlp_ratio=2, num_hidden_layers=2,
                            num_attention_heads=4, patch_size=16, image_size=TINY_SIZE)},
    "dinov3": {"arch": dict(TINY_ARCH, num_register_tokens=2)},
    "siglip2_naflex": {"arch": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, patch_size=16,
                                    num_patches=(TINY_SIZE // 16) ** 2)},
    "pe": {"arch": dict(embed_dim=64, depth=2, num_heads=4, patch_size=16, img_size=TINY_SIZE,
                        ref_feat_shape=(TINY_SIZE // 16,) * 2, num_classes=32,
                        attn_pool_num_heads=2),
           "tap_layer": -1},
    "resnet": {"arch": dict(embedding_size=16, hidden_sizes=(32, 64), depths=(1, 1))},
    # SD 2.1's structure shrunk: a 2-block VAE (64 px -> 32 px latent), one cross-attention
    # UNet block with linear projections, a 5-token prompt, and a small DP-IQA adapter.
    "cleandift": {
        "arch": dict(prompt_length=5,
                     vae=dict(block_out_channels=(8, 16), layers_per_block=1,
                              latent_channels=4, norm_num_groups=4),
                     unet=dict(block_out_channels=(8,), layers_per_block=1,
                               attention_head_dim=(2,), cross_attention_dim=12,
                               use_linear_projection=True, norm_num_groups=4,
                               down_block_types=("CrossAttnDownBlock2D",),
                               up_block_types=("CrossAttnUpBlock2D",))),
        "adapter": dict(blocks=(0,), width=16, grid=4, score_channels=(4,), pool="flatten")},
}
# Useful work of a train step in forwards: the frozen tower needs no backward at all, LoRA needs
# activation gradients (one more forward's worth), full fine-tuning weight gradients too.
TRAIN_FORWARDS = {"frozen": 1.0, "lora": 2.0, "full": 3.0, "lora_full": 3.0}
# What the CPU anchor (torch_cpu_reference.py) needs to build the same SigLIP tower.
SIGLIP_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "patch_size")


def apply_override(config, item: str) -> None:
  """'model.remat=dots' -> config.model.remat = 'dots' (Python literals parsed)."""
  key, _, text = item.partition("=")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def shrink(config) -> None:
  """--tiny: the config's own family at about the anchors' tiny size, at 64 px."""
  family = config.model.backbone
  if family not in TINY_MODEL:
    raise ValueError(f"--tiny has no tiny tower for config.model.backbone={family!r}; "
                     f"known: {sorted(TINY_MODEL)}")
  for key, value in TINY_MODEL[family].items():
    config.model[key] = dict(value) if isinstance(value, dict) else value
  config.data.image_size = TINY_SIZE
  config.data.pp = ""  # the checkpoint's native recipe at 64 px (NaFlex's budget: square)


def siglip_forward_flops(cfg, size: int) -> float:
  """Matmul FLOPs of one image through a SigLIP tower and its MAP head (2 per multiply-add)."""
  d, m, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
  t = (size // p) ** 2
  patch = 2 * t * (p * p * 3) * d
  layer = 2 * t * (4 * d * d + 2 * d * m) + 2 * 2 * t * t * d  # projections, MLP, QK^T and AV
  head = 2 * (2 * t * d * d + 2 * d * d + 2 * d * m) + 2 * 2 * t * d if cfg.vision_use_head else 0
  return patch + cfg.num_hidden_layers * layer + head


def hand_forward_flops(config, model, size: int) -> float | None:
  """The hand count is SigLIP's (square images, MAP head); other families report XLA's count."""
  if config.model.backbone in ("siglip", "siglip2_naflex"):
    return siglip_forward_flops(model.backbone.cfg, size)
  return None


def _peak_bytes() -> int | None:
  import jax
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def _timed(fn, n: int) -> float:
  import jax
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def count_flops(config, batch: int, infer_batch: int) -> dict:
  """XLA's FLOP count of the train and eval steps on abstract shapes: nothing is initialised or
  compiled (SO400M@512 in under a minute on a CPU, in 0.4 GB), and it checks that a config
  builds and differentiates."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from iqa_jax import parallel
  from iqa_jax.models.model import create_model, make_eval_step
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState, make_train_step

  t0 = time.perf_counter()
  config.model.init = None
  if "scan" in config.model:  # XLA counts a loop body once: unroll the layers to count them all
    config.model.scan = False
  built = {}

  def init(rng):
    built["model"], params, built["preprocessing"] = create_model(config, rng)
    return params

  params = jax.eval_shape(init, jax.random.PRNGKey(0))
  model, preprocessing = built["model"], built["preprocessing"]
  size = config.data.image_size or preprocessing["crop"] or preprocessing["size"]
  mesh = parallel.make_mesh()
  accum = config.optim.grad_accum
  parallel.check_batch_size(batch, accum, mesh)
  tx, labels = make_optimizer(config, params, steps_per_epoch=1000)
  state = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=parallel.cast_frozen(
          p, labels, config.model.get("param_dtype")), opt_state=tx.init(p),
      rng=jax.random.PRNGKey(0)), params)

  def on(sharding):
    return lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  state = jax.tree.map(on(parallel.replicated(mesh)), state)
  micro = NamedSharding(mesh, P(None, parallel.AXIS))
  device_batch = {"image": on(micro)(jax.ShapeDtypeStruct(
                      (accum, batch // accum, size, size, 3), jnp.float32)),
                  "mos": on(micro)(jax.ShapeDtypeStruct((accum, batch // accum), jnp.float32))}
  train_step = parallel.jit_train_step(functools.partial(
      make_train_step, model, tx, labels, grad_accum=accum,
      margin_lambda=config.loss.margin_lambda, margin_weight=config.loss.margin_weight), mesh)
  lowered = train_step.lower(state, device_batch)
  images = on(NamedSharding(mesh, P(parallel.AXIS)))(
      jax.ShapeDtypeStruct((infer_batch, size, size, 3), jnp.float32))
  lowered_eval = parallel.jit_eval_step(make_eval_step(model), mesh).jitted.lower(state.params,
                                                                                images)

  def flops(low):
    return float(low.cost_analysis()["flops"]) * mesh.size

  fwd = hand_forward_flops(config, model, size)
  devices = jax.devices()
  return {"device": f"{len(devices)} x {devices[0].device_kind}", "backbone":
          config.model.backbone, "finetune": config.model.finetune, "image_size": size,
          "batch": batch, "infer_batch": infer_batch, "trace_s": time.perf_counter() - t0,
          "xla_train_gflop_per_img": flops(lowered) / batch / 1e9,
          "xla_infer_gflop_per_img": flops(lowered_eval) / infer_batch / 1e9,
          "forward_gflop_per_img": None if fwd is None else fwd / 1e9}


def run(config, batch: int, infer_batch: int, steps: int = 10, warmup: int = 2,
        feed: str = "device", host_sync: bool = False, profile: str | None = None,
        top: int = 15) -> dict:
  """Times the train step and the eval step of `config` on random weights and images; with
  `profile` (a folder), then traces 2 more steps of each and adds their top ops."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from iqa_jax import parallel
  from iqa_jax.models.model import create_model, make_eval_step
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState, make_train_step, split_layers_for

  parallel.enable_compilation_cache(config.get("compilation_cache", ""), min_compile_s=0.0)
  config.model.init = None
  model, params, preprocessing = create_model(config)
  size = config.data.image_size or preprocessing["crop"] or preprocessing["size"]
  accum, mode = config.optim.grad_accum, config.get("parallel", "sharded")
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch, accum, mesh)
  if infer_batch % mesh.size:
    raise ValueError(f"--infer-batch {infer_batch} must split over {mesh.size} devices")
  tx, labels = make_optimizer(config, params, steps_per_epoch=1000)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  state = parallel.put_state(state, labels, mesh, config.model.get("param_dtype"))
  cpu_dots = xla_cpu.choose(mesh.devices.flat, config.get("cpu_dots", "auto"), params)
  del params
  train_step = parallel.jit_train_step(functools.partial(
      make_train_step, model, tx, labels, grad_accum=accum,
      margin_lambda=config.loss.margin_lambda, margin_weight=config.loss.margin_weight),
      mesh, mode, donate=config.get("donate", True), cpu_dots=cpu_dots,
      split_layers=split_layers_for(config.model, state.params, labels, mesh))
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((batch, size, size, 3), np.float32),
          "mos": rng.uniform(size=batch).astype(np.float32)}
  put = functools.partial(parallel.put_batch, mesh=mesh, mode=mode, grad_accum=accum)
  device_batch = put(host)

  t0 = time.perf_counter()
  xla_train = train_bytes = None
  if mode == "sharded":
    compiled = train_step.lower(state, device_batch).compile()
    train_compile = time.perf_counter() - t0
    xla_train, train_bytes = _xla_flops(compiled, mesh.size), _compiled_bytes(compiled)
    train_step = (train_step.with_compiled(compiled)
                  if isinstance(train_step, parallel.LayerSplitStep) else compiled)
  else:  # pmap: its first call compiles (and runs one step)
    state, m = train_step(state, device_batch)
    jax.block_until_ready(m)
    train_compile = time.perf_counter() - t0

  box = {"state": state}

  def one_step(b):
    box["state"], m = train_step(box["state"], b)
    if host_sync:  # what a per-step float(loss) costs
      float(m["loss"])
    return m

  _timed(lambda: one_step(device_batch), warmup)
  if feed == "device":  # the batch stays on the devices, as in torch_reference.py
    train_s = _timed(lambda: one_step(device_batch), steps)
  else:  # a new host batch per step through the prefetch-to-device iterator
    t0 = time.perf_counter()
    m = None
    for b in parallel.prefetch_to_device((host for _ in range(steps)), put,
                                         config.get("prefetch", 2)):
      m = one_step(b)
    jax.block_until_ready(m)
    train_s = time.perf_counter() - t0
  jax.block_until_ready(box["state"])
  train_peak = _peak_bytes()
  profiles = {}
  if profile and mode == "sharded":
    profiles["train"] = xprof.summary(xprof.trace(
        lambda: jax.block_until_ready(one_step(device_batch)), 2, Path(profile) / "train"),
        train_step.as_text(), 2, top)
  loss = float(one_step(device_batch)["loss"])

  eval_fn = parallel.jit_eval_step(make_eval_step(model), mesh, cpu_dots)
  images = rng.standard_normal((infer_batch, size, size, 3), np.float32)
  x = jax.make_array_from_callback(images.shape, NamedSharding(mesh, P(parallel.AXIS)),
                                   lambda idx: images[idx])
  params = box["state"].params
  t0 = time.perf_counter()
  compiled_eval = eval_fn.jitted.lower(params, x).compile()
  infer_compile = time.perf_counter() - t0
  _timed(lambda: compiled_eval(params, x), warmup)
  infer_s = _timed(lambda: compiled_eval(params, x), steps)
  if profile:
    profiles["inference"] = xprof.summary(xprof.trace(
        lambda: jax.block_until_ready(compiled_eval(params, x)), 2, Path(profile) / "inference"),
        compiled_eval.as_text(), 2, top)

  fwd = hand_forward_flops(config, model, size)
  train_ips, infer_ips = batch * steps / train_s, infer_batch * steps / infer_s
  finetune = config.model.finetune

  def tflops(f, ips):
    return None if f is None else f * ips / 1e12

  xla_eval = _xla_flops(compiled_eval, mesh.size)
  devices = jax.devices()
  return {
      "device": f"{len(devices)} x {devices[0].device_kind}", "platform": devices[0].platform,
      "parallel": mode, "batch": batch, "grad_accum": accum, "infer_batch": infer_batch,
      "image_size": size, "steps": steps, "feed": feed, "finetune": finetune,
      "dtype": config.model.dtype, "param_dtype": config.model.get("param_dtype", "float32"),
      "remat": config.model.remat, "attention": config.model.attention,
      "cpu_dots": cpu_dots, "huge_pages": huge_pages.active(),
      "donate": config.get("donate", True), "train_img_s": train_ips,
      "infer_img_s": infer_ips, "train_step_ms": 1e3 * train_s / steps,
      "train_compile_s": train_compile, "infer_compile_s": infer_compile,
      "train_peak_mib": None if train_peak is None else train_peak / 2**20,
      "peak_mib": None if _peak_bytes() is None else _peak_bytes() / 2**20,
      "train_compiled_mib": None if train_bytes is None else train_bytes / 2**20,
      "forward_gflop_per_img": None if fwd is None else fwd / 1e9,
      "train_tflops": tflops(None if fwd is None else fwd * TRAIN_FORWARDS[finetune], train_ips),
      "infer_tflops": tflops(fwd, infer_ips),
      "xla_train_tflops": None if xla_train is None else xla_train * steps / train_s / 1e12,
      "xla_infer_tflops": None if xla_eval is None else xla_eval * steps / infer_s / 1e12,
      "loss": loss, "backbone": config.model.backbone,
      "profile": profiles,
      "tower": ({k: getattr(model.backbone.cfg, k) for k in SIGLIP_SHAPE}
                if config.model.backbone == "siglip" else None),
  }


def torch_has_cuda() -> bool:
  probe = subprocess.run([sys.executable, "-c", "import torch, sys; "
                          "sys.exit(0 if torch.cuda.is_available() else 3)"],
                         capture_output=True, text=True)
  return probe.returncode == 0


def is_cpu_reference(path: str) -> bool:
  """torch_cpu_reference.py takes the tower's shape (--width ...); torch_reference.py does not."""
  return "--width" in Path(path).read_text()


def cpu_reference_args(r: dict, warmup: int) -> list[str]:
  """The CPU anchor's flags for the SigLIP tower `run` just timed: the same shape and batches."""
  t = r.get("tower")
  if t is None:
    raise ValueError(f"--vs-torch on CPU compares SigLIP towers only (config.model.backbone is "
                     f"{r['backbone']!r})")
  return ["--width", t["hidden_size"], "--layers", t["num_hidden_layers"], "--heads",
          t["num_attention_heads"], "--mlp", t["intermediate_size"], "--patch", t["patch_size"],
          "--size", r["image_size"], "--batch", r["batch"], "--infer-batch", r["infer_batch"],
          "--steps", r["steps"], "--warmup", warmup]


def torch_reference(path: str, batch: int, infer_batch: int, steps: int, tiny: bool,
                    compile_: bool = False, cpu_args: list | None = None) -> dict | None:
  """The PyTorch anchor in a subprocess: the GPU one where torch sees CUDA, the CPU one (given
  `cpu_args`) at the JAX side's shape otherwise; None when the two do not fit."""
  if cpu_args is not None:
    cmd = [sys.executable, path] + [str(a) for a in cpu_args]
  elif torch_has_cuda():
    cmd = [sys.executable, path, "--batch", str(batch), "--infer-batch", str(infer_batch),
           "--steps", str(steps)] + ["--tiny"] * tiny + ["--compile"] * compile_
  else:
    return None
  p = subprocess.run(cmd, capture_output=True, text=True)
  if p.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def _fmt(v, unit: str = "", digits: int = 1) -> str:
  return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def report(r: dict, ref: dict | None = None) -> None:
  print(f"device     {r['device']}, parallel {r['parallel']}; {r['finetune']}, dtype {r['dtype']}"
        f" (frozen weights {r['param_dtype']}), remat {r['remat']}, attention {r['attention']}"
        + (f", cpu dots {r['cpu_dots']}" if r.get("cpu_dots") else "")
        + (", huge pages" if r.get("huge_pages") else "")
        + f", donate {r['donate']}, {r['image_size']}px")
  print(f"train      batch {r['batch']} (x{r['grad_accum']} accum): {_fmt(r['train_img_s'])} img/s"
        f", {_fmt(r['train_step_ms'], ' ms')}/step, feed {r['feed']}")
  print(f"inference  batch {r['infer_batch']}: {_fmt(r['infer_img_s'])} img/s")
  peak = f"n/a on {r['platform']}"
  if r["train_peak_mib"] is not None:
    peak = _fmt(r["train_peak_mib"], " MiB")
  elif r["train_compiled_mib"] is not None:
    peak += f" (compiled train step needs {_fmt(r['train_compiled_mib'], ' MiB')} per device)"
  print(f"memory     peak device memory in training: {peak}")
  print(f"compile    train {_fmt(r['train_compile_s'], ' s', 2)}, "
        f"inference {_fmt(r['infer_compile_s'], ' s', 2)}")
  print(f"TFLOP/s    train {_fmt(r['train_tflops'], '', 3)}, inference "
        f"{_fmt(r['infer_tflops'], '', 3)} (model FLOPs, {_fmt(r['forward_gflop_per_img'], '', 4)}"
        f" GFLOP/img forward); XLA-counted train {_fmt(r['xla_train_tflops'], '', 3)}, "
        f"inference {_fmt(r['xla_infer_tflops'], '', 3)}")
  for name, p in r.get("profile", {}).items():
    if not p["top"]:
      print(f"profile    {name} step: no XLA kernel events (the backend started before "
            f"--profile could add {xprof.TRACEME_FLAG} to XLA_FLAGS)")
      continue
    print(f"profile    {name} step: {p['kernel_ms']:.0f} ms of kernels (all threads); top "
          f"{len(p['by_source'])} by model source, every layer together (by op in BENCH_JSON):")
    print("\n".join("  " + line for line in xprof.format_rows(p["by_source"])))
  if ref is not None:
    mem = ref.get("train_peak_mib")
    where = ref.get("device") or f"{ref['stack']}, {ref['threads']} threads"
    print(f"torch      {where}, compile {ref.get('compile', False)}: train "
          f"{ref['train_img_s']} img/s, inference {ref['infer_img_s']} img/s"
          + (f", peak {mem} MiB" if mem else ""))
    print(f"ratio      train {r['train_img_s'] / ref['train_img_s']:.2f}x, inference "
          f"{r['infer_img_s'] / ref['infer_img_s']:.2f}x"
          + (f", memory {r['train_peak_mib'] / mem:.2f}x" if mem and r["train_peak_mib"] else ""))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/siglip2_gated.py", help="config file[:arg]")
  ap.add_argument("--batch", type=int, default=32, help="global train batch")
  ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
  ap.add_argument("--infer-batch", type=int, default=64, help="inference batch")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
  ap.add_argument("--tiny", action="store_true", help="the anchors' tiny tower, for CPUs")
  ap.add_argument("--flops-only", action="store_true",
                  help="trace the steps and print XLA's FLOP count; no compile, no timing")
  ap.add_argument("--feed", default="device", choices=("device", "host"),
                  help="device: one batch kept on the devices; host: a host batch per step")
  ap.add_argument("--host-sync", action="store_true", help="read the loss back every step")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. model.remat=dots (repeatable)")
  ap.add_argument("--vs-torch", default=None, metavar="PATH", help="torch_reference.py to compare")
  ap.add_argument("--torch-compile", action="store_true", help="pass --compile to the reference")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="after timing, trace 2 steps of each into DIR and print the top XLA ops "
                  "(the trace opens in TensorBoard/xprof)")
  ap.add_argument("--top", type=int, default=15, help="ops listed by --profile")
  a = ap.parse_args(argv)
  if a.profile:
    xprof.enable_traceme()

  config = load_config_file(a.config)
  config.model.init = None
  config.optim.batch_size, config.optim.grad_accum = a.batch, a.grad_accum
  config.optim.schedule = "constant"  # "auto" needs a dataset; the lr does not change the speed
  if a.tiny:
    shrink(config)
  for item in a.set:
    apply_override(config, item)

  if a.flops_only:
    r = count_flops(config, a.batch, a.infer_batch)
    print(f"device     {r['device']}; {r['backbone']}, {r['finetune']}, {r['image_size']}px "
          f"(traced in {r['trace_s']:.1f} s, not compiled)")
    print(f"GFLOP/img  train {r['xla_train_gflop_per_img']:.4g}, inference "
          f"{r['xla_infer_gflop_per_img']:.4g} (XLA-counted); hand-counted forward "
          f"{_fmt(r['forward_gflop_per_img'], '', 4)}")
    print("BENCH_JSON " + json.dumps(r), flush=True)
    return 0
  ref = None
  if a.vs_torch and not Path(a.vs_torch).is_file():
    print(f"error: --vs-torch {a.vs_torch}: no such file", file=sys.stderr)
    return 2
  on_cpu = bool(a.vs_torch) and is_cpu_reference(a.vs_torch)
  if a.vs_torch and not on_cpu:  # before JAX takes the GPU's memory
    ref = torch_reference(a.vs_torch, a.batch, a.infer_batch, a.steps, a.tiny, a.torch_compile)
    if ref is None:
      print("torch      skipped: torch with CUDA is not present here (on a CPU, pass "
            "../shared/anchors/torch_cpu_reference.py)")
  r = run(config, a.batch, a.infer_batch, a.steps, a.warmup, a.feed, a.host_sync, a.profile,
          a.top)
  if on_cpu:  # after JAX, at the shape it timed, on the same cores
    try:
      ref = torch_reference(a.vs_torch, a.batch, a.infer_batch, a.steps, a.tiny,
                            cpu_args=cpu_reference_args(r, a.warmup))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  report(r, ref)
  if ref is not None:
    r["torch"] = ref
  print("BENCH_JSON " + json.dumps(r), flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
