"""What every backbone family shares: its module fields, the encoder stack, the MLP block, the
activations, remat policies, and config.model -> module fields.

The families import from here; nothing here imports a family, so `model.py`'s registry can
import every family without a cycle.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from iqa_jax.defaults import base_config
from iqa_jax.models.lora import LORA_MODES

MODEL_DEFAULTS = base_config().model  # what a field left out of config.model means
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# `hidden_act` as the HF configs spell it (`gelu` is exact erf GELU, as torch's default).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# Remat per encoder block: "nothing" saves no activations (anchors: 12x less memory, faster),
# "dots" keeps matmul outputs.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


# The layer loop under scan=True (the stacked param layout either way): "full" unrolls it. On the
# CPU the B/16@224 LoRA train step without remat ran 25% faster unrolled, with the same loss bit
# for bit; with remat, and for inference, it gained nothing and compiled longer
# (docs/performance.md). Elsewhere one loop compiles once per block.
SCAN_UNROLL = ("auto", "loop", "full")


def unrolled(requested: str, remat: str, training: bool) -> bool:
  """model.scan_unroll -> whether the scanned layers are unrolled ('auto': when training
  without remat on the CPU)."""
  if requested not in SCAN_UNROLL:
    raise ValueError(f"model.scan_unroll must be {'|'.join(SCAN_UNROLL)}, got {requested!r}")
  if requested == "auto":
    return training and remat == "none" and jax.default_backend() == "cpu"
  return requested == "full"


class Backbone(NamedTuple):
  """What a family's `build(model_config)` and `load_*` return; unpacks as (module, params, pp)."""
  module: nn.Module          # __call__(images NHWC, train) -> (feature (B, d), {intermediates})
  params: dict | None        # pretrained params in the module's layout, or None for random init
  preprocessing: dict        # native recipe: size, crop, mean, std, resample


class Tower(nn.Module):
  """The fields every backbone module takes beside its architecture `cfg` (see `tower_kwargs`)."""
  cfg: Any  # the family's architecture dataclass
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  lora_rank: int = 0  # LoRA on q, k (§3.1); 0: none
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything, per block

  @property
  def lora(self) -> tuple[int, float, float]:
    return self.lora_rank, self.lora_alpha, self.lora_dropout


class TransformerTower(Tower):
  """A tower of attention blocks: also how its `Encoder` is laid out and which kernel attends."""
  scan: bool = True  # True: blocks stacked under one name (nn.scan); False: one name per block
  scan_unroll: str = "auto"  # with scan: auto | loop | full (SCAN_UNROLL)
  attention_impl: str = "auto"  # auto | xla | cudnn

  def encoder(self, layer: Callable[..., nn.Module], depth: int, name: str) -> Encoder:
    """The tower's `depth` blocks in its own layout, loop and remat."""
    return Encoder(layer, depth, self.scan, self.remat, name, self.scan_unroll)


class MlpBlock(nn.Module):
  """fc1 -> activation -> fc2 back to the input width (the HF and timm ViT MLP)."""
  hidden: int
  act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.act](h))


def embed_patches(images, width: int, patch: int, dtype, name: str, use_bias: bool = True):
  """(B, H, W, 3) -> (B, gh * gw, width) tokens of p x p patches, and the grid (gh, gw).

  Called inside a tower's compact method: the conv's params are the tower's `name`.
  """
  x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=use_bias,
              dtype=dtype, name=name)(images.astype(dtype))
  b, gh, gw, _ = x.shape
  return x.reshape(b, gh * gw, width), (gh, gw)


