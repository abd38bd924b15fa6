"""Reading Hugging Face checkpoints without torch: folders, hub ids in the cache, safetensors."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


class CheckpointNotFoundError(FileNotFoundError):
  pass


def resolve_checkpoint(path_or_id: str) -> Path:
  """A local folder as is; a hub id through the local HF cache (never downloads)."""
  p = Path(os.path.expanduser(str(path_or_id)))
  if p.is_dir():
    return p
  if p.exists():
    raise CheckpointNotFoundError(
        f"{p} is a file; pass the checkpoint folder that holds config.json")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_id), local_files_only=True,
                                  allow_patterns=["*.json", "*.safetensors"]))
  except Exception as e:  # noqa: BLE001 - any hub failure means "not in the cache"
    raise CheckpointNotFoundError(
        f"No checkpoint at {path_or_id!r}: it is not a local folder and not in the Hugging Face "
        f"cache ({type(e).__name__}). Download it on a connected machine with "
        f"`huggingface-cli download {path_or_id}` and copy the cache over (or set HF_HOME), or "
        f"pass --config.model.init=/path/to/folder holding config.json and *.safetensors.") from e


def read_json(folder: Path, name: str) -> dict:
  f = folder / name
  if not f.exists():
    raise CheckpointNotFoundError(f"{f} is missing; a Hugging Face checkpoint folder needs it")
  with open(f) as fh:
    return json.load(fh)


def read_safetensors(folder: Path, files: list[str] | None = None) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as numpy float32, single-file or sharded (or just `files`)."""
  from safetensors import safe_open
  index = folder / "model.safetensors.index.json"
  if files is None and index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif files is None:
    files = sorted(f.name for f in folder.glob("*.safetensors"))
  if not files:
    raise CheckpointNotFoundError(f"No *.safetensors in {folder}. Re-save the model with "
                                  f"`model.save_pretrained(folder, safe_serialization=True)`.")
  tensors = {}
  for name in files:
    # framework="flax" would need jax arrays; numpy keeps host memory and bf16 via ml_dtypes.
    with safe_open(str(folder / name), framework="numpy") as f:
      for key in f.keys():
        tensors[key] = np.asarray(f.get_tensor(key)).astype(np.float32)
  return tensors


def read_preprocessing(folder: Path, default_size: int) -> dict:
  """The checkpoint's native recipe from preprocessor_config.json: size, mean, std, resample."""
  f = folder / "preprocessor_config.json"
  cfg = json.loads(f.read_text()) if f.exists() else {}
  size = cfg.get("size", default_size)
  if isinstance(size, dict):
    size = size.get("height", size.get("shortest_edge", default_size))
  crop = cfg.get("crop_size")
  if isinstance(crop, dict):
    crop = crop.get("height")
  return {
      "size": int(size),
      "crop": int(crop) if cfg.get("do_center_crop") and crop else None,
      "mean": tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5))),
      "std": tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5))),
      # PIL's resample codes as HF stores them: 2 bilinear, 3 bicubic.
      "resample": {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(
          int(cfg.get("resample", 2)), "bilinear"),
  }


