"""The epoch loop of `python -m iqa_jax.train` (iqa_jax/train.py says what a run does).

Batches come from the grain pipeline, one jitted step each (`epochs_from_loader`). A run on a
feature cache (data.features: the head alone) holds the cache's rows on the devices and runs
each epoch as one jitted scan of the same step over the same batches (`epochs_in_memory`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iqa_jax import metrics, parallel, xla_cpu
from iqa_jax.data import datasets, pipeline, pp
from iqa_jax.data.tfds import source as tfds_source
from iqa_jax.models.lora import count_by_label
from iqa_jax.models.model import create_model, make_eval_step
from iqa_jax.runs import checkpoint
from iqa_jax.runs import folder as run_folder
from iqa_jax.training import features
from iqa_jax.training.optim import lr_schedule, make_optimizer, resolve_schedule
from iqa_jax.training.progress import progress_bar
from iqa_jax.training.steps import TrainState, make_train_step, split_layers_for


class NonFiniteLossError(RuntimeError):
  pass


def _log(msg: str) -> None:
  print(msg, flush=True)


def predict(eval_fn, params, loader, progress: bool = False, desc: str = "eval") -> np.ndarray:
  """Scores for every real (unpadded) example of an eval loader, in record order."""
  out = []
  bar = progress_bar(len(loader), desc, progress)
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


def load_data(config) -> tuple[dict, list]:
  """-> (splits {'train', 'val'[, 'test']}, skipped [(path, reason)]) of config.data."""
  records = pipeline.load_records(config.data)
  if config.data.get("features"):  # its own messages, before the pipeline reads it as a cache
    features.check_covers(config.data.features, records)
  records, skipped = pipeline.check_records(records, on_error=config.data.on_error,
                                            cache=_cache(config),
                                            tfds=tfds_source.build_dir(config.data))
  splits = datasets.make_splits(records, config.seed, split=config.data.split,
                                val_fraction=config.data.val_fraction,
                                test_fraction=config.data.test_fraction)
  if len(splits["train"]) < config.optim.batch_size:
    raise ValueError(f"Only {len(splits['train'])} training images for batch size "
                     f"{config.optim.batch_size}; lower --config.optim.batch_size")
  return splits, skipped


def record_data(workdir: Path, splits: dict, skipped: list) -> None:
  """splits.json and skipped.csv: which images the run trained and validated on."""
  if run_folder.is_writer():
    datasets.save_splits(splits, workdir)
  if skipped:
    _log(f"data: skipped {len(skipped)} unreadable or invalid inputs "
         f"(listed in {workdir / 'skipped.csv'})")
    run_folder.write_csv(workdir / "skipped.csv", ("path", "reason"), skipped)


@dataclasses.dataclass
class Progress:
  """Where a run stands after its finished epochs (restored from `ckpt/last` on resume)."""
  start_epoch: int = 0
  best: dict | None = None  # {'epoch', **val metrics} of the best finite validation SRCC
  history: list = dataclasses.field(default_factory=list)


def restore(ckpt: checkpoint.RunCheckpoints, state: TrainState, labels,
            workdir: Path) -> tuple[TrainState, Progress]:
  """The state and progress of `ckpt/last`, or the fresh state when the run is new."""
  restored = ckpt.restore_last(state, labels)
  if restored is None:
    return state, Progress()
  state, meta = restored
  best = meta["best"] if meta["best"] and math.isfinite(meta["best"].get("srcc", math.nan)) \
      else None  # runs made before NaN-only validation was recorded as such stored -inf
  ahead = ckpt.best_meta()
  if ahead and ahead["epoch"] > meta["epoch"]:  # saved by an epoch cut before ckpt/last: the
    best = ahead["best"]  # best is that evaluation, as ckpt/best and val_predictions.csv hold
  history = [h for h in checkpoint.read_history(workdir) if h["epoch"] <= meta["epoch"]]
  if meta.get("entry") and (not history or history[-1]["epoch"] < meta["epoch"]):
    history.append(meta["entry"])  # cut between committing ckpt/last and writing the history
  checkpoint.write_history(workdir, history)
  _log(f"resume: from epoch {meta['epoch'] + 2} (step {int(state.step)}), best SRCC "
       + (f"{best['srcc']:.4f}" if best else "none yet"))
  return state, Progress(meta["epoch"] + 1, best, history)


def train_epoch(train_step, state: TrainState, batches, steps: int, config,
                desc: str) -> tuple[TrainState, dict]:
  """One pass over the epoch's batches -> (state, metrics stacked over steps, on the device)."""
  bar = progress_bar(steps * config.optim.batch_size, desc, config.progress)
  step_metrics = []
  for batch in batches:
    state, m = train_step(state, batch)
    step_metrics.append(m)  # stays on device: no host sync inside the loop
    bar.update(config.optim.batch_size)
    if len(step_metrics) % 20 == 0:  # logging is the one place that syncs
      bar.set_postfix(loss=f"{float(m['loss']):.4f}")
  bar.close()
  return state, jax.tree.map(lambda *m: jnp.stack(m), *step_metrics)


