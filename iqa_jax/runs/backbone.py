"""Which backbone sits under a run's head: a run trained on a feature cache records in
RUN/features.json the cache's fingerprint (the backbone that made the features, or the run whose
trained backbone did) and its pp, so scoring puts that backbone back (`scoring_backbone`)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import ml_collections
import numpy as np

from iqa_jax.data import pp
from iqa_jax.models.model import HEAD_FIELDS, create_model
from iqa_jax.runs import checkpoint
from iqa_jax.runs import folder as run_folder

RUN_RECORD = "features.json"  # in a run folder: the fingerprint of the cache it trained on


def weights_digest(flat: dict) -> str:
  """sha256 of named weights (names, dtypes, shapes, values): tells two trainings apart."""
  h = hashlib.sha256()
  for k in sorted(flat):
    v = np.ascontiguousarray(flat[k])
    h.update(f"{k}:{v.dtype}:{v.shape}:".encode() + v.tobytes())
  return h.hexdigest()[:16]


def backbone_weights(workdir: str) -> tuple[dict, str]:
  """-> (the trained backbone leaves of run `workdir`'s ckpt/best, their weights_digest)."""
  flat, _ = checkpoint.load_params(workdir, "best")
  backbone = {k: v for k, v in flat.items() if k.startswith("backbone" + checkpoint.SEP)}
  return backbone, weights_digest(backbone)


def run_backbone(config: ml_collections.ConfigDict, workdir: str, weights: dict):
  """Run `workdir`'s backbone with its trained `weights` over config.data, under a fresh head of
  config.model -> (config of that model, model, params, preprocessing)."""
  run = run_folder.read_config(workdir)
  run.data = config.data  # the run's backbone over the dataset this config names
  run.model.update({k: config.model[k] for k in HEAD_FIELDS if k in config.model})
  run_folder.check_base_checkpoint(workdir, run)
  model, params, preprocessing = create_model(run)
  return run, model, checkpoint.unflatten_into(params, weights), preprocessing


def scoring_backbone(workdir: str | Path, config: ml_collections.ConfigDict):
  """A run trained on a feature cache -> (config, model, params, preprocessing) of the model that
  scores images: the backbone that made its features (rebuilt from the run's config, seed
  included, or the source run's trained one) under the run's head (weights: the caller's)."""
  path = Path(workdir) / RUN_RECORD
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: {workdir} was trained on the feature cache {config.data.features} "
        f"but does not record which backbone made it, so it cannot be scored; retrain it with "
        f"--restart.")
  record = run_folder.read_json(path, "Restore it, or retrain the run with --restart.")
  source = record["fingerprint"].get("source_run")
  if source is None:
    run_folder.check_base_checkpoint(workdir, config)
    model, params, preprocessing = create_model(config)
  else:
    if not (Path(source) / run_folder.CONFIG).is_file() or not run_folder.saved_steps(
        Path(source) / "ckpt" / "best"):
      raise FileNotFoundError(
          f"{workdir}'s head was trained on features of the run {source}, which is missing "
          f"(no {run_folder.CONFIG} or ckpt/best there): put that run back at that path to "
          f"score it, or train the head on a cache of a backbone you have.")
    weights, digest = backbone_weights(source)
    if digest != record["fingerprint"].get("source_weights"):
      raise run_folder.RunFolderError(
          f"{workdir}'s head was trained on features of the run {source}, whose backbone "
          f"weights (ckpt/best) are no longer the ones that made them; the head fits only "
          f"those. Restore that run, or rebuild the cache (python -m iqa_jax.features "
          f"--workdir {source}) and retrain the head.")
    config, model, params, preprocessing = run_backbone(config, source, weights)
  pp_str = pp.run_pp(config.data, preprocessing)
  if pp_str != record["pp"]:
    raise ValueError(f"{path}: the features were made with pp {record['pp']!r}, but the "
                     f"backbone rebuilt from {workdir}'s config reads images with {pp_str!r}.")
  return config, model, params, preprocessing
