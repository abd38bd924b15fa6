"""DINOv2 in Flax, loading HF `dinov2` weights (facebook/dinov2-large).

Pre-LN blocks with layer scale; the feature is the mean of the final-layernormed last hidden
state over all tokens, CLS and patches (App. A.1). The position table is resampled to the input
grid as HF's Dinov2Embeddings.interpolate_pos_encoding does (torch bicubic in float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense
from iqa_jax.models.posemb import resample_grid

ACT = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}



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
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


VARIANTS = {
    "l/14": Dinov2Config(),  # facebook/dinov2-large
    "b/14": Dinov2Config(768, 12, 12),
    "s/14": Dinov2Config(384, 12, 6),
    "g/14": Dinov2Config(1536, 40, 24, use_swiglu_ffn=True),
}


class Mlp(nn.Module):
  cfg: Dinov2Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    hidden = int(self.cfg.hidden_size * self.cfg.mlp_ratio)
    x = nn.Dense(hidden, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(ACT[self.cfg.hidden_act](x))


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
  def __call__(self, x, deterministic: bool = True):
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
  """x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)). Returns (x, x) for nn.scan."""
  cfg: Dinov2Config
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    y = SelfAttention(cfg, self.dtype, self.lora, self.attention_impl, name="attention")(
        y, deterministic)
    x = x + LayerScale(cfg.layerscale_value, name="layer_scale1")(y)
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    mlp = SwiGLUFFN if cfg.use_swiglu_ffn else Mlp
    y = mlp(cfg, self.dtype, name="mlp")(y)
    x = x + LayerScale(cfg.layerscale_value, name="layer_scale2")(y)
    return x, x


class Dinov2(nn.Module):
  """(B, H, W, 3) normalised images -> (mean of last hidden state, {named intermediates})."""
  cfg: Dinov2Config
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"
  pool: str = "mean"  # mean (all tokens, App. A.1) | patch_mean | cls

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    p, d = cfg.patch_size, cfg.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embeddings_patch_embeddings")(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = self.param("embeddings_cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    native = cfg.image_size // p
    posemb = self.param("embeddings_position_embeddings", nn.initializers.normal(0.02),
                        (native * native + 1, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:1], resample_grid(posemb[1:], (native, native), (gh, gw))])
    x = x + posemb.astype(self.dtype)[None]

    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    layer = Layer
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(2,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      layers = nn.scan(layer, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=cfg.num_hidden_layers)
      x, per_layer = layers(cfg, self.dtype, lora, self.attention_impl, name="encoder_layer")(
          x, deterministic)
      out["layers"] = per_layer  # (depth, B, T, D)
    else:
      for i in range(cfg.num_hidden_layers):
        x, y = layer(cfg, self.dtype, lora, self.attention_impl, name=f"encoder_layer_{i}")(
            x, deterministic)
        out[f"layer_{i}"] = y
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    out["encoded"] = x  # HF last_hidden_state
    pooled = {"mean": lambda: x.mean(axis=1), "patch_mean": lambda: x[:, 1:].mean(axis=1),
              "cls": lambda: x[:, 0]}[self.pool]()
    out["pre_logits"] = pooled
    return pooled, out


# HF module -> Flax module. Hub checkpoints name attention `attention.attention.{query,key,value}`
# and `attention.output.dense`; transformers>=5 modules call them q/k/v/o_proj: both load.
RENAMES = [
    (r"embeddings\.patch_embeddings\.projection", "embeddings_patch_embeddings"),
    (r"encoder\.layer\.{i}\.(?P<n>norm[12])", "encoder_layer/{n}"),
    (r"encoder\.layer\.{i}\.attention\.attention\.query", "encoder_layer/attention/q_proj"),
    (r"encoder\.layer\.{i}\.attention\.attention\.key", "encoder_layer/attention/k_proj"),
    (r"encoder\.layer\.{i}\.attention\.attention\.value", "encoder_layer/attention/v_proj"),
    (r"encoder\.layer\.{i}\.attention\.output\.dense", "encoder_layer/attention/o_proj"),
    (r"encoder\.layer\.{i}\.attention\.(?P<proj>[qkvo]_proj)", "encoder_layer/attention/{proj}"),
    (r"encoder\.layer\.{i}\.mlp\.(?P<fc>fc[12]|weights_in|weights_out)", "encoder_layer/mlp/{fc}"),
    (r"encoder\.layer\.{i}\.(?P<ls>layer_scale[12])", "encoder_layer/{ls}"),
    (r"layernorm", "layernorm"),
]


def _special(name: str, value: np.ndarray):
  if name == "embeddings.cls_token":
    return [("embeddings_cls_token", value)]
  if name == "embeddings.position_embeddings":
    return [("embeddings_position_embeddings", value[0])]
  return None


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF Dinov2Model tensors -> Flax params of `Dinov2` (scan layout)."""
  return hf_io.to_flax_tree(tensors, RENAMES, special=_special, strip_prefixes=("dinov2.",),
                            skip=(r"embeddings\.mask_token", r"classifier\."))


def load_hf_dinov2(path_or_id: str, **module_kwargs):
  """Local folder or cached hub id -> (Dinov2 module, params, native preprocessing).

  >>> module, params, pp = load_hf_dinov2("facebook/dinov2-large", dtype=jnp.bfloat16)
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  cfg = Dinov2Config.from_hf(hf_io.read_json(folder, "config.json"))
  module = Dinov2(cfg, **module_kwargs)
  params = hf_params(hf_io.read_safetensors(folder))
  if not module.scan:
    params = tower.unscan(params, cfg.num_hidden_layers, "encoder_layer")
  return module, params, hf_io.read_preprocessing(folder, 224)


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  kwargs = dict(
      **tower.tower_kwargs(model_config),
      pool=model_config.get("pool", "mean"),
  )
  if model_config.get("init"):
    return Backbone(*load_hf_dinov2(model_config.init, **kwargs))
  cfg = tower.variant_config(model_config, VARIANTS, "l/14")
  # ImageNet statistics, bicubic, resize 256 + crop 224 (preprocessor_config.json of dinov2-large).
  pp = {"size": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "resample": "bicubic"}
  return Backbone(Dinov2(cfg, **kwargs), None, pp)
