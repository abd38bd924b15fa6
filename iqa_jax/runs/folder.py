"""The run folder as a contract: what a run was made with, checked before anything is changed.

A run folder records `config.json` (the config it was trained with) and `base_checkpoint.json`
(the pretrained weights it started from: `config.model.init`, the folder it resolved to, and a
fingerprint of the weights). A rerun continues only when its config matches; fields that only
change how the run executes may differ, and `optim.epochs` may grow. Scoring, evaluating and
resuming all check the base checkpoint, so frozen weights are never mixed with LoRA/head weights
trained on top of others. Every JSON/CSV is written by one process, atomically.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import jax
import ml_collections

CONFIG, BASE, RESULTS, HISTORY = "config.json", "base_checkpoint.json", "results.json", \
    "history.jsonl"
# What `--restart` clears: everything a training run writes or derives from its checkpoints.
RUN_FILES = (CONFIG, BASE, RESULTS, HISTORY, "splits.json", "skipped.csv", "val_predictions.csv",
             "ckpt", "cross", "features.json")

# Fields that change how a run executes, never what it computes: a resume may change them.
EXECUTION_ONLY = ("progress", "data.workers", "prefetch", "compilation_cache", "eval_batch_size",
                  "data.cache", "donate", "distributed", "keep_epoch_checkpoints", "cpu_dots",
                  "model.scan_unroll")


class RunFolderError(ValueError):
  """A run folder that does not fit the command: one line naming the file and the way out."""


def is_writer() -> bool:
  """Only process 0 writes run files (multi-host: every process runs the same loop)."""
  return jax.process_index() == 0


def write_text(path: str | Path, text: str) -> None:
  """Atomically (temp file in the same folder + os.replace); a no-op on processes other than 0."""
  if not is_writer():
    return
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _strict(obj):
  """NaN/Inf -> None: results files stay strict JSON, with null for an undefined metric (the
  SRCC of constant predictions). history.jsonl keeps Python's NaN for the plots."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_strict(v) for v in obj]
  return obj


def write_json(path: str | Path, obj) -> None:
  write_text(path, json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, header: Iterable[str], rows: Iterable[Iterable]) -> None:
  import io
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(rows)
  write_text(path, buf.getvalue())


def read_json(path: str | Path, fix: str = ""):
  """A JSON file; a cut or corrupt one is one line naming it and what to do."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunFolderError(f"{path} is not valid JSON ({e}); it was cut or corrupted. "
                         f"{fix or 'Delete it or restore it from a backup.'}") from None


def read_jsonl(path: str | Path, fix: str = "") -> list[dict]:
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}:{n} is not valid JSON ({e}); it was cut or corrupted. "
                             f"{fix or 'Delete it or restore it from a backup.'}") from None
  return rows


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was trained with (score, evaluate and the run matrix build from it)."""
  f = Path(workdir) / CONFIG
  if not f.exists():
    raise FileNotFoundError(f"{f} not found: --workdir must be a run folder made by "
                            f"`python -m iqa_jax.train`")
  recorded = read_json(f, "Restore it from a backup, or retrain with "
                          "`python -m iqa_jax.train ... --restart`.")
  if not isinstance(recorded, dict) or "format_version" in recorded:  # an export's config.json
    raise RunFolderError(f"{workdir} is an exported model, not a run folder (its {CONFIG} has no "
                         f"training config): --workdir takes the folder `python -m iqa_jax.train` "
                         f"wrote; score an export with `python -m iqa_jax.score --model "
                         f"{workdir}`.")
  return ml_collections.ConfigDict(recorded)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_json(config) -> dict:
  """Tuples as lists, as config.json holds them."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


def config_differences(recorded: dict, new: ml_collections.ConfigDict) -> list[str]:
  """Fields (dotted) whose values differ, execution-only fields and `optim.epochs` left out.
  A field one side lacks counts as its default (a folder made before the field existed)."""
  from iqa_jax.defaults import base_config
  default, old, now = _flat(_as_json(base_config())), _flat(_as_json(recorded)), \
      _flat(_as_json(new))
  skip = set(EXECUTION_ONLY) | {"optim.epochs"}
  keys = (set(old) | set(now)) - skip
  missing = object()
  return sorted(k for k in keys
                if old.get(k, default.get(k, missing)) != now.get(k, default.get(k, missing)))


def saved_steps(ckpt_dir: str | Path) -> bool:
  """True when an orbax checkpoint folder holds a saved step (the folder alone is made early)."""
  d = Path(ckpt_dir)
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def has_progress(workdir: str | Path) -> bool:
  """True once the run folder holds anything training produced."""
  w = Path(workdir)
  return ((w / RESULTS).exists() or bool((w / HISTORY).exists() and (w / HISTORY).stat().st_size)
          or saved_steps(w / "ckpt" / "last") or saved_steps(w / "ckpt" / "best"))


def clear(workdir: str | Path) -> None:
  """--restart: the run's own files go; anything else in the folder stays."""
  if not is_writer():
    return
  w = Path(workdir)
  for name in RUN_FILES:
    p = w / name
    if p.is_dir():
      shutil.rmtree(p)
    elif p.exists():
      p.unlink()


