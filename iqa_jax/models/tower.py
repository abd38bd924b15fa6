"""What every tower family shares: remat policies, the scan layout, and config -> module kwargs."""
from __future__ import annotations

import dataclasses

import jax

# Remat per encoder block: "nothing" saves no activations (anchors: 12x less memory, faster),
# "dots" keeps matmul outputs.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def unscan(params: dict, depth: int, name: str) -> dict:
  """Scan layout (layers stacked under `name`) -> `name_0`, `name_1`, ... for scan=False."""
  params = dict(params)
  stacked = params.pop(name)
  for i in range(depth):
    params[f"{name}_{i}"] = jax.tree.map(lambda a: a[i], stacked)
  return params


def tower_kwargs(model_config, *, transformer: bool = True) -> dict:
  """config.model -> the module fields every family takes (LoRA only when finetune=lora)."""
  from iqa_jax.models.model import DTYPES
  lora = model_config.get("lora", {})
  kwargs = dict(
      dtype=DTYPES[model_config.get("dtype", "float32")],
      lora_rank=lora.get("rank", 4) if model_config.get("finetune", "lora") == "lora" else 0,
      lora_alpha=lora.get("alpha", 8.0),
      lora_dropout=lora.get("dropout", 0.05),
      remat=model_config.get("remat", "none"),
  )
  if transformer:
    kwargs.update(scan=model_config.get("scan", True),
                  attention_impl=model_config.get("attention", "auto"))
  return kwargs


def variant_config(model_config, variants: dict, default: str):
  """A released architecture by name (`config.model.variant`) with `config.model.arch` fields."""
  variant = model_config.get("variant", default)
  if variant not in variants:
    raise ValueError(f"config.model.variant={variant!r}; known: {sorted(variants)}")
  return dataclasses.replace(variants[variant], **dict(model_config.get("arch", {})))