# An epoch source: train(state, epoch) -> (state, metrics stacked over steps), and
# scorer(records) -> scores(params), the scores of those records in their order.
EpochSource = tuple[Callable, Callable[[list], Callable]]


def epochs_from_loader(config, train_step, eval_fn, put, train_recs, pp_str: str,
                       host_batch: int, steps: int) -> EpochSource:
  """Batches from the grain pipeline (files, a prepare cache, a TFDS build or a feature cache),
  one jitted train step per batch, with a progress bar."""
  cache, tfds = _cache(config), tfds_source.build_dir(config.data)

  def train(state, epoch):
    loader = pipeline.make_train_loader(
        train_recs, pp_str, host_batch, seed=config.seed, epoch=epoch, workers=config.data.workers,
        shard_index=jax.process_index(), shard_count=jax.process_count(), cache=cache,
        tfds=tfds)
    return train_epoch(train_step, state, parallel.prefetch_to_device(loader, put, config.prefetch),
                       steps, config, f"epoch {epoch + 1}/{config.optim.epochs}")

  def scorer(records):
    loader = pipeline.make_eval_loader(records, pp_str, config.eval_batch_size,
                                       workers=config.data.workers, cache=cache, tfds=tfds)
    return lambda params: predict(eval_fn, params, loader)
  return train, scorer


def in_memory(config) -> bool:
  """A feature cache's rows are held on the devices ("sharded" mode, one process); pmap and
  multi-process runs read them through the pipeline, batch by batch."""
  return bool(config.data.get("features")) and config.parallel == "sharded" \
      and jax.process_count() == 1


def epochs_in_memory(config, make_step, eval_fn, mesh, train_recs, steps: int,
                     cpu_dots: str | None) -> EpochSource:
  """The head alone on data.features: the rows of the train records sit on the devices and each
  epoch is ONE jitted lax.scan of the train step, over batches gathered there in the loader's
  order (pipeline.epoch_order); a split is scored in one call."""
  optim, folder = config.optim, config.data.features
  table = parallel.put_replicated({"image": features.read_rows(folder, train_recs),
                                   "mos": np.asarray([r.mos for r in train_recs], np.float32)},
                                  mesh)
  epoch_fn = parallel.jit_train_epoch(make_step, mesh, donate=config.donate, cpu_dots=cpu_dots)

  def train(state, epoch):
    order = pipeline.epoch_order(len(train_recs), config.seed, epoch)[:steps * optim.batch_size]
    return epoch_fn(state, table, order.reshape(steps, optim.grad_accum, -1))

  def scorer(records):
    rows = features.read_rows(folder, records)
    return lambda params: np.asarray(eval_fn(params, rows))
  return train, scorer


def check_finite(losses: np.ndarray, epoch: int, steps_per_epoch: int, workdir: Path) -> None:
  """Checked once per epoch, after it (a per-step check would sync the host every step)."""
  if np.all(np.isfinite(losses)):
    return
  first = int(np.argmax(~np.isfinite(losses)))
  raise NonFiniteLossError(
      f"Loss became {losses[first]} at step {epoch * steps_per_epoch + first + 1} (epoch "
      f"{epoch + 1}); stopping. The last good checkpoint is kept in {workdir / 'ckpt'}. Try a "
      f"lower --config.optim.lr or the gated head (App. B: the sigmoid head can collapse on "
      f"large sets).")


