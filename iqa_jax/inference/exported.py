"""Export a trained run as one self-contained folder:

python -m iqa_jax.export --workdir RUN --out MODEL_DIR [--which best|last]
                         [--dtype float32|bfloat16] [--merge-lora/--no-merge-lora]

MODEL_DIR holds `model.safetensors` (backbone and head; each LoRA update folded into its base
weight, W + (alpha/r) A B, unless --no-merge-lora), `config.json` (architecture, head,
preprocessing, test-time view, MOS scale, format version) and a model card `README.md`.
Loading it (`Scorer.from_pretrained(MODEL_DIR)`) needs neither the base checkpoint nor torch.
MODEL_DIR must be new, empty, or an earlier export (config.json's written_by); anything else is
refused before the run is read.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iqa_jax.data import pp
from iqa_jax.inference.loaded import VIEWS, LoadedModel, load_run
from iqa_jax.models.lora import LORA_MODES
from iqa_jax.runs import checkpoint
from iqa_jax.runs import folder as run_folder

FORMAT_VERSION = 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
WRITTEN_BY = "iqa_jax.export"  # config.json's marker: a folder export may replace
# config.json's keys before the marker was written (kept replaceable: exactly this schema).
_LEGACY_KEYS = {"format_version", "model", "preprocessing", "pp", "input_size", "view",
                "mos_scale", "dataset", "lora", "weights_dtype", "source"}


class ExportError(ValueError):
  """An exported folder that cannot be loaded; the message names the file and the tensor."""


def merge_lora(params: dict, alpha: float, rank: int) -> dict:
  """Every LoraDense {kernel, lora_a, lora_b} -> {kernel + (alpha/rank) a @ b}, LoRA leaves
  dropped; works on scan-stacked layers too. Computed in float64, stored in the kernel's dtype."""
  def walk(node):
    if not isinstance(node, dict):
      return node
    node = {k: walk(v) for k, v in node.items()}
    if {"kernel", "lora_a", "lora_b"} <= node.keys():
      kernel = np.asarray(node["kernel"])
      a = np.asarray(node.pop("lora_a"), np.float64)
      b = np.asarray(node.pop("lora_b"), np.float64)
      node["kernel"] = (kernel.astype(np.float64) + (alpha / rank) * (a @ b)).astype(kernel.dtype)
    return node
  return walk(jax.device_get(params))


def _any_variant(family: str, variant: str) -> str:
  """A variant name the family's build accepts; `arch` then sets every field of it."""
  from iqa_jax.models.model import BACKBONES
  variants = getattr(importlib.import_module(BACKBONES[family].__module__), "VARIANTS", {})
  return variant if not variants or variant in variants else next(iter(variants))


def exported_model_config(run_model_config: dict, module, merged: bool) -> dict:
  """The run's config.model, made self-contained: no base checkpoint, the full architecture."""
  m = dict(run_model_config)
  m["init"] = None
  m["arch"] = {k: list(v) if isinstance(v, tuple) else v
               for k, v in dataclasses.asdict(module.cfg).items()}
  m["variant"] = _any_variant(m["backbone"], m.get("variant", ""))
  m["remat"] = "none"  # inference keeps no activations for a backward pass
  if merged:
    m["finetune"] = "frozen"  # LoRA folded in: the module is built without LoRA factors
  return m


