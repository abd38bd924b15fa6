"""DINOv2 in Flax, loading HF `dinov2` weights (facebook/dinov2-large).

Pre-LN blocks with layer scale; the feature is the mean of the final-layernormed last hidden
state over all tokens, CLS and patches (App. A.1). The position table is resampled to the input
grid as HF's Dinov2Embeddings.interpolate_pos_encoding does (torch bicubic in float32).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense
from iqa_jax.models.posemb import resample_grid


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  mlp_ratio: float = 4
  patch_size: int = 14
  image_size: int = 518
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  use_swiglu_ffn: bool = False
  layerscale_value: float = 1.0

  @classmethod
  def from_hf(cls, cfg: dict) -> Dinov2Config:
    return cls(**tower.fields_from(cls, cfg))


VARIANTS = {
    "l/14": Dinov2Config(),  # facebook/dinov2-large
    "b/14": Dinov2Config(768, 12, 12),
    "s/14": Dinov2Config(384, 12, 6),
    "g/14": Dinov2Config(1536, 40, 24, use_swiglu_ffn=True),
}


def pool_tokens(x, pool: str, num_prefix: int):
  """(B, T, D) -> (B, D): mean of all tokens (App. A.1), of the patches alone, or the CLS."""
  if pool == "mean":
    return x.mean(axis=1)
  if pool == "patch_mean":
    return x[:, num_prefix:].mean(axis=1)
  if pool == "cls":
    return x[:, 0]
  raise ValueError(f"config.model.pool={pool!r}; choose mean, patch_mean or cls")


class SwiGLUFFN(nn.Module):
  """The giant model's MLP: one fused input projection, split into gate and value halves."""
  cfg: Dinov2Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    hidden = int(self.cfg.hidden_size * self.cfg.mlp_ratio)
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    gate, value = jnp.split(nn.Dense(2 * hidden, dtype=self.dtype, name="weights_in")(x), 2, -1)
    return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="weights_out")(
        jax.nn.silu(gate) * value)


class SelfAttention(nn.Module):
  cfg: Dinov2Config
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    rank, alpha, dropout = self.lora
    d, bias = self.cfg.hidden_size, self.cfg.qkv_bias
    q = LoraDense(d, rank, alpha, dropout, bias, dtype=self.dtype, name="q_proj")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, bias, dtype=self.dtype, name="k_proj")(x, deterministic)
    v = nn.Dense(d, use_bias=bias, dtype=self.dtype, name="v_proj")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="o_proj")(y)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    lam = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],),
                     jnp.float32)
    return x * lam.astype(x.dtype)


class Layer(nn.Module):
  """x + ls1(attention(norm1 x)); x + ls2(mlp(norm2 x)). DINOv3 brings its own attention, MLP.

  `attention` and `mlp` build the two sub-blocks: attention(name=...)(x, *shared,
  deterministic=...), mlp(name=...)(x); `shared` (DINOv3's RoPE tables) passes to attention.
  """
  attention: Callable[..., nn.Module]
  mlp: Callable[..., nn.Module]
  layer_norm_eps: float
  layerscale_value: float
  dtype: Any

  @nn.compact
  def __call__(self, x, *shared, deterministic: bool = True):
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    y = self.attention(name="attention")(y, *shared, deterministic=deterministic)
    x = x + LayerScale(self.layerscale_value, name="layer_scale1")(y)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    return x + LayerScale(self.layerscale_value, name="layer_scale2")(self.mlp(name="mlp")(y))


class Dinov2(tower.TransformerTower):
  """(B, H, W, 3) normalised images -> (mean of last hidden state, {named intermediates})."""
  cfg: Dinov2Config
  pool: str = "mean"  # mean (all tokens, App. A.1) | patch_mean | cls

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.hidden_size
    x, (gh, gw) = tower.embed_patches(images, d, p, self.dtype, "embeddings_patch_embeddings")
    cls = self.param("embeddings_cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    x = tower.prepend(x, cls)
    native = cfg.image_size // p
    posemb = self.param("embeddings_position_embeddings", nn.initializers.normal(0.02),
                        (native * native + 1, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:1], resample_grid(posemb[1:], (native, native), (gh, gw))])
    x = x + posemb.astype(self.dtype)[None]

    if cfg.use_swiglu_ffn:
      mlp = functools.partial(SwiGLUFFN, cfg, self.dtype)
    else:
      mlp = functools.partial(tower.MlpBlock, int(d * cfg.mlp_ratio), cfg.hidden_act, self.dtype)
    layer = functools.partial(
        Layer, functools.partial(SelfAttention, cfg, self.dtype, self.lora, self.attention_impl),
        mlp, cfg.layer_norm_eps, cfg.layerscale_value, self.dtype)
    x, out = self.encoder(layer, cfg.num_hidden_layers, "encoder_layer")(x, deterministic=not train)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    out["encoded"] = x  # HF last_hidden_state
    pooled = pool_tokens(x, self.pool, 1)
    out["pre_logits"] = pooled
    return pooled, out


# The weight table (hf_io.to_flax_tree). Hub checkpoints name attention
# `attention.attention.{query,key,value}` and `attention.output.dense`; transformers>=5
# modules call them q/k/v/o_proj: both load.
_LAYER = r"encoder\.layer\.{i}\."
WEIGHTS = [
    (r"embeddings\.patch_embeddings\.projection", "embeddings_patch_embeddings"),
    (r"embeddings\.cls_token", "embeddings_cls_token", hf_io.as_is),
    (r"embeddings\.position_embeddings", "embeddings_position_embeddings", hf_io.drop_batch_axis),
    (_LAYER + r"(?P<m>norm[12]|layer_scale[12])", "encoder_layer/{m}"),
    (_LAYER + r"attention\.attention\.query", "encoder_layer/attention/q_proj"),
    (_LAYER + r"attention\.attention\.key", "encoder_layer/attention/k_proj"),
    (_LAYER + r"attention\.attention\.value", "encoder_layer/attention/v_proj"),
    (_LAYER + r"attention\.output\.dense", "encoder_layer/attention/o_proj"),
    (_LAYER + r"attention\.(?P<m>[qkvo]_proj)", "encoder_layer/attention/{m}"),
    (_LAYER + r"mlp\.(?P<m>fc[12]|weights_in|weights_out)", "encoder_layer/mlp/{m}"),
    (r"layernorm", "layernorm"),
    (r"embeddings\.mask_token|classifier\..*", None),
]


def load_hf_dinov2(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (Dinov2 module, params, native preprocessing).

  >>> module, params, pp = load_hf_dinov2("facebook/dinov2-large", dtype=jnp.bfloat16)
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  module = Dinov2(Dinov2Config.from_hf(config), **module_kwargs)
  # Dinov2ForImageClassification nests the backbone under `dinov2.`.
  params = hf_io.to_flax_tree(tensors, WEIGHTS, strip_prefixes=("dinov2.",))
  params = tower.in_layout(params, module.scan, "encoder_layer")
  return tower.Backbone(module, params, hf_io.read_preprocessing(folder, 224))


def random_preprocessing(cfg: Dinov2Config) -> dict:
  """ImageNet statistics, bicubic, 256 then crop 224 (preprocessor_config.json of dinov2-large)."""
  return {"size": 256, "crop": 224, "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225), "resample": "bicubic"}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_dinov2, Dinov2, VARIANTS, "l/14", random_preprocessing,
                     pool=model_config.get("pool", "mean"))