def end_epoch(epoch: int, state: TrainState, step_metrics: dict, t0: float, train_s: float,
              progress: Progress, *, config, scores: np.ndarray, val_recs, lr: float, workdir: Path,
              ckpt: checkpoint.RunCheckpoints, labels) -> None:
  """The epoch's bookkeeping: validation metrics, history, best predictions, checkpoints, log."""
  optim = config.optim
  losses = np.asarray(jax.device_get(step_metrics["loss"]), np.float64)
  val = metrics.compute_metrics(scores, [r.mos for r in val_recs])
  entry = {"epoch": epoch, "step": int(state.step), "train_loss": float(losses.mean()),
           "lr": lr, "train_img_per_s": len(losses) * optim.batch_size / max(train_s, 1e-9),
           "val": val, "time_s": time.time() - t0}
  if config.log_grad_norm:
    entry["grad_norm"] = float(np.mean(jax.device_get(step_metrics["grad_norm"])))
  gates = gate_weights(state.params)
  if gates:
    entry["gate_w"] = gates
  # A NaN SRCC (constant predictions) never counts as an improvement.
  improved = math.isfinite(val["srcc"]) and (progress.best is None
                                             or val["srcc"] > progress.best["srcc"])
  # ckpt/last commits the epoch. What comes before it (the best epoch's predictions and
  # checkpoint) a run cut there rewrites, retraining the epoch to the same numbers; what comes
  # after it (history.jsonl) `restore` rebuilds from the entry ckpt/last carries.
  if improved:
    progress.best = {"epoch": epoch, **val}
    write_predictions(workdir / "val_predictions.csv", val_recs, scores)
    ckpt.save(state, labels, "best", {"epoch": epoch, "best": progress.best})
  if config.get("keep_epoch_checkpoints"):
    ckpt.save_epoch(state, labels, epoch)
  ckpt.save(state, labels, "last", {"epoch": epoch, "best": progress.best, "entry": entry})
  progress.history.append(entry)
  checkpoint.write_history(workdir, progress.history)
  _log(f"epoch {epoch + 1:3d}/{optim.epochs}  loss {entry['train_loss']:.4f}  "
       f"val SRCC {val['srcc']:.4f}  PLCC {val['plcc']:.4f}  "
       f"{entry['train_img_per_s']:.1f} img/s  {entry['time_s']:.1f}s"
       + ("  *" if improved else ""))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       restart: bool = False) -> dict:
  """Runs (or resumes) one training run; returns and writes `results.json`.

  The run folder is checked against `config` first (run_folder.open_run): a rerun resumes only
  with a matching config; `restart` clears the folder's run files and starts over.
  """
  parallel.initialize_distributed(config.distributed)
  parallel.enable_compilation_cache(config.compilation_cache)
  workdir = Path(workdir)
  run_folder.open_run(workdir, config, restart=restart)
  optim = config.optim

  # Data.
  splits, skipped = load_data(config)
  train_recs, val_recs = splits["train"], splits["val"]
  mesh = parallel.make_mesh()
  parallel.check_batch_size(optim.batch_size, optim.grad_accum, mesh)
  host_batch = parallel.process_batch_size(optim.batch_size)  # this process's share
  # Each process takes len // process_count records and drops the last partial batch.
  steps_per_epoch = len(train_recs) // jax.process_count() // host_batch
  _log(f"data: {config.data.name}: {len(train_recs)} train / {len(val_recs)} val"
       + (f" / {len(splits['test'])} test" if "test" in splits else ""))

  # Model.
  if config.data.get("features"):  # stored backbone features: the head trains alone
    model, params, pp_str = features.head_only(config)
    features.record_in_run(workdir, config)  # scoring puts the backbone that made them back
    # Batch-sized dots, like the demo tower's where oneDNN lost: 'auto' stays Eigen's (xla_cpu).
    cpu_dots = xla_cpu.choose(mesh.devices.flat, config.get("cpu_dots", "auto"))
  else:
    model, params, preprocessing = create_model(config)
    pp_str = pp.run_pp(config.data, preprocessing)
    cpu_dots = xla_cpu.choose(mesh.devices.flat, config.get("cpu_dots", "auto"), params)
  if config.compilation_cache and (note := xla_cpu.cache_note(cpu_dots)):
    _log(note)
  _log(f"model: {config.model.backbone} ({config.model.init or 'random init'}), head "
       f"{config.model.head}, finetune {config.model.finetune}; pp: {pp_str}")

  # Optimizer.
  tx, labels = make_optimizer(config, params, steps_per_epoch)
  lr_at = lr_schedule(optim.lr, optim, steps_per_epoch, resolve_schedule(config))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(config.seed + 1))
  _log("params: " + ", ".join(f"{k} {v:,}" for k, v in sorted(count_by_label(params,
                                                                             labels).items())))

  # Restore.
  ckpt = checkpoint.RunCheckpoints(workdir, save_frozen=not config.model.init)
  try:  # closed however the run ends (Ctrl-C too): no orbax threads left behind
    state, progress = restore(ckpt, state, labels, workdir)
    record_data(workdir, splits, skipped)

    # Step.
    mode = config.parallel
    state = parallel.put_state(state, labels, mesh, config.model.param_dtype)
    make_step = functools.partial(
        make_train_step, model, tx, labels, grad_accum=optim.grad_accum,
        margin_lambda=config.loss.margin_lambda, margin_weight=config.loss.margin_weight,
        margin_form=config.loss.get("margin_form", "eq1"), with_grad_norm=config.log_grad_norm,
        fuse_micro_batches=bool(config.data.get("features")))  # the head alone: one pass per step
    eval_fn = parallel.jit_eval_step(make_eval_step(model), mesh, cpu_dots)
    if in_memory(config):
      train, scorer = epochs_in_memory(config, make_step, eval_fn, mesh, train_recs,
                                       steps_per_epoch, cpu_dots)
    else:
      train_step = parallel.jit_train_step(
          make_step, mesh, mode, donate=config.donate, cpu_dots=cpu_dots,
          split_layers=split_layers_for(config.model, state.params, labels, mesh))
      put = functools.partial(parallel.put_batch, mesh=mesh, mode=mode,
                              grad_accum=optim.grad_accum, keys=("image", "mos"))
      train, scorer = epochs_from_loader(config, train_step, eval_fn, put, train_recs, pp_str,
                                         host_batch, steps_per_epoch)
    val_scores = scorer(val_recs)

    # Epochs.
    for epoch in range(progress.start_epoch, optim.epochs):
      t0 = time.time()
      state, step_metrics = train(state, epoch)
      check_finite(np.asarray(jax.device_get(step_metrics["loss"]), np.float64), epoch,
                   steps_per_epoch, workdir)  # waits for the epoch's last step
      train_s = time.time() - t0  # the img/s of the log: training only, not validation
      end_epoch(epoch, state, step_metrics, t0, train_s, progress, config=config,
                scores=val_scores(state.params), val_recs=val_recs,
                lr=float(lr_at(epoch * steps_per_epoch)), workdir=workdir, ckpt=ckpt, labels=labels)

    # Test.
    results = summarize(config, progress, splits, len(skipped))
    if results["status"] == "done" and splits.get("test"):
      best_state = ckpt.restore_best(state, labels) or state
      test_scores = scorer(splits["test"])(best_state.params)
      results["test"] = metrics.compute_metrics(test_scores, [r.mos for r in splits["test"]])
    run_folder.write_json(workdir / run_folder.RESULTS, results)
  finally:
    ckpt.close()
  return results


