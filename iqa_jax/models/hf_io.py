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
    raise CheckpointNotFoundError(f"{p} is a file; pass the checkpoint folder that holds config.json")
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


# A rename rule: (HF module regex, Flax module path template). Parameter names follow the rule in
# `convert_leaf`; `{i}` in a regex marks a layer index, stacked on axis 0 for nn.scan.
RenameTable = Iterable[tuple[str, str]]


def convert_leaf(hf_param: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """torch -> Flax: Linear weight^T as kernel, conv OIHW as HWIO, norm weight as scale."""
  if hf_param == "weight":
    if value.ndim == 2:
      return "kernel", value.T
    if value.ndim == 4:
      return "kernel", value.transpose(2, 3, 1, 0)
    return "scale", value
  return hf_param, value


def to_flax_tree(tensors: dict[str, np.ndarray], table: RenameTable, *,
                 strip_prefixes: tuple[str, ...] = (), special: Callable | None = None,
                 skip: tuple[str, ...] = ()) -> dict:
  """Map HF tensor names through `table` into a nested Flax params dict.

  `special(name, value)` may return [(flax_path, value), ...] for tensors that are not one
  module's weight (fused projections, bare parameters); None falls through to the table.
  """
  compiled = [(re.compile("^" + rx.replace("{i}", r"(?P<i>\d+)") + r"\.(?P<p>\w+)$"), dst)
              for rx, dst in table]
  flat: dict[str, np.ndarray] = {}
  stacked: dict[str, dict[int, np.ndarray]] = {}
  unused = []
  for name, value in tensors.items():
    for pre in strip_prefixes:
      if name.startswith(pre):
        name = name[len(pre):]
        break
    if any(re.match(s, name) for s in skip):
      continue
    pairs = special(name, value) if special else None
    if pairs is None:
      for rx, dst in compiled:
        m = rx.match(name)
        if m:
          leaf, v = convert_leaf(m.group("p"), value)
          path = dst.format(**{k: v for k, v in m.groupdict().items() if k != "i"}) + "/" + leaf
          pairs = [(path, v, int(m.group("i")) if m.groupdict().get("i") else None)]
          break
    else:
      pairs = [(p, v, None) for p, v in pairs]
    if pairs is None:
      unused.append(name)
      continue
    for path, v, layer in pairs:
      if layer is None:
        flat[path] = v
      else:
        stacked.setdefault(path, {})[layer] = v
  if unused:
    raise ValueError(f"Checkpoint tensors with no rename rule: {unused[:8]}"
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
