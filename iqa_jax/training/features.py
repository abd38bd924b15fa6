"""The feature cache: a backbone run once over a dataset, so heads train on its rows in seconds.

Files, fingerprint, resuming and the command: iqa_jax/features.py (python -m iqa_jax.features).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iqa_jax import xla_cpu
from iqa_jax.data import cache as cache_lib
from iqa_jax.data import pipeline, pp
from iqa_jax.models.head import QualityHead
from iqa_jax.models.model import HEAD_FIELDS, create_model, head_from_config, init_params
from iqa_jax.runs import backbone
from iqa_jax.runs import folder as run_folder
from iqa_jax.training.progress import progress_bar

FEATURES, INDEX, PROGRESS = "features.npy", "index.json", "progress.json"
# Fields of config.model / config.data that decide the feature an image gets.
# Every config.model field decides the feature except these, which shape only the head or how
# training runs (a field added later counts until it is listed here: a cache is then refused
# rather than silently reused for a backbone that computes something else).
HEAD_AND_TRAINING_KEYS = HEAD_FIELDS + ("finetune", "lora", "remat", "scan", "scan_unroll",
                                         "attention")
DATA_KEYS = ("image_size", "pp", "normalize_on_device")


class FeatureHeadModel(nn.Module):
  """Stored feature -> (score, out): IQAModel with the backbone's work already done.

  The submodule is named 'head' as in IQAModel, so the same seed initialises the same head."""
  head: QualityHead

  def __call__(self, feature, train: bool = False):
    score, out = self.head(feature, train=train)
    return score, {"feature": feature, **out}


def fingerprint(config: ml_collections.ConfigDict, source_run: str | None = None,
                source_weights: str | None = None) -> dict:
  """What makes two feature caches interchangeable; a random-init backbone depends on the seed,
  another run's backbone on that run's trained weights (their digest)."""
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
  fp = {f"model.{k}": v for k, v in sorted(model.items()) if k not in HEAD_AND_TRAINING_KEYS}
  fp.update({f"data.{k}": data.get(k) for k in DATA_KEYS})
  if not model.get("init") and not source_run:
    fp["seed"] = int(config.seed)
  fp["source_run"] = source_run
  if source_run:
    fp["source_weights"] = source_weights
  return json.loads(json.dumps(fp))  # tuples -> lists, as index.json reads back


def read_index(folder: str | Path) -> dict:
  """A finished feature cache's index.json, or one line saying what the folder is instead."""
  path = Path(folder) / INDEX
  if not path.is_file() and (Path(folder) / PROGRESS).is_file():
    raise ValueError(f"{folder} is an unfinished feature cache (extraction was stopped; "
                     f"{PROGRESS}, no {INDEX}): rerun python -m iqa_jax.features with the same "
                     f"--config and --out {folder} to finish it.")
  if not path.is_file():
    raise FileNotFoundError(f"{folder} is not a feature cache (no {INDEX}); build it with "
                            "python -m iqa_jax.features --config CFG --out FOLDER.")
  index = run_folder.read_json(path, f"Delete {folder} and rebuild it with python -m "
                               "iqa_jax.features.")
  if index.get("kind") != "features":
    raise ValueError(f"{folder} is a prepare (image) cache, not a feature cache: pass it as "
                     "--config.data.cache, or build features with python -m iqa_jax.features.")
  return index


def _short(value) -> str:
  """repr of a field, a long list (the cache's MOS values) as its length and first items."""
  if isinstance(value, list) and len(repr(value)) > 80:
    return f"[{', '.join(map(repr, value[:3]))}, ...] ({len(value)} values)"
  return repr(value)


def _mismatch(stored: dict, wanted: dict) -> str | None:
  """The first field that differs (inside a nested dict, the field within it), shortly."""
  for k in sorted(set(stored) | set(wanted)):
    a, b = stored.get(k), wanted.get(k)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        return _mismatch(a, b)
      return f"{k} is {_short(a)} in the cache but {_short(b)} here"
  return None


def check_covers(folder: str | Path, records) -> None:
  """Every record is in the cache, or one line: a cache of a subset (another distortion list,
  another data_dir) would otherwise train on the subset only, since a record the cache lacks
  reads as unreadable and data.on_error=skip drops it."""
  index = read_index(folder)
  held = set(index["paths"])
  missing = [r.path for r in records if r.path not in held]
  if len(missing) > int(index.get("n_skipped", 0)):  # more than extraction itself skipped
    raise ValueError(
        f"{len(missing)} of {len(records)} records (e.g. {missing[0]}) are not in the feature "
        f"cache {folder} ({len(held)} images of {index.get('dataset')}): it was built for other "
        f"records (a subset, other data options or data.dir). Build a cache for this config with "
        f"python -m iqa_jax.features --config ... --out NEW_FOLDER.")


