"""Checkpoints of the paper's official code (drkkgy/NR_IQA_AGM) -> an exported model folder.

The official train.py saves peft's `save_pretrained` of the SiglipModel's LoRA adapter
(adapter_config.json + adapter_model.safetensors, q/k of both towers) and `mlp.pt`, torch.save
of the head's state_dict. Its eval.py scores with the base's processor, `get_image_features`
(the vision tower's MAP-pooled output) and the head. Here the vision LoRA is folded into the
base's q/k weights, the text tower's tensors are dropped, and the head becomes our `agm` (or
`relu`) head, so `score --model`, `evaluate` and `Scorer.from_pretrained` read the result.
"""
from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iqa_jax.data import pp
from iqa_jax.defaults import base_config
from iqa_jax.inference import exported as export
from iqa_jax.models import hf_io, siglip, tower
from iqa_jax.runs import checkpoint

ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_FILE = ("adapter_config.json", "adapter_model.safetensors",
                                              "mlp.pt")
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
SIGLIP_TYPES = ("siglip", "siglip_vision_model")  # fixed-resolution SigLIP / SigLIP2 configs

# Our head's tree <- the official state_dict (models/mlp_heads.py), one row per tensor:
# (our path, official key, transpose). MLP3_Gated is our `agm` head, mlp_3_layer our `relu`.
AGM_HEAD = [
    ("fc1/kernel", "fc1.weight", True), ("fc1/bias", "fc1.bias", False),
    ("act1/g", "act1.g", False), ("act1/alpha", "act1.sig_act.alpha", False),
    ("act1/beta", "act1.sig_act.beta", False), ("act1/a", "act1.lrelu_act.a", False),
    ("fc2/kernel", "fc2.weight", True), ("fc2/bias", "fc2.bias", False),
    ("act2/a", "act2.a", False),
    ("fc3/kernel", "fc3.weight", True), ("fc3/bias", "fc3.bias", False),
]
RELU_HEAD = [(f"fc{i}/{leaf}", f"adapter.{2 * (i - 1)}.{t}", t == "weight")
             for i in (1, 2, 3) for leaf, t in (("kernel", "weight"), ("bias", "bias"))]
HEADS = {"agm": AGM_HEAD, "relu": RELU_HEAD}


PRETRAINED_BACKBONE = "the pretrained base (the official adapter folder holds LoRA only)"


class OfficialCheckpointError(ValueError):
  """An official checkpoint that cannot be converted; the message names the file and the fix."""


def read_adapter(ckpt: Path) -> tuple[dict, dict[str, np.ndarray]]:
  """adapter_config.json (a LoRA one) and adapter_model.safetensors as float32 numpy."""
  cfg_path = ckpt / ADAPTER_CONFIG
  if not cfg_path.is_file():
    raise OfficialCheckpointError(
        f"{cfg_path} not found: --checkpoint must be a folder the official train.py saved "
        f"(adapter_config.json, {ADAPTER_WEIGHTS}, {HEAD_FILE})")
  try:
    cfg = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise OfficialCheckpointError(f"{cfg_path} is not valid JSON ({e}); copy the checkpoint "
                                  f"folder again") from None
  kind = cfg.get("peft_type")
  if kind != "LORA":
    raise OfficialCheckpointError(
        f"{cfg_path}: peft_type {kind!r} (the official DPT / prompt-tuning adapter) cannot be "
        f"converted: only LoRA adapters fold into the tower; train with --peft_method LoRA")
  if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
    raise OfficialCheckpointError(
        f"{cfg_path}: DoRA or per-module rank/alpha patterns are not what the official code "
        f"trains; convert a plain LoRA adapter (r, lora_alpha)")
  weights = ckpt / ADAPTER_WEIGHTS
  if not weights.is_file():
    raise OfficialCheckpointError(
        f"{weights} not found: re-save the adapter with peft's save_pretrained("
        f"safe_serialization=True)")
  try:
    tensors = hf_io.read_safetensors(ckpt, [ADAPTER_WEIGHTS])
  except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
    raise OfficialCheckpointError(f"{weights} is truncated or corrupt ({e}); copy it "
                                  f"again") from None
  return cfg, tensors