def model_card(run: Path, which: str, config: dict, exported: dict) -> str:
  """README.md of the exported folder, from the run's results.json and config.json."""
  results = _read_json(run / "results.json", missing_ok=True) or {}
  d, m = config["data"], config["model"]
  summary = run_folder.training_summary(run)  # an unfinished run's best comes from its history
  best, test = summary["best"] or {}, results.get("test")
  def fmt(x):
    return "n/a" if x is None else f"{x:.4f}"
  command = results.get("command") or (
      f"python -m iqa_jax.train --config configs/{config.get('name', 'CONFIG')}.py --workdir "
      f"{run}  (reconstructed from config.name; the run's full config is in its config.json)")
  base = m.get("init") or "none (randomly initialised tower, trained whole)"
  fingerprint = results.get("base_checkpoint") or config.get("base_checkpoint")
  lines = [
      f"# {config.get('name', 'iqa')} quality model ({d['name']})", "",
      "Exported by `python -m iqa_jax.export`; load with "
      "`Scorer.from_pretrained(folder)` (no base checkpoint, no torch needed).", "",
      *[f"- {line}" for line in run_folder.describe_training(summary)], "",
      "| field | value |", "|---|---|",
      f"| dataset | {d['name']} (MOS scale x{exported['mos_scale'][0]:g} "
      f"+ {exported['mos_scale'][1]:g}) |",
      f"| seed | {config.get('seed')} |",
      f"| split | {d.get('split')}, val fraction {d.get('val_fraction')}, test fraction "
      f"{d.get('test_fraction')} |",
      f"| checkpoint | {which}"
      + (f" (epoch {best.get('epoch', -1) + 1})" if which == "best" else "") + " |",
      f"| val SRCC / PLCC (best epoch) | {fmt(best.get('srcc'))} / {fmt(best.get('plcc'))} |",
      f"| test SRCC / PLCC | {fmt((test or {}).get('srcc'))} / {fmt((test or {}).get('plcc'))} |",
      f"| backbone | {m['backbone']}, head {m['head']}, finetune {config['model']['finetune']} |",
      f"| LoRA | {_lora_line(exported['lora'])} |",
      f"| weights | {exported['weights_dtype']} |",
      f"| test-time view | {exported['view']['kind']}"
      + (f" ({exported['view']['crops']} crops)" if exported['view']['kind'] == "crops" else "")
      + " |",
      f"| base checkpoint | {base}" + (f" (fingerprint {fingerprint})" if fingerprint else "")
      + " |",
      f"| training command | `{command}` |", "",
  ]
  return "\n".join(lines)


def _lora_line(lora: dict) -> str:
  if not lora["rank"]:
    return "none"
  how = "merged into the weights" if lora["merged"] else "kept separate"
  return f"{how} (rank {lora['rank']}, alpha {lora['alpha']:g})"


