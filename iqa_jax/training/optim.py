"""Adam with per-partition learning rates; frozen leaves get optax.set_to_zero (no state)."""
from __future__ import annotations

import jax
import ml_collections
import optax

from iqa_jax.models.lora import param_labels

SMALL_SETS = ("clive", "agiqa1k", "agiqa3k", "demo")  # §3.1: constant lr on the small sets


def resolve_schedule(config: ml_collections.ConfigDict) -> str:
  """config.optim.schedule, with `auto` settled by the dataset (§3.1)."""
  if config.optim.schedule != "auto":
    return config.optim.schedule
  return "constant" if config.data.name in SMALL_SETS else "multistep"


def lr_schedule(base_lr: float, optim: ml_collections.ConfigDict, steps_per_epoch: int,
                schedule: str | None = None):
  """constant, or MultiStepLR: x gamma at each milestone epoch (§3.1, App. A.3: 15 and 25, x0.2).
  schedule: the resolved name (default optim.schedule)."""
  schedule = schedule or optim.schedule
  if schedule == "constant":
    return optax.constant_schedule(base_lr)
  if schedule == "multistep":
    bounds = {int(e) * steps_per_epoch: float(optim.gamma) for e in optim.milestones}
    return optax.piecewise_constant_schedule(base_lr, bounds)
  raise ValueError(f"config.optim.schedule must be auto|constant|multistep, got {schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict, params, steps_per_epoch: int):
  """-> (optax transform, labels tree). One optimizer step per effective batch."""
  optim = config.optim
  schedule = resolve_schedule(config)
  labels = param_labels(params, config.model.finetune)

  def adam(lr):
    return optax.adam(lr_schedule(lr, optim, steps_per_epoch, schedule), b1=optim.b1,
                      b2=optim.b2, eps=optim.eps)

  transforms = {
      "head": adam(optim.lr),
      "lora": adam(optim.lr),
      "backbone": adam(optim.backbone_lr),  # App. A.1 full fine-tuning: 5e-6 backbone, 1e-4 head
      "frozen": optax.set_to_zero(),
  }
  used = set(jax.tree.leaves(labels))
  tx = optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
  return tx, labels
