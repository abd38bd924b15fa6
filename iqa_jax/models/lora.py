"""LoRA as a parameter partition: a Dense with low-rank factors, and optax masks over them.

The low-rank update follows peft (Hu et al. 2022, §3.1 of the paper): y = x W + b +
(alpha / r) * dropout(x) A B, with A Kaiming-uniform and B zeros so training starts at the
pretrained function. Which leaves train is decided by `param_labels`, not by the modules.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LORA_NAMES = ("lora_a", "lora_b")
# Backbone modules with no pretrained weights (CleanDIFT's DP-IQA adapter): they train with the
# head in every mode, and a checkpoint need not hold them.
NEW_MODULES = ("adapter",)
FINETUNE_MODES = ("frozen", "lora", "full", "lora_full")
# Modes whose tower carries LoRA factors. lora_full: LoRA and every backbone weight train, as the
# official code does (train.py calls model.requires_grad_(True) after get_peft_model).
LORA_MODES = ("lora", "lora_full")


def peft_kaiming_uniform(key, shape, dtype=jnp.float32):
  """peft's A init: torch kaiming_uniform_(a=sqrt(5)) on a (r, in) weight, i.e. U(±1/sqrt(in))."""
  fan_in = shape[0]  # our A is stored (in, r)
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Module):
  """Dense layer with an optional rank-`rank` update; rank 0 is a plain Dense."""
  features: int
  rank: int = 0
  alpha: float = 8.0
  dropout: float = 0.0
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.rank > 0:
      # LoRA factors live and compute in float32 (App. B.1 keeps trainable parts in FP32).
      a = self.param("lora_a", peft_kaiming_uniform, (x.shape[-1], self.rank), jnp.float32)
      b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), jnp.float32)
      h = nn.Dropout(self.dropout)(x.astype(jnp.float32), deterministic=deterministic)
      delta = (h @ a) @ b * (self.alpha / self.rank)
      y = (y.astype(jnp.float32) + delta).astype(self.dtype)
    return y


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_labels(params, mode: str):
  """Label each leaf 'head', 'backbone', 'lora' or 'frozen' for `mode` in FINETUNE_MODES;
  backbone modules in NEW_MODULES are labelled 'head'.

  `params` is the model tree {'backbone': ..., 'head': ...}.
  """
  if mode not in FINETUNE_MODES:
    raise ValueError(f"model.finetune must be one of {'|'.join(FINETUNE_MODES)}, got {mode!r}")

  def label(path, _):
    names = _path_names(path)
    if names[0] != "backbone" or any(n in NEW_MODULES for n in names):
      return "head"
    if mode in LORA_MODES and any(n in LORA_NAMES for n in names):
      return "lora"
    if mode in ("full", "lora_full"):
      return "backbone"
    return "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def count_by_label(params, labels) -> dict[str, int]:
  counts: dict[str, int] = {}
  for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
    counts[label] = counts.get(label, 0) + int(np.prod(p.shape))
  return counts