def export_run(workdir: str, out: str, *, which: str = "best", dtype: str = "float32",
               merge: bool = True) -> Path:
  """Writes the self-contained folder `out` from the run `workdir`; returns its path."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  out_dir = Path(out)
  check_replaceable(out_dir)
  loaded = load_run(workdir, which)
  config = loaded.info["config"]
  lora = dict(config["model"].get("lora") or {})
  has_lora = config["model"].get("finetune") in LORA_MODES
  merged = merge and has_lora
  params = jax.device_get(loaded.params)
  if merged:
    params = merge_lora(params, float(lora["alpha"]), int(lora["rank"]))
  # C order: safetensors writes an array's buffer as it lies in memory, and the frozen HF
  # kernels are transposed views (Fortran order) that would come back transposed.
  tensors = {k: np.ascontiguousarray(v) for k, v in checkpoint.flatten(params).items()}
  if dtype == "bfloat16":  # the backbone; head, gates and LoRA stay float32 (App. B.1)
    tensors = {k: v.astype(jnp.bfloat16) if k.startswith("backbone.") and "lora_" not in k
               and np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
  exported = {
      "format_version": FORMAT_VERSION,
      "written_by": WRITTEN_BY,
      "model": exported_model_config(config["model"], loaded.model.backbone, merged),
      "preprocessing": loaded.info["preprocessing"],
      "pp": loaded.pp_str,
      "input_size": loaded.input_size,
      "view": {"kind": loaded.view, "crops": loaded.crops},
      "mos_scale": list(loaded.mos_scale),
      "dataset": config["data"]["name"],
      "lora": {"merged": merged, "rank": int(lora.get("rank", 0)) if has_lora else 0,
               "alpha": float(lora.get("alpha", 0.0)) if has_lora else 0.0},
      "weights_dtype": dtype,
      "source": {"run": str(Path(workdir).resolve()), "checkpoint": which,
                 "base_checkpoint": config["model"].get("init")},
  }
  _write_folder(out_dir, tensors, exported, model_card(Path(workdir), which, config, exported))
  return out_dir


def check_replaceable(out_dir: Path) -> None:
  """--out must be new, empty, or a folder export wrote holding only export's files; anything
  else (a run, an HF checkpoint, user files in an export) is refused before anything is read."""
  if not out_dir.exists() and not out_dir.is_symlink():
    return
  def refuse(why: str):
    raise ValueError(f"--out {out_dir} {why}; export replaces only a folder it wrote: pass a new "
                     f"--out")
  if out_dir.is_symlink() or not out_dir.is_dir():
    refuse("is not a folder")
  entries = sorted(p.name for p in out_dir.iterdir())
  if not entries:
    return
  other = [e for e in entries if e not in (WEIGHTS, CONFIG, CARD)]
  if other:
    refuse(f"holds {out_dir / other[0]}, which export did not write ({len(other)} such)")
  try:
    cfg = json.loads((out_dir / CONFIG).read_text())
  except (OSError, ValueError):
    refuse(f"has no readable {CONFIG} of an export")
  if not isinstance(cfg, dict) or not (cfg.get("written_by") == WRITTEN_BY
                                       or set(cfg) == _LEGACY_KEYS):
    refuse(f"holds a {CONFIG} that export did not write")


def _write_folder(out_dir: Path, tensors: dict, exported: dict, card: str) -> None:
  """All three files appear at once: written in a sibling folder, then renamed into place."""
  from safetensors.numpy import save_file
  tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "iqa_jax",
                                                   "format_version": str(FORMAT_VERSION)})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors writes 0600; the rest are 0644
  (tmp / CONFIG).write_text(json.dumps(exported, indent=2))
  (tmp / CARD).write_text(card)
  old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
  if out_dir.exists():
    out_dir.rename(old)
  tmp.rename(out_dir)
  shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path, missing_ok: bool = False):
  if missing_ok and not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise ExportError(f"{path} not found: not an exported model folder (python -m "
                      f"iqa_jax.export writes config.json and {WEIGHTS})") from None
  except json.JSONDecodeError as e:
    raise ExportError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt: "
                      f"export the model again") from None


def _check_complete(path: Path) -> None:
  """A safetensors file is an 8-byte header size, a JSON header, then the data: name the first
  tensor whose bytes lie past the end of a truncated file."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else None
    if n is None or 8 + n > size:
      raise ExportError(f"{path} is truncated ({size} bytes, its header alone needs more); "
                        f"export the model again")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError:
      raise ExportError(f"{path} has a corrupt header; export the model again") from None
  for key, meta in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]
                          if isinstance(kv[1], dict) else -1):
    if key != "__metadata__" and 8 + n + meta["data_offsets"][1] > size:
      raise ExportError(f"{path} is truncated: tensor {key!r} ends at byte "
                        f"{8 + n + meta['data_offsets'][1]}, the file has {size}; export the "
                        f"model again")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  if path.exists():
    _check_complete(path)
  try:
    with safe_open(str(path), framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise ExportError(f"{path} not found: the exported folder is incomplete; export the model "
                      f"again") from None
  except (SafetensorError, OSError, ValueError) as e:
    raise ExportError(f"{path} is truncated or corrupt ({e}); export the model again") from None


def build_exported_model(cfg: dict):
  """config.json -> (IQAModel, template param shapes); no weights are read or initialised."""
  from iqa_jax.models.head import QualityHead, resolve_head
  from iqa_jax.models.model import IQAModel, build_backbone
  model_config = ml_collections.ConfigDict(cfg["model"])
  backbone = build_backbone(model_config)
  model = IQAModel(backbone=backbone.module,
                   head=QualityHead(acts=resolve_head(model_config.head),
                                    hidden=model_config.get("head_hidden", 512)),
                   mean=tuple(cfg["preprocessing"]["mean"]), std=tuple(cfg["preprocessing"]["std"]))
  size = int(cfg["input_size"])
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])
  return model, template