def fingerprint(folder: str | Path) -> str:
  """sha256 over each *.safetensors file's name, size and header (every tensor's name, dtype,
  shape and byte range), plus 64 bytes from the start, middle and end of every tensor's data.

  Reading all the weights would cost seconds per resume or score at SO400M size (GBs); the
  header alone cannot tell two fine-tunes of one architecture apart (same names, shapes,
  offsets). Training changes essentially every weight, so a few bytes of every tensor separate
  any two checkpoints one would plausibly swap, for ~100 bytes of I/O per tensor."""
  h = hashlib.sha256()
  files = sorted(Path(folder).glob("*.safetensors"))
  for f in files:
    size = f.stat().st_size
    with open(f, "rb") as fh:
      (n,) = struct.unpack("<Q", fh.read(8))
      header = fh.read(n)
      h.update(f"{f.name}:{size}:".encode() + header)
      try:
        tensors = json.loads(header)
      except (json.JSONDecodeError, UnicodeDecodeError):
        continue  # hashed as bytes; loading the weights reports the corruption
      for name in sorted(k for k in tensors if k != "__metadata__"):
        start, end = tensors[name]["data_offsets"]
        for at in {start, max(start, (start + end) // 2 - 32), max(start, end - 64)}:
          fh.seek(8 + n + at)
          h.update(fh.read(min(64, end - at)))
  return h.hexdigest()[:16] if files else ""


def base_checkpoint(config) -> dict:
  """{init, folder, fingerprint} of config.model.init; {init: None} for a random init.
  A missing checkpoint has folder None (its loader says how to get it)."""
  init = config.model.get("init")
  if not init:
    return {"init": None}
  from iqa_jax.models import hf_io
  try:
    folder = hf_io.resolve_checkpoint(init)
  except FileNotFoundError:
    return {"init": init, "folder": None, "fingerprint": None}
  return {"init": init, "folder": str(folder.absolute()), "fingerprint": fingerprint(folder)}


def _describe(base: dict) -> str:
  if base.get("folder") is None:
    return f"{base['init']} (missing)"
  return f"{base['folder']} (fingerprint {base['fingerprint']})"


def check_base_checkpoint(workdir: str | Path, config) -> None:
  """The run's recorded base weights are still what `config.model.init` holds, or one line."""
  f = Path(workdir) / BASE
  if not f.exists() or not config.model.get("init"):
    return
  recorded = read_json(f, "Restore it from a backup, or retrain with --restart.")
  now = base_checkpoint(config)
  if now.get("folder") is None or now["fingerprint"] != recorded.get("fingerprint"):
    raise RunFolderError(
        f"{workdir} was trained from base checkpoint {_describe(recorded)}, but "
        f"config.model.init now gives {_describe(now)}; its trained weights only fit the former. "
        f"Put that checkpoint back, or train a new run (--restart or another --workdir).")


def _start_over(workdir: Path) -> str:
  return (f"train a new run: add --restart (clears {workdir}'s run files) or pass another "
          f"--workdir")


def check_config(workdir: str | Path, config) -> None:
  """`config` may resume the run recorded in workdir/config.json, or one line naming the fields
  that differ (execution-only fields and optim.epochs aside)."""
  w = Path(workdir)
  recorded = read_json(w / CONFIG, f"Restore it, or {_start_over(w)}.")
  diff = config_differences(recorded, config)
  if diff:
    shown = [f"{k} ({_get(recorded, k)!r} -> {_get(_as_json(config), k)!r})" for k in diff[:8]]
    raise RunFolderError(
        f"{w / CONFIG}: this run was made with another config; differing fields: "
        f"{', '.join(shown)}{' ...' if len(diff) > 8 else ''}. To resume, pass the recorded "
        f"values; to start over, {_start_over(w)}.")


def open_run(workdir: str | Path, config, restart: bool = False) -> None:
  """Checks the folder against `config` (nothing is written when it refuses), then records the
  config and the base checkpoint. Called once, before a run reads data or builds a model."""
  w = Path(workdir)
  fix = _start_over(w)
  if restart:
    clear(w)
    if jax.process_count() > 1:  # the others look at the folder only once process 0 cleared it
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("iqa_jax.run_folder.clear")
  progress = has_progress(w)
  if progress:
    if not (w / CONFIG).exists():
      raise RunFolderError(f"{w / CONFIG} is missing, so {w}'s results cannot be matched to this "
                           f"config. Restore it, or {fix}.")
    check_config(w, config)
    check_base_checkpoint(w, config)
    finished = len(read_jsonl(w / HISTORY, f"Restore it, or {fix}."))
    if config.optim.epochs < finished:
      raise RunFolderError(
          f"{w / HISTORY}: {finished} epochs are already trained, more than "
          f"config.optim.epochs={config.optim.epochs}; pass --config.optim.epochs={finished} or "
          f"more to resume or extend, or {fix}.")
    # ckpt/best alone is a first epoch cut before ckpt/last committed it (training/loop.py)
    if not saved_steps(w / "ckpt" / "last") and (finished or (w / RESULTS).exists()):
      raise RunFolderError(
          f"{w / 'ckpt' / 'last'} is missing but {w} holds results of a trained run; training "
          f"again would overwrite them with a fresh model. Restore the checkpoint, or {fix}.")
  w.mkdir(parents=True, exist_ok=True)
  write_text(w / CONFIG, config.to_json_best_effort(indent=2))
  if not progress or not (w / BASE).exists():
    write_json(w / BASE, base_checkpoint(config))


def _get(tree: dict, dotted: str):
  for k in dotted.split("."):
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def training_summary(workdir: str | Path) -> dict:
  """What a run folder holds, for a model card or a report: {'status' ('done', 'failed' or
  'unfinished': no results.json yet, killed or still training), 'epochs_done',
  'epochs_planned', 'best' ({'epoch' (0-based), 'srcc', 'plcc', ...} or None), 'best_from'
  (the file it was read from), 'features' (for a head trained on a feature cache: the cache
  folder, backbone, init and source run that made its features; else None)}.

  An unfinished run's best epoch is the one with the highest finite validation SRCC in
  history.jsonl, the rule training keeps ckpt/best by."""
  w = Path(workdir)
  config = read_config(w)
  history = read_jsonl(w / HISTORY, "Restore it from a backup.")
  results = read_json(w / RESULTS) if (w / RESULTS).is_file() else None
  if results is not None:
    best, best_from, status = results.get("best"), str(w / RESULTS), results.get("status")
  else:
    finite = [h for h in history if isinstance(h.get("val", {}).get("srcc"), float)
              and math.isfinite(h["val"]["srcc"])]
    top = max(finite, key=lambda h: h["val"]["srcc"], default=None)  # the first of equals
    best = {"epoch": top["epoch"], **top["val"]} if top else None
    best_from, status = str(w / HISTORY), "unfinished"
  source = None
  if (w / "features.json").is_file():
    record = read_json(w / "features.json")
    fp = record.get("fingerprint", {})
    source = {"cache": record.get("features"), "backbone": fp.get("model.backbone"),
              "init": fp.get("model.init"), "seed": fp.get("seed"),
              "source_run": fp.get("source_run")}
  return {"status": status, "epochs_done": len(history), "epochs_planned": config.optim.epochs,
          "best": best, "best_from": best_from, "features": source}


def describe_training(summary: dict) -> list[str]:
  """training_summary as lines for a model card: an unfinished run says so, and a head on a
  feature cache names the backbone (or source run) its features came from."""
  lines = []
  if summary["status"] != "done":
    lines.append(f"**{summary['status']}**: {summary['epochs_done']} of "
                 f"{summary['epochs_planned']} epochs trained"
                 + (" (no results.json: killed, or still training)"
                    if summary["status"] == "unfinished" else ""))
  best = summary["best"]
  if best:
    lines.append(f"best epoch {best['epoch'] + 1}: val SRCC {best['srcc']:.4f}, PLCC "
                 f"{best['plcc']:.4f} (from {Path(summary['best_from']).name})")
  else:
    lines.append(f"no finite validation SRCC in {Path(summary['best_from']).name}")
  f = summary["features"]
  if f:
    made_by = (f"the trained backbone of run {f['source_run']}" if f["source_run"] else
               f"{f['backbone']} " + (f"from {f['init']}" if f["init"] else
                                      f"(random init, seed {f['seed']})"))
    lines.append(f"head trained on the feature cache {f['cache']}, features made by {made_by}")
  return lines
