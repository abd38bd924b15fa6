"""Train a quality model: python -m iqa_jax.train --config configs/siglip2_gated.py --workdir DIR

Per epoch: train with a progress bar (img/s, ETA), evaluate SRCC/PLCC on the validation split,
save `ckpt/last` and, when validation SRCC improves, `ckpt/best`. Rerunning on the same workdir
resumes after the last finished epoch.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iqa_jax import checkpoint, features, metrics, parallel
from iqa_jax.data import datasets, pipeline, pp
from iqa_jax.models.lora import count_by_label
from iqa_jax.models.model import create_model
from iqa_jax.optim import make_optimizer
from iqa_jax.steps import TrainState, make_eval_step, make_train_step

SMALL_SETS = ("clive", "agiqa1k", "agiqa3k", "demo")  # §3.1: constant lr on the small sets


class NonFiniteLossError(RuntimeError):
  pass


def _log(msg: str) -> None:
  print(msg, flush=True)


def resolve_schedule(config: ml_collections.ConfigDict) -> str:
  if config.optim.schedule != "auto":
    return config.optim.schedule
  return "constant" if config.data.name in SMALL_SETS else "multistep"


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="img", unit_scale=False, dynamic_ncols=True,
              disable=not enabled, leave=False, file=sys.stderr)


def predict(eval_fn, params, loader, progress: bool = False, desc: str = "eval") -> np.ndarray:
  """Scores for every real (unpadded) example of an eval loader, in record order."""
  out = []
  bar = _progress(len(loader), desc, progress)
  for batch in loader:
    scores = eval_fn(params, batch["image"])
    out.append((scores, batch["valid"]))
    bar.update(1)
  bar.close()
  return np.concatenate([np.asarray(s)[np.asarray(v)] for s, v in out]) if out else np.zeros(0)


def gate_weights(params) -> dict[str, list[float]]:
  """w = sigmoid(g) per channel of each gated activation (Fig. 2 / S7)."""
  head = params["head"]
  return {name: np.asarray(jax.nn.sigmoid(head[name]["g"])).round(5).tolist()
          for name in ("act1", "act2") if name in head and "g" in head[name]}


def load_data(config, workdir: Path):
  records = datasets.load_records(config.data)
  records, skipped = pipeline.check_records(records, on_error=config.data.on_error,
                                            cache=_cache(config))
  if skipped:
    _log(f"data: skipped {len(skipped)} unreadable or invalid inputs "
         f"(listed in {workdir / 'skipped.csv'})")
    with open(workdir / "skipped.csv", "w") as f:
      f.write("path,reason\n")
      for path, reason in skipped:
        f.write(f"\"{path}\",\"{reason}\"\n")
  splits = datasets.make_splits(records, config.seed, split=config.data.split,
                                val_fraction=config.data.val_fraction,
                                test_fraction=config.data.test_fraction)
  datasets.save_splits(splits, workdir)
  return splits, len(skipped)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one training run; returns and writes `results.json`."""
  parallel.initialize_distributed(config.get("distributed", False))
  parallel.enable_compilation_cache(config.get("compilation_cache", ""))
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  splits, n_skipped = load_data(config, workdir)
  train_recs, val_recs = splits["train"], splits["val"]
  optim = config.optim
  if len(train_recs) < optim.batch_size:
    raise ValueError(f"Only {len(train_recs)} training images for batch size {optim.batch_size}; "
                     f"lower --config.optim.batch_size")
  mesh, mode = parallel.make_mesh(), config.get("parallel", "sharded")
  parallel.check_batch_size(optim.batch_size, optim.grad_accum, mesh)
  host_batch = parallel.process_batch_size(optim.batch_size)  # this process's share

  if config.data.get("features"):  # stored backbone features: the head trains alone
    model, params, pp_str = features.head_only(config)
  else:
    model, params, preprocessing = create_model(config)
    pp_str = pp.run_pp(config.data, preprocessing)
  _log(f"model: {config.model.backbone} ({config.model.init or 'random init'}), head "
       f"{config.model.head}, finetune {config.model.finetune}; pp: {pp_str}")
  _log(f"data: {config.data.name}: {len(train_recs)} train / {len(val_recs)} val"
       + (f" / {len(splits['test'])} test" if "test" in splits else ""))

  cache = _cache(config)
  loader_kw = dict(workers=config.data.workers, shard_index=jax.process_index(),
                   shard_count=jax.process_count(), cache=cache)
  steps_per_epoch = len(pipeline.make_train_loader(train_recs, pp_str, host_batch,
                                                   seed=config.seed, epoch=0, **loader_kw))
  schedule = resolve_schedule(config)
  tx, labels = make_optimizer(_with_schedule(config, schedule), params, steps_per_epoch)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(config.seed + 1))
  counts = count_by_label(params, labels)
  _log("params: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))

  ckpt = checkpoint.RunCheckpoints(workdir, save_frozen=not config.model.init)
  start_epoch, best = 0, {"srcc": -math.inf}
  history: list[dict] = []
  restored = ckpt.restore_last(state, labels)
  if restored is not None:
    state, meta = restored
    start_epoch, best = meta["epoch"] + 1, meta["best"]
    history = [h for h in checkpoint.read_history(workdir) if h["epoch"] <= meta["epoch"]]
    checkpoint.write_history(workdir, history)
    _log(f"resume: from epoch {start_epoch} (step {int(state.step)}), best SRCC "
         f"{best['srcc']:.4f}")

  state = parallel.put_state(state, labels, mesh, config.model.get("param_dtype"))
  train_step = parallel.jit_train_step(functools.partial(
      make_train_step, model, tx, labels, grad_accum=optim.grad_accum,
      margin_lambda=config.loss.margin_lambda, margin_weight=config.loss.margin_weight,
      with_grad_norm=config.log_grad_norm), mesh, mode, donate=config.get("donate", True))
  eval_fn = parallel.jit_eval_step(make_eval_step(model), mesh)
  put = functools.partial(parallel.put_batch, mesh=mesh, mode=mode, grad_accum=optim.grad_accum,
                          keys=("image", "mos"))
  val_loader = pipeline.make_eval_loader(val_recs, pp_str, config.eval_batch_size,
                                         workers=config.data.workers, cache=cache)
  val_mos = np.array([r.mos for r in val_recs])

  for epoch in range(start_epoch, optim.epochs):
    t0 = time.time()
    loader = pipeline.make_train_loader(train_recs, pp_str, host_batch, seed=config.seed,
                                        epoch=epoch, **loader_kw)
    bar = _progress(len(loader) * optim.batch_size, f"epoch {epoch + 1}/{optim.epochs}",
                    config.progress)
    step_metrics = []
    for batch in parallel.prefetch_to_device(loader, put, config.get("prefetch", 2)):
      state, m = train_step(state, batch)
      step_metrics.append(m)  # stays on device: no host sync inside the loop
      bar.update(optim.batch_size)
      if len(step_metrics) % 20 == 0:  # logging is the one place that syncs
        bar.set_postfix(loss=f"{float(m['loss']):.4f}")
    bar.close()
    losses = np.asarray(jax.device_get([m["loss"] for m in step_metrics]), np.float64)
    if not np.all(np.isfinite(losses)):
      first = int(np.argmax(~np.isfinite(losses)))
      step = epoch * steps_per_epoch + first + 1
      raise NonFiniteLossError(
          f"Loss became {losses[first]} at step {step} (epoch {epoch + 1}); stopping. The last "
          f"good checkpoint is kept in {workdir / 'ckpt'}. Try a lower --config.optim.lr or the "
          f"gated head (App. B: the sigmoid head can collapse on large sets).")
    train_time = time.time() - t0
    scores = predict(eval_fn, state.params, val_loader)
    val = metrics.compute_metrics(scores, val_mos)
    entry = {"epoch": epoch, "step": int(state.step), "train_loss": float(losses.mean()),
             "lr_scale": _lr_scale(schedule, config, epoch),
             "train_img_per_s": len(losses) * optim.batch_size / max(train_time, 1e-9),
             "val": val, "time_s": time.time() - t0}
    if config.log_grad_norm:
      entry["grad_norm"] = float(np.mean(jax.device_get([m["grad_norm"] for m in step_metrics])))
    gates = gate_weights(state.params)
    if gates:
      entry["gate_w"] = gates
    improved = val["srcc"] > best["srcc"]
    if improved:
      best = {"epoch": epoch, **val}
      write_predictions(workdir / "val_predictions.csv", val_recs, scores)
    history.append(entry)
    checkpoint.write_history(workdir, history)
    ckpt.save(state, labels, "last", {"epoch": epoch, "best": best})
    if improved:
      ckpt.save(state, labels, "best", {"epoch": epoch, "best": best})
    _log(f"epoch {epoch + 1:3d}/{optim.epochs}  loss {entry['train_loss']:.4f}  "
         f"val SRCC {val['srcc']:.4f}  PLCC {val['plcc']:.4f}  "
         f"{entry['train_img_per_s']:.1f} img/s  {entry['time_s']:.1f}s" + ("  *" if improved else ""))

  final = history[-1]["val"] if history else {}
  results = {
      "name": config.name, "dataset": config.data.name, "backbone": config.model.backbone,
      "head": config.model.head, "finetune": config.model.finetune, "seed": config.seed,
      "epochs": optim.epochs, "n_train": len(train_recs), "n_val": len(val_recs),
      "n_skipped": n_skipped, "best": best, "final": {"epoch": optim.epochs - 1, **final},
      "test": None, "status": "done",
  }
  if "test" in splits and splits["test"]:
    best_state = ckpt.restore_best(state, labels) or state
    test_loader = pipeline.make_eval_loader(splits["test"], pp_str, config.eval_batch_size,
                                            workers=config.data.workers, cache=cache)
    test_scores = predict(eval_fn, best_state.params, test_loader)
    results["test"] = metrics.compute_metrics(test_scores, [r.mos for r in splits["test"]])
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  ckpt.close()
  return results


def _cache(config) -> str | None:
  """The folder batches are read from: a feature cache, a prepare cache, or None (the files)."""
  return config.data.get("features") or config.data.cache or None


def write_predictions(path: Path, records, scores) -> None:
  """Per-image predictions of the best epoch (for scatter plots and error analysis)."""
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "mos", "pred"])
    for r, s in zip(records, scores):
      w.writerow([r.path, f"{r.mos:.6f}", f"{float(s):.6f}"])
  tmp.replace(path)