def load_exported(folder: str | os.PathLike) -> LoadedModel:
  """An exported folder -> LoadedModel, checking the format version and every tensor."""
  folder = Path(folder)
  cfg = _read_json(folder / CONFIG)
  if not isinstance(cfg, dict):
    raise ExportError(f"{folder / CONFIG} holds a JSON {type(cfg).__name__}, not the object "
                      f"export writes; export the model again")
  version = cfg.get("format_version")
  if version is None:
    raise ExportError(f"{folder / CONFIG} has no format_version: not a folder written by "
                      f"python -m iqa_jax.export")
  if not isinstance(version, int) or isinstance(version, bool):
    raise ExportError(f"{folder / CONFIG}: format_version is {version!r} "
                      f"({type(version).__name__}), not the integer export writes (e.g. "
                      f"{FORMAT_VERSION}); restore it or export the model again")
  if version > FORMAT_VERSION:
    raise ExportError(f"{folder / CONFIG}: format_version {version} is newer than this iqa_jax "
                      f"reads ({FORMAT_VERSION}); upgrade iqa_jax to load it")
  _check_fields(folder / CONFIG, cfg)
  try:
    model, template = build_exported_model(cfg)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ExportError(f"{folder / CONFIG}: its model or preprocessing cannot be built ({e}); "
                      f"export the model again") from None
  weights = folder / WEIGHTS
  tensors = _read_tensors(weights)
  wanted = checkpoint.flatten(template)
  for key, shape in wanted.items():
    if key not in tensors:
      raise ExportError(f"{weights}: tensor {key!r} is missing (config.json's model needs shape "
                        f"{tuple(shape.shape)}); export the model again")
    if tuple(tensors[key].shape) != tuple(shape.shape):
      raise ExportError(f"{weights}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                        f"config.json's model needs {tuple(shape.shape)}; export the model again")
    dtype = str(tensors[key].dtype)
    allowed = ("float32", "bfloat16") if key.startswith("backbone.") and cfg.get(
        "weights_dtype") == "bfloat16" else ("float32",)
    if dtype not in allowed:
      raise ExportError(f"{weights}: tensor {key!r} is {dtype}, config.json's weights_dtype "
                        f"{cfg.get('weights_dtype')!r} needs {' or '.join(allowed)}; export the "
                        f"model again")
  extra = sorted(set(tensors) - set(wanted))
  if extra:
    raise ExportError(f"{weights}: tensor {extra[0]!r} is not part of the model config.json "
                      f"describes ({len(extra)} such); export the model again")
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: np.asarray(tensors[checkpoint.SEP.join(str(getattr(k, "key", k)) for k in p)],
                              s.dtype), template)
  view = cfg.get("view", {})
  return LoadedModel(model=model, params=params, pp_str=cfg["pp"],
                     input_size=int(cfg["input_size"]), view=view.get("kind", "resize"),
                     crops=int(view.get("crops", 3)),
                     mos_scale=tuple(cfg.get("mos_scale", (1.0, 0.0))),
                     info={"dataset": cfg.get("dataset"), "source": str(folder), "exported": cfg})


def _check_fields(path: Path, cfg: dict) -> None:
  """The fields scoring reads, checked against each other: the pp string must give
  input_size x input_size images (an edited input_size would shift every score)."""
  def bad(field: str, why: str):
    raise ExportError(f"{path}: field {field!r} {why}; export the model again")
  for field, kind in (("pp", str), ("input_size", int), ("model", dict),
                      ("preprocessing", dict)):
    if field not in cfg:
      bad(field, "is missing")
    if not isinstance(cfg[field], kind) or isinstance(cfg[field], bool):
      bad(field, f"is a {type(cfg[field]).__name__}, not a {kind.__name__}")
  view = cfg.get("view", {})
  if not isinstance(view, dict) or view.get("kind", "resize") not in VIEWS or not isinstance(
      view.get("crops", 3), int) or view.get("crops", 3) < 1:
    bad("view", f"is {view!r}, not {{'kind': one of {VIEWS}, 'crops': N >= 1}}")
  scale = cfg.get("mos_scale", [1.0, 0.0])
  if not (isinstance(scale, list) and len(scale) == 2
          and all(isinstance(v, (int, float)) for v in scale)):
    bad("mos_scale", f"is {scale!r}, not [scale, offset]")
  if cfg.get("weights_dtype", "float32") not in ("float32", "bfloat16"):
    bad("weights_dtype", f"is {cfg['weights_dtype']!r}, not float32 or bfloat16")
  try:
    out = pp.get_preprocess_fn(cfg["pp"])({"image": np.zeros((37, 53, 3), np.uint8)})["image"]
  except Exception as e:  # noqa: BLE001 - any failure of the string is the field's fault
    bad("pp", f"is not a pp string this iqa_jax runs ({type(e).__name__}: {e})")
  if tuple(out.shape[:2]) != (cfg["input_size"],) * 2:
    bad("input_size", f"is {cfg['input_size']}, but the pp string {cfg['pp']!r} makes "
        f"{out.shape[0]} x {out.shape[1]} images")