def head_only(config: ml_collections.ConfigDict) -> tuple[FeatureHeadModel, dict, str]:
  """config with data.features -> (head-only model, params {'head'}, pp string '').

  The head's init equals create_model's for the same seed (same module path, same key)."""
  folder = config.data.features
  if config.model.get("adapter") is not None:
    raise ValueError(f"--config.data.features={folder}: {config.model.backbone}'s "
                     "config.model.adapter trains with the head in every mode, and a feature cache "
                     "would hold it fixed; train end to end (drop data.features).")
  if config.model.finetune != "frozen":
    raise ValueError(f"--config.data.features={folder} trains the head on stored backbone "
                     "features: set --config.model.finetune=frozen (or drop data.features).")
  index = read_index(folder)
  stored, wanted = index["fingerprint"], fingerprint(config)
  if stored.get("source_run") is not None:  # another run's backbone: only the data must match
    stored, wanted = ({k: v for k, v in fp.items() if k.startswith("data.")}
                      for fp in (stored, wanted))
  problem = _mismatch(stored, wanted)
  if problem:
    raise ValueError(f"--config.data.features={folder} was built for another backbone: "
                     f"{problem}. Rebuild it with python -m iqa_jax.features for this config.")
  model = FeatureHeadModel(head=head_from_config(config.model))
  dummy = jnp.zeros((1, index["dim"]), jnp.float32)
  return model, init_params(model, dummy, jax.random.PRNGKey(config.seed)), ""


def read_rows(folder: str, records) -> np.ndarray:
  """The cache's float32 rows of `records`, in their order, in memory: (len(records), d)."""
  return cache_lib.open_cache(folder, [r.path for r in records], "").to_array()


def record_in_run(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
  """RUN/features.json: the fingerprint and pp of the cache config.data.features, so the run is
  scored with the backbone that made its features. A run with epochs done must find the same."""
  index = read_index(config.data.features)
  record = {"features": str(Path(config.data.features).absolute()),
            **{k: index[k] for k in ("fingerprint", "pp", "dim")}}
  path = Path(workdir) / backbone.RUN_RECORD
  if path.is_file() and run_folder.has_progress(workdir):
    held = run_folder.read_json(path, "Restore it, or start over with --restart.")
    problem = _mismatch({k: held.get(k) for k in record if k != "features"},
                        {k: v for k, v in record.items() if k != "features"})
    if problem:
      raise run_folder.RunFolderError(
          f"{path}: this run was trained on features of another backbone than "
          f"{config.data.features} now holds ({problem}); its head fits only those. Put that "
          f"cache back, or start over with --restart.")
  run_folder.write_json(path, record)


def _as_vector(x: jax.Array) -> jax.Array:
  """A tap -> one vector per image: tokens (B, T, D) and maps (B, H, W, C) are averaged."""
  x = x.astype(jnp.float32)
  return x if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)


def _write_json(path: Path, obj) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj))
  os.replace(tmp, path)