def _with_schedule(config, schedule: str):
  c = ml_collections.ConfigDict(config.to_dict())
  c.optim.schedule = schedule
  return c


def _lr_scale(schedule: str, config, epoch: int) -> float:
  if schedule == "constant":
    return 1.0
  return float(config.optim.gamma ** sum(epoch >= m for m in config.optim.milestones))


def print_results_table(results: dict) -> None:
  b, f = results["best"], results["final"]
  rows = [("best", b.get("epoch", -1) + 1, b.get("srcc"), b.get("plcc")),
          ("final", f.get("epoch", -1) + 1, f.get("srcc"), f.get("plcc"))]
  if results.get("test"):
    rows.append(("test", b.get("epoch", -1) + 1, results["test"]["srcc"], results["test"]["plcc"]))
  print(f"\n| {results['dataset']} ({results['head']} head, seed {results['seed']}) | epoch | SRCC | PLCC |")
  print("|---|---|---|---|")
  for name, ep, s, p in rows:
    print(f"| {name} | {ep} | {s:.4f} | {p:.4f} |")
  print(flush=True)


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Run folder (default: checkpoints/<config name>).")
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip2_gated.py.",
                                  lock_config=True)

  def _main(_):
    config = flags.FLAGS.config
    if config is None:
      raise app.UsageError("Pass --config configs/siglip2_gated.py (or another file in configs/).")
    workdir = flags.FLAGS.workdir or os.path.join("checkpoints", config.name)
    try:
      results = train_and_evaluate(config, workdir)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print_results_table(results)
    print(f"run folder: {workdir}")

  app.run(_main, argv=argv)
  return 0


if __name__ == "__main__":
  main()