def read_head_state(ckpt: Path) -> dict[str, np.ndarray]:
  """mlp.pt (torch.save of the head's state_dict) -> {key: float32 array}, 'module.' dropped."""
  path = ckpt / HEAD_FILE
  if not path.is_file():
    raise OfficialCheckpointError(
        f"{path} not found: the official train.py writes it next to the adapter, but the "
        f"folders shipped in its pretrained_checkpoints/ lack it (its .gitignore drops *.pt), and "
        f"since train.py trains every backbone weight the adapter alone is not the model; copy "
        f"mlp.pt from the training machine's checkpoints/ or best_checkpoints/ folder")
  state = _torch_load(path, lambda e: (
      f"{path} is not a torch state_dict ({type(e).__name__}: {e}); save it with "
      f"torch.save(mlp.state_dict(), ...)"))
  import torch  # _torch_load has imported it
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise OfficialCheckpointError(f"{path} does not hold a state_dict of tensors; save it with "
                                  f"torch.save(mlp.state_dict(), ...)")
  return _as_numpy(state)


def _torch_load(path: Path, unreadable) -> object:
  """torch.load(path, weights_only=True) on the CPU; `unreadable(e)` says what is wrong."""
  try:
    import torch
  except ImportError:
    raise OfficialCheckpointError(f"{path} is a torch pickle and reading it needs torch: "
                                  f"pip install torch") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
    raise OfficialCheckpointError(unreadable(e)) from None


def _as_numpy(state_dict) -> dict[str, np.ndarray]:
  """A torch state_dict -> float32 numpy arrays, DataParallel's `module.` prefix dropped."""
  return {k.removeprefix("module."): v.detach().float().cpu().numpy()
          for k, v in state_dict.items()}


def read_resume_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """resume_state/<stage>_latest.pt of the official train.py (torch.save of a dict, the last
  epoch) -> (the PeftModel's whole state_dict, the head's), float32 numpy. The only file the
  official code writes that holds the trained backbone."""
  if not path.is_file():
    raise OfficialCheckpointError(f"--resume-state {path} not found: the official train.py "
                                  f"writes resume_state/<stage_name>_latest.pt")
  state = _torch_load(path, lambda e: (
      f"{path} cannot be read with weights_only=True ({type(e).__name__}); pass the official "
      f"resume_state file"))
  if not isinstance(state, dict) or not {"model_state_dict", "mlp_state_dict"} <= state.keys():
    raise OfficialCheckpointError(f"{path} has no model_state_dict and mlp_state_dict: not a "
                                  f"resume_state file of the official train.py")
  return _as_numpy(state["model_state_dict"]), _as_numpy(state["mlp_state_dict"])


def split_peft_state(state: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """A PeftModel state_dict -> (base tensors under HF names, LoRA factors under the names
  save_pretrained gives them)."""
  base, adapter = {}, {}
  for key, value in state.items():
    key = key.removeprefix(PEFT_PREFIX)
    if ".lora_A." in key or ".lora_B." in key:
      key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)
      adapter[PEFT_PREFIX + key] = value
    else:
      base[key.replace(".base_layer.", ".")] = value
  return base, adapter


def head_params(state: dict[str, np.ndarray], feature_dim: int, where: Path
                ) -> tuple[str, int, dict]:
  """-> (head name, hidden width, params tree) from an official head state_dict."""
  name = "agm" if "fc1.weight" in state else "relu" if "adapter.0.weight" in state else None
  if name is None:
    raise OfficialCheckpointError(
        f"{where}: neither MLP3_Gated (fc1.weight, act1.g, ...) nor mlp_3_layer "
        f"(adapter.0.weight, ...) keys; found {sorted(state)[:4]}")
  rows = HEADS[name]
  first = state[rows[0][1]]
  hidden = first.shape[0]
  if first.ndim != 2 or first.shape[1] != feature_dim:
    raise OfficialCheckpointError(
        f"{where}: {rows[0][1]} has shape {tuple(first.shape)}, the base's image feature has "
        f"width {feature_dim}: the head was trained on another backbone; pass its --base")
  want = {"fc1/kernel": (feature_dim, hidden), "fc2/kernel": (hidden, hidden),
          "fc3/kernel": (hidden, 1), "fc3/bias": (1,)}
  missing = [key for _, key, _ in rows if key not in state]
  extra = sorted(set(state) - {key for _, key, _ in rows})
  if missing or extra:
    raise OfficialCheckpointError(
        f"{where}: {name} head keys do not match"
        + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
  params: dict = {}
  for ours, key, transpose in rows:
    value = state[key].T if transpose else state[key]
    shape = want.get(ours, (hidden,))
    if value.size == 1 and shape == (hidden,):  # per_channel=False: one scalar per parameter
      value = np.full(shape, value.reshape(()), np.float32)
    if tuple(value.shape) != shape:
      raise OfficialCheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)}, a "
                                    f"{name} head of width {hidden} needs {shape[::-1]}")
    module, leaf = ours.split("/")
    params.setdefault(module, {})[leaf] = np.ascontiguousarray(value, np.float32)
  return name, hidden, params