def extract_features(config: ml_collections.ConfigDict, out: str, *, workdir: str | None = None,
                     taps: Sequence[str] = (), batch_size: int = 32, flush_every: int = 20,
                     progress: bool = True) -> Path:
  """Writes the feature cache `out` for every (checked) record of config.data; returns it.

  A finished cache of the same fingerprint, records and taps is left as is; a partial one is
  continued; a cache of anything else stops with an error rather than being overwritten."""
  folder = Path(out)
  source = str(Path(workdir).absolute()) if workdir else None
  if workdir is None:
    model, params, preprocessing = create_model(config)
    digest = None
  else:
    weights, digest = backbone.backbone_weights(workdir)
    config, model, params, preprocessing = backbone.run_backbone(config, workdir, weights)
  records, skipped = pipeline.check_records(pipeline.load_records(config.data),
                                            on_error=config.data.on_error,
                                            cache=config.data.cache or None)
  pp_str = pp.run_pp(config.data, preprocessing)
  want = {"kind": "features", "array": FEATURES, "fingerprint": fingerprint(config, source, digest),
          "pp": pp_str, "taps": list(taps), "paths": [r.path for r in records],
          "mos": [float(r.mos) for r in records], "dataset": config.data.name}
  for name in (INDEX, PROGRESS):
    if (folder / name).is_file():
      held = run_folder.read_json(folder / name, "Choose another --out or delete that folder.")
      if held.get("kind") != "features":
        raise ValueError(f"{folder} holds a prepare (image) cache ({name}), not a feature cache; "
                         "choose another --out.")
      held_want = {k: held.get(k) for k in want}
      if held_want != want:
        problem = _mismatch({k: held.get(k) for k in want if k != "paths"},
                            {k: v for k, v in want.items() if k != "paths"}) or "other images"
        raise ValueError(f"{folder} already holds a feature cache of something else ({problem}); "
                         "choose another --out or delete that folder.")
      if name == INDEX:
        print(f"{folder}: up to date ({len(records)} features)")
        return folder
  folder.mkdir(parents=True, exist_ok=True)
  done = json.loads((folder / PROGRESS).read_text())["done"] if (folder / PROGRESS).is_file() else 0

  @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options(
      jax.local_devices(), config.get("cpu_dots", "auto"), params, "eval"))
  def forward(params, images):
    _, out_ = model.apply({"params": params}, images, train=False)
    for t in taps:
      if t not in out_:
        raise ValueError(f"--taps {t}: the backbone's intermediates are {sorted(out_)}")
    return [_as_vector(out_["feature"])] + [_as_vector(out_[t]) for t in taps]

  loader = pipeline.make_eval_loader(records[done:], pp_str, batch_size,
                                     workers=config.data.workers, cache=config.data.cache or None)
  arrays, t0, n_new = None, time.time(), 0
  bar = progress_bar(len(records), "features", progress)
  bar.update(done)
  for i, batch in enumerate(loader):
    outs = [np.asarray(o)[np.asarray(batch["valid"])] for o in forward(params, batch["image"])]
    if arrays is None:
      names = [FEATURES] + [f"taps/{t}.npy" for t in taps]
      (folder / "taps").mkdir(exist_ok=True)
      arrays = [np.lib.format.open_memmap(folder / (n + ".partial"), mode="r+" if done else "w+",
                                          dtype=np.float32, shape=(len(records), o.shape[1]))
                for n, o in zip(names, outs, strict=True)]
    start = done + n_new
    for a, o in zip(arrays, outs, strict=True):
      a[start:start + len(o)] = o
    n_new += len(outs[0])
    bar.update(len(outs[0]))
    if (i + 1) % flush_every == 0:  # rows before `done` are on disk: a rerun starts after them
      for a in arrays:
        a.flush()
      _write_json(folder / PROGRESS, {**want, "done": done + n_new})
  bar.close()
  dim = None
  for n, a in zip([FEATURES] + [f"taps/{t}.npy" for t in taps], arrays or [], strict=False):
    a.flush()
    dim = dim or a.shape[1]
    os.replace(folder / (n + ".partial"), folder / n)
  if dim is None:  # nothing left to compute: the rows are already complete
    dim = np.load(folder / FEATURES, mmap_mode="r").shape[1]
  _write_json(folder / INDEX, {**want, "dim": int(dim), "n_skipped": len(skipped)})
  (folder / PROGRESS).unlink(missing_ok=True)
  rate = n_new / max(time.time() - t0, 1e-9)
  print(f"{len(records)} features (d={dim}, {len(skipped)} skipped) -> {folder / FEATURES} "
        f"({rate:.0f} img/s)")
  return folder


def cache_for_frozen_run(config: ml_collections.ConfigDict, root: str | Path
                         ) -> ml_collections.ConfigDict:
  """A frozen run's config reading a feature cache under `root`, built on first use (the run
  matrix's frozen runs: one backbone pass per dataset, not one per epoch). Others, and backbones
  with a `config.model.adapter` that trains in every mode (cleandift): unchanged."""
  if config.model.get("finetune") != "frozen" or config.data.get("features"):
    return config
  if config.model.get("adapter") is not None:  # it trains in every mode (cleandift)
    return config
  data = config.data.to_dict()
  key = json.dumps([fingerprint(config), data["name"], data["dir"], data.get("options")],
                   sort_keys=True, default=str)
  folder = Path(root) / f"{data['name']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
  extract_features(config, str(folder), progress=config.get("progress", True))
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.features = str(folder)
  return config