def summarize(config, progress: Progress, splits: dict, n_skipped: int) -> dict:
  """results.json: the best and final validation metrics; a run whose validation SRCC was NaN
  in every epoch (constant predictions) is recorded as failed, with why."""
  final = progress.history[-1]["val"] if progress.history else {}
  results = {
      "name": config.name, "dataset": config.data.name, "backbone": config.model.backbone,
      "head": config.model.head, "finetune": config.model.finetune, "seed": config.seed,
      "epochs": config.optim.epochs, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
      "n_skipped": n_skipped, "best": progress.best,
      "final": {"epoch": config.optim.epochs - 1, **final}, "test": None, "status": "done",
  }
  if progress.best is None:
    results["status"] = "failed"
    results["error"] = (
        f"validation SRCC was NaN in all {len(progress.history)} epochs: the model predicts one "
        f"constant score (App. B: the sigmoid head can collapse); no ckpt/best was saved. Try "
        f"the gated head or a lower --config.optim.lr.")
  return results


def _cache(config) -> str | None:
  """The folder batches are read from: a feature cache, a prepare cache, or None (the files)."""
  return config.data.get("features") or config.data.cache or None


def write_predictions(path: Path, records, scores) -> None:
  """Per-image predictions of the best epoch (for scatter plots and error analysis)."""
  run_folder.write_csv(path, ("path", "mos", "pred"),
                       ([r.path, f"{r.mos:.6f}", f"{float(s):.6f}"]
                        for r, s in zip(records, scores, strict=True)))


def print_results_table(results: dict) -> None:
  if results["status"] != "done":
    print(f"\nrun failed: {results.get('error', results['status'])}", flush=True)
    return
  b, f = results["best"], results["final"]
  rows = [("best", b["epoch"] + 1, b["srcc"], b["plcc"]),
          ("final", f["epoch"] + 1, f["srcc"], f["plcc"])]
  if results.get("test"):
    rows.append(("test", b["epoch"] + 1, results["test"]["srcc"], results["test"]["plcc"]))
  print(f"\n| {results['dataset']} ({results['head']} head, seed {results['seed']}) "
        f"| epoch | SRCC | PLCC |")
  print("|---|---|---|---|")
  for name, ep, s, p in rows:
    print(f"| {name} | {ep} | {s:.4f} | {p:.4f} |")
  print(flush=True)