def prepend(x, tokens):
  """(B, T, D) tokens after learned ones (CLS, registers: (..., n, D) or (D,)), for each image."""
  tokens = tokens.reshape(-1, x.shape[-1]).astype(x.dtype)
  return jnp.concatenate([jnp.broadcast_to(tokens, (x.shape[0],) + tokens.shape), x], axis=1)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """`depth` blocks `layer(name=...)`, each called as block(x, *shared, deterministic=...) -> x.

  Not a Linen module: it is built and called inside a tower's compact method, so the blocks sit
  in the tower's own param tree, as the checkpoints name them: `name` with a leading depth axis
  (scan=True) or `name_0`, `name_1`, ... (scan=False). `shared` (a mask, RoPE tables) reaches
  every block unchanged. Returns (x, intermediates): `layers` (depth, B, T, D) or `layer_{i}`.
  """
  layer: Callable[..., nn.Module]
  depth: int
  scan: bool = True
  remat: str = "none"
  name: str = "encoder_layers"
  unroll: str = "loop"  # with scan: SCAN_UNROLL

  def __call__(self, x, *shared, deterministic: bool):
    unroll = self.scan and unrolled(self.unroll, self.remat, training=not deterministic)
    def step(block, x, shared):
      # `deterministic` is closed over, so remat and scan see it as a Python constant.
      x = block(x, *shared, deterministic=deterministic)
      return x, x

    if self.remat != "none":
      # A loop body is never CSE'd with the forward; unrolled layers need remat's barrier.
      step = nn.remat(step, prevent_cse=not self.scan or unroll,
                      policy=REMAT_POLICIES[self.remat])
    if self.scan:
      step = nn.scan(step, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=nn.broadcast, length=self.depth, unroll=self.depth if unroll else 1)
      x, stacked = step(self.layer(name=self.name), x, shared)
      return x, {"layers": stacked}
    out = {}
    for i in range(self.depth):
      x, out[f"layer_{i}"] = step(self.layer(name=f"{self.name}_{i}"), x, shared)
    return x, out


def in_layout(params: dict, scan: bool, name: str) -> dict:
  """Loaded params, blocks stacked under `name` (scan=True), in a tower's `Encoder` layout."""
  return params if scan else unscan(params, name)


def unscan(params: dict, name: str) -> dict:
  """Scan layout (layers stacked under `name`) -> `name_0`, `name_1`, ... for scan=False."""
  params = dict(params)
  stacked = params.pop(name)
  for i in range(len(jax.tree.leaves(stacked)[0])):
    params[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def fields_from(cls, mapping: Mapping) -> dict:
  """The entries of `mapping` that are fields of the dataclass `cls`; lists become tuples."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items() if k in names}


def model_field(model_config, key: str):
  """config.model[key]; a field the config leaves out takes base_config's value (one source of
  defaults)."""
  return model_config.get(key, MODEL_DEFAULTS[key])


def tower_kwargs(model_config, *, transformer: bool = True) -> dict:
  """config.model -> the module fields every family takes (LoRA only in the LORA_MODES)."""
  def get(key):
    return model_field(model_config, key)
  lora = {**MODEL_DEFAULTS.lora.to_dict(), **dict(get("lora"))}
  kwargs = dict(
      dtype=DTYPES[get("dtype")],
      lora_rank=lora["rank"] if get("finetune") in LORA_MODES else 0,
      lora_alpha=lora["alpha"],
      lora_dropout=lora["dropout"],
      remat=get("remat"),
  )
  if transformer:
    unrolled(get("scan_unroll"), get("remat"), training=False)  # a bad value stops here
    kwargs.update(scan=get("scan"), scan_unroll=get("scan_unroll"), attention_impl=get("attention"))
  return kwargs


def build(model_config, load: Callable[..., Backbone], module: type[Tower], variants: dict,
          default: str, preprocessing: Callable[[Any], dict], **fields) -> Backbone:
  """A family's registry entry: the checkpoint at `config.model.init` through `load`, or, with
  init=None, a random `module` of `config.model.variant` (a key of `variants`, else `default`)
  with `config.model.arch` fields, preprocessed by `preprocessing(cfg)`. `fields` are the
  family's own module fields (DINO's pool, PE's tap_layer)."""
  kwargs = tower_kwargs(model_config, transformer=issubclass(module, TransformerTower)) | fields
  if model_config.get("init"):
    return load(model_config.init, **kwargs)
  cfg = variant_config(model_config, variants, default)
  return Backbone(module(cfg, **kwargs), None, preprocessing(cfg))


def variant_config(model_config, variants: dict, default: str):
  """A released architecture by name (`config.model.variant`) with `config.model.arch` fields."""
  variant = model_config.get("variant", default)
  if variant not in variants:
    raise ValueError(f"config.model.variant={variant!r}; known: {sorted(variants)}")
  arch = {k: tuple(v) if isinstance(v, (list, tuple)) else v
          for k, v in dict(model_config.get("arch", {})).items()}
  return dataclasses.replace(variants[variant], **arch)