def fold_lora(tensors: dict[str, np.ndarray], adapter: dict[str, np.ndarray], scale: float,
              where: Path) -> tuple[dict[str, np.ndarray], int]:
  """W + scale * B A on each vision q/k weight (torch layout (out, in)); -> (tensors, number of
  text-tower tensors dropped). Every adapter tensor must fit a base weight."""
  pairs: dict[str, dict[str, np.ndarray]] = {}
  dropped = 0
  for key, value in adapter.items():
    m = LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    if m is None:
      raise OfficialCheckpointError(f"{where}: tensor {key!r} is not a LoRA factor "
                                    f"(lora_A / lora_B); only LoRA adapters convert")
    if m["module"].startswith("text_model."):
      dropped += 1
      continue
    pairs.setdefault(m["module"], {})[m["ab"]] = value
  out = dict(tensors)
  for module, ab in sorted(pairs.items()):
    weight = f"{module}.weight"
    if weight not in out or set(ab) != {"A", "B"}:
      raise OfficialCheckpointError(
          f"{where}: LoRA on {module!r} does not fit the base (no {weight} there, or only one "
          f"of lora_A / lora_B); pass the --base it was trained on")
    w, a, b = out[weight], ab["A"], ab["B"]
    if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
      raise OfficialCheckpointError(
          f"{where}: LoRA on {module!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not fit "
          f"the base weight {tuple(w.shape)}: pass the --base it was trained on")
    out[weight] = (w.astype(np.float64) + scale * (b.astype(np.float64) @ a)).astype(np.float32)
  return out, dropped