def read_checkpoint(path_or_id: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
  """Local folder or cached hub id -> (folder, config.json, all tensors as float32 numpy)."""
  folder = resolve_checkpoint(path_or_id)
  return folder, read_json(folder, "config.json"), read_safetensors(folder)


# A weight table row: (checkpoint regex, Flax path template[, transform]). A row without a
# transform names a torch module and takes its `.weight`, `.bias`, ... tensors through
# `convert_leaf`. A row with a transform names whole tensors; a group `leaf` tells the transform
# which torch leaf a tensor is (`in_proj_weight`, `qkv.bias`). `{i}` marks a layer index: those
# tensors are stacked on axis 0, the nn.scan layout. Other named groups fill the template.
# A row (regex, None) names tensors the model does not use (a text tower, a classifier).
# A transform maps (torch leaf or None, tensor) to [(Flax sub-path or "", array), ...].
Transform = Callable[[str | None, np.ndarray], list[tuple[str, np.ndarray]]]
WeightTable = Iterable[tuple[str, str | None] | tuple[str, str, Transform]]


def convert_leaf(hf_param: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """torch -> Flax: Linear weight^T as kernel, conv OIHW as HWIO, norm weight as scale."""
  if hf_param == "weight":
    if value.ndim == 2:
      return "kernel", value.T
    if value.ndim == 4:
      return "kernel", value.transpose(2, 3, 1, 0)
    return "scale", value
  return hf_param, value


def torch_module(leaf: str | None, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """The default transform: a torch module's tensor -> its Flax leaf (`convert_leaf`)."""
  return [convert_leaf(leaf, value)]


def as_is(leaf: str | None, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """A bare parameter (token, probe, position table) that the model holds as stored."""
  return [("", value)]


def drop_batch_axis(leaf: str | None, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """A (1, n, d) parameter held as (n, d): the position tables of DINOv2 and timm."""
  return [("", value.reshape(value.shape[1:]))]


def split(*parts: str) -> Transform:
  """A fused projection (torch rows [q; k; v]) -> one Flax module per part: `part/kernel`, ..."""
  def transform(leaf, value):
    return [(f"{part}/{name}", v) for part, chunk in zip(parts, np.split(value, len(parts)),
                                                         strict=True)
            for name, v in [convert_leaf(leaf, chunk)]]
  return transform


def to_flax_tree(tensors: dict[str, np.ndarray], table: WeightTable, *,
                 strip_prefixes: tuple[str, ...] = ()) -> dict:
  """Map checkpoint tensors through the weight `table` into a nested Flax params dict.

  Every tensor must match a row (the first that matches wins): a new tensor in a checkpoint
  is an error, never silently dropped.
  """
  rows = []
  for rx, dst, *transform in table:
    rx = "(?:" + rx.replace("{i}", r"(?P<i>\d+)") + ")"
    if dst is not None and not transform:
      rx += r"\.(?P<leaf>\w+)"
    rows.append((re.compile(f"^{rx}$"), dst, transform[0] if transform else torch_module))
  flat: dict[str, np.ndarray] = {}
  stacked: dict[str, dict[int, np.ndarray]] = {}
  unused = []
  for name, value in tensors.items():
    for pre in strip_prefixes:
      if name.startswith(pre):
        name = name[len(pre):]
        break
    hit = next(((m, dst, t) for rx, dst, t in rows if (m := rx.match(name))), None)
    if hit is None:
      unused.append(name)
      continue
    m, dst, transform = hit
    if dst is None:
      continue
    groups = m.groupdict()
    module = dst.format(**{k: v for k, v in groups.items() if k not in ("i", "leaf")})
    for sub, v in transform(groups.get("leaf"), value):
      path = f"{module}/{sub}" if sub else module
      if groups.get("i") is None:
        flat[path] = v
      else:
        stacked.setdefault(path, {})[int(groups["i"])] = v
  if unused:
    raise ValueError(f"Checkpoint tensors with no weight-table row: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''}")
  for path, layers in stacked.items():
    flat[path] = np.stack([layers[i] for i in sorted(layers)])
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def merge_loaded(init_params, loaded, where: str = "checkpoint"):
  """Overlay loaded arrays on freshly initialised params; shapes must agree, LoRA leaves and
  new modules (lora.NEW_MODULES) keep their initialisation."""
  from iqa_jax.models.lora import NEW_MODULES
  def merge(init, new, path):
    if isinstance(init, dict):
      out = {}
      for k, v in init.items():
        if k in new:
          out[k] = merge(v, new[k], path + "/" + k)
        elif k.startswith("lora_") or k in NEW_MODULES:
          out[k] = v
        else:
          raise ValueError(f"{where}: no weight for {path}/{k}")
      extra = set(new) - set(init)
      if extra:
        raise ValueError(f"{where}: weights with no place in the model under {path or '/'}: "
                         f"{sorted(extra)[:8]}")
      return out
    if tuple(init.shape) != tuple(new.shape):
      raise ValueError(f"{where}: {path} has shape {tuple(new.shape)} but the model expects "
                       f"{tuple(init.shape)}; does the config match the checkpoint?")
    return np.asarray(new, dtype=init.dtype)
  return merge(init_params, loaded, "")