def read_base(base: str, where: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
  """The full SiglipModel checkpoint (folder or cached hub id) the adapter was trained on."""
  try:
    folder, config, tensors = hf_io.read_checkpoint(base)
  except FileNotFoundError as e:
    raise OfficialCheckpointError(f"base checkpoint {base!r} ({where}): {e}") from None
  kind = config.get("model_type")
  if kind not in SIGLIP_TYPES:
    raise OfficialCheckpointError(
        f"{folder / 'config.json'}: model_type {kind!r} is not a SigLIP checkpoint; the "
        f"official code trains on SiglipModel (google/siglip2-so400m-patch16-512): pass that "
        f"as --base")
  return folder, config, tensors


def convert_official(checkpoint_dir: str, out: str, *, base: str | None = None,
                     dtype: str = "float32", resume_state: str | None = None,
                     log: Callable[[str], None] = print) -> Path:
  """Writes the exported model folder `out` from an official checkpoint folder; returns `out`.
  resume_state: the official resume_state/*.pt, whose backbone (trained, train.py trains every
  weight), LoRA and head replace the folder's. Everything is checked before anything is written.
  """
  if dtype not in ("float32", "bfloat16"):
    raise OfficialCheckpointError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  ckpt, out_dir = Path(checkpoint_dir), Path(out)
  if not ckpt.is_dir():
    raise OfficialCheckpointError(f"--checkpoint {ckpt} is not a folder: pass the folder the "
                                  f"official train.py saved (adapter_config.json, {HEAD_FILE})")
  if out_dir.exists() and (not out_dir.is_dir() or (
      any(out_dir.iterdir()) and not (out_dir / export.CONFIG).exists())):
    raise OfficialCheckpointError(f"--out {out_dir} exists and is not an exported model folder; "
                                  f"remove it or pass another --out")
  adapter_cfg, adapter = read_adapter(ckpt)
  if resume_state:
    trained, state = read_resume_state(Path(resume_state))
    trained, adapter = split_peft_state(trained)
  else:
    state = read_head_state(ckpt)
  where = "--base" if base else f"base_model_name_or_path of {ckpt / ADAPTER_CONFIG}"
  base = base or adapter_cfg.get("base_model_name_or_path")
  if not base:
    raise OfficialCheckpointError(f"{ckpt / ADAPTER_CONFIG} names no base_model_name_or_path: "
                                  f"pass --base FOLDER_OR_HUB_ID")
  folder, hf_config, tensors = read_base(base, where)
  if resume_state:
    unknown = sorted(k for k in trained if k not in tensors)
    if unknown:
      raise OfficialCheckpointError(f"{resume_state}: tensor {unknown[0]!r} is not in the base "
                                    f"{folder}; pass the --base it was trained on")
    tensors.update(trained)
  rank, alpha = int(adapter_cfg["r"]), float(adapter_cfg["lora_alpha"])
  scale = alpha / np.sqrt(rank) if adapter_cfg.get("use_rslora") else alpha / rank
  tensors, dropped = fold_lora(tensors, adapter, scale, ckpt / ADAPTER_WEIGHTS)
  cfg = siglip.SiglipConfig.from_hf(hf_config)
  head_name, hidden, head = head_params(state, cfg.hidden_size, ckpt / HEAD_FILE)

  model_config = base_config().model.to_dict()
  model_config.update(backbone="siglip", head=head_name, head_hidden=hidden, finetune="frozen",
                      dtype=dtype, remat="none")
  preprocessing = hf_io.read_preprocessing(folder, cfg.image_size)
  exported = {
      "format_version": export.FORMAT_VERSION,
      "model": export.exported_model_config(model_config, types.SimpleNamespace(cfg=cfg), True),
      "preprocessing": preprocessing,
      "pp": pp.native_pp(preprocessing, normalize=False),
      "input_size": int(preprocessing["crop"] or preprocessing["size"]),
      "view": {"kind": "resize", "crops": 3},
      "mos_scale": [1.0, 0.0],  # the official label scale (e.g. KonIQ MOS / 100) is not recorded
      "dataset": None,
      "lora": {"merged": True, "rank": rank, "alpha": alpha},
      "weights_dtype": dtype,
      "source": {"official_checkpoint": str(ckpt.resolve()), "base_checkpoint": str(base),
                 "base_folder": str(folder.resolve()),
                 "resume_state": str(Path(resume_state).resolve()) if resume_state else None},
  }
  params = {"backbone": tower.in_layout(siglip.hf_params(tensors), True, "encoder_layers"),
            "head": head}
  flat = {k: np.ascontiguousarray(v) for k, v in checkpoint.flatten(params).items()}
  _, template = export.build_exported_model(exported)
  wanted = {k: tuple(v.shape) for k, v in checkpoint.flatten(template).items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != wanted:
    diff = sorted(set(got) ^ set(wanted)) or sorted(k for k in got if got[k] != wanted[k])
    raise OfficialCheckpointError(f"{folder}: the base's tensors do not make a SigLIP vision "
                                  f"tower ({diff[0]!r} differs); pass a SiglipModel checkpoint")
  if dtype == "bfloat16":  # the backbone; head and gates stay float32, as export does
    import jax.numpy as jnp
    flat = {k: v.astype(jnp.bfloat16) if k.startswith("backbone.") else v
            for k, v in flat.items()}
  source = resume_state or ckpt / ADAPTER_WEIGHTS
  log(f"{source}: {len(adapter) - dropped} vision LoRA tensors folded in, "
      f"{dropped} text-tower tensors ignored (scoring uses the image tower only)")
  if resume_state:
    log(f"{resume_state}: the trained backbone ({len(trained)} tensors) and head of its last "
        f"epoch replace the base's weights")
  else:
    log("note: the official train.py trains every backbone weight, but the adapter folder "
        "holds LoRA only: this model is the pretrained base + LoRA + head; --resume-state "
        "resume_state/<stage>_latest.pt carries the trained backbone (last epoch)")
  export._write_folder(out_dir, flat, exported, model_card(ckpt, base, exported, dropped))
  return out_dir


def model_card(ckpt: Path, base: str, exported: dict, dropped: int) -> str:
  lora = exported["lora"]
  return "\n".join([
      f"# {exported['model']['head']} quality model converted from the official code", "",
      "Converted by `python -m iqa_jax.convert official` from a checkpoint of the paper's "
      "official code (github.com/drkkgy/NR_IQA_AGM); load with `Scorer.from_pretrained(folder)`.",
      "", "| field | value |", "|---|---|",
      f"| official checkpoint | {ckpt.resolve()} |",
      f"| base checkpoint | {base} |",
      f"| backbone weights | {exported['source']['resume_state'] or PRETRAINED_BACKBONE} |",
      f"| LoRA | rank {lora['rank']}, alpha {lora['alpha']:g}, vision q/k merged into the "
      f"weights; {dropped} text-tower tensors dropped |",
      f"| head | {exported['model']['head']} (official MLP3_Gated or mlp_3_layer), width "
      f"{exported['model']['head_hidden']} |",
      f"| weights | {exported['weights_dtype']} |",
      f"| preprocessing | {exported['pp']}, normalise {exported['preprocessing']['mean']} / "
      f"{exported['preprocessing']['std']} (the base's preprocessor_config.json) |",
      "| score scale | the official training's labels (KonIQ: MOS / 100, others as "
      "docs/official_code.md) |", ""])
