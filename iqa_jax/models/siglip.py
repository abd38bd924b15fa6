"""SigLIP / SigLIP2 (fixed resolution) vision tower in Flax, loading HF `siglip` weights.

Module names follow the HF checkpoint so loading is a short rename table. The image feature is
the MAP-pooled output (App. A.1: image_embeds of SigLIP is the pooler output).
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
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}



@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  patch_size: int = 16
  image_size: int = 512
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  vision_use_head: bool = True

  @classmethod
  def from_hf(cls, cfg: dict) -> SiglipConfig:
    cfg = cfg.get("vision_config", cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


# Variants are data (big_vision style): name -> config of the released checkpoints.
VARIANTS = {
    "so400m/16@512": SiglipConfig(),
    "so400m/14@384": SiglipConfig(patch_size=14, image_size=384),
    "b/16@224": SiglipConfig(768, 3072, 12, 12, 16, 224),
    "l/16@256": SiglipConfig(1024, 4096, 24, 16, 16, 256),
}


class MlpBlock(nn.Module):
  cfg: SiglipConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = ACT[self.cfg.hidden_act](x)
    return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class SelfAttention(nn.Module):
  cfg: SiglipConfig
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    rank, alpha, dropout = self.lora
    d = self.cfg.hidden_size
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q_proj")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k_proj")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block; returns (x, x) so nn.scan can stack per-layer outputs."""
  cfg: SiglipConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    eps = self.cfg.layer_norm_eps
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + SelfAttention(self.cfg, self.dtype, self.lora, self.attention_impl,
                          name="self_attn")(y, deterministic)
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
    x = x + MlpBlock(self.cfg, self.dtype, name="mlp")(y)
    return x, x


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe (torch.nn.MultiheadAttention layout)."""
  cfg: SiglipConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = self.cfg.hidden_size
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, d)).astype(self.dtype)
    q = nn.Dense(d, dtype=self.dtype, name="q")(probe)
    k = nn.Dense(d, dtype=self.dtype, name="k")(x)
    v = nn.Dense(d, dtype=self.dtype, name="v")(x)
    # One query: cuDNN flash attention does not take it (anchors README), so XLA here.
    y = attention(q, k, v, self.cfg.num_attention_heads, "xla")
    y = nn.Dense(d, dtype=self.dtype, name="out_proj")(y)
    z = nn.LayerNorm(self.cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(y)
    y = y + MlpBlock(self.cfg, self.dtype, name="mlp")(z)
    return y[:, 0]


class SiglipVision(nn.Module):
  """(B, H, W, 3) normalised images -> (pooled feature, {named intermediates})."""
  cfg: SiglipConfig
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embeddings_patch_embedding")(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    native = cfg.image_size // p
    posemb = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                        (native * native, d), jnp.float32)
    x = x + resample_grid(posemb, (native, native), (gh, gw)).astype(self.dtype)[None]

    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    layer = EncoderLayer
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(2,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=cfg.num_hidden_layers)
      x, per_layer = layers(cfg, self.dtype, lora, self.attention_impl, name="encoder_layers")(
          x, deterministic)
      out["layers"] = per_layer  # (depth, B, T, D): taps for later analysis
    else:
      for i in range(cfg.num_hidden_layers):
        x, y = layer(cfg, self.dtype, lora, self.attention_impl, name=f"encoder_layers_{i}")(
            x, deterministic)
        out[f"layer_{i}"] = y
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)
    out["encoded"] = x
    if cfg.vision_use_head:
      pooled = MAPHead(cfg, self.dtype, name="head")(x)
    else:
      pooled = x.mean(axis=1)
    out["pre_logits"] = pooled
    return pooled, out


# HF module -> Flax module. `{i}` layers are stacked for nn.scan.
RENAMES = [
    (r"embeddings\.patch_embedding", "embeddings_patch_embedding"),
    (r"encoder\.layers\.{i}\.layer_norm1", "encoder_layers/layer_norm1"),
    (r"encoder\.layers\.{i}\.layer_norm2", "encoder_layers/layer_norm2"),
    (r"encoder\.layers\.{i}\.self_attn\.(?P<proj>[qkv]_proj|out_proj)", "encoder_layers/self_attn/{proj}"),
    (r"encoder\.layers\.{i}\.mlp\.(?P<fc>fc[12])", "encoder_layers/mlp/{fc}"),
    (r"post_layernorm", "post_layernorm"),
    (r"head\.layernorm", "head/layernorm"),
    (r"head\.mlp\.(?P<fc>fc[12])", "head/mlp/{fc}"),
    (r"head\.attention\.out_proj", "head/out_proj"),
]


def _special(name: str, value: np.ndarray):
  """Tensors that are not one module's weight: bare parameters and the fused MAP projection."""
  if name == "embeddings.position_embedding.weight":
    return [("embeddings_position_embedding", value)]
  if name == "head.probe":
    return [("head/probe", value)]
  if name.startswith("head.attention.in_proj_"):
    leaf = "kernel" if name.endswith("weight") else "bias"
    parts = np.split(value, 3, axis=0)
    return [(f"head/{n}/{leaf}", p.T if leaf == "kernel" else p) for n, p in zip("qkv", parts)]
  return None


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF SiglipVisionModel / SiglipModel tensors -> Flax params of `SiglipVision` (scan layout)."""
  return hf_io.to_flax_tree(tensors, RENAMES, special=_special,
                            strip_prefixes=("vision_model.",),
                            skip=(r"text_model\.", r"logit_scale", r"logit_bias"))


def load_hf_siglip(path_or_id: str, **module_kwargs):
  """Local folder or cached hub id -> (SiglipVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_siglip("google/siglip2-so400m-patch16-512", dtype=jnp.bfloat16)
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  cfg = SiglipConfig.from_hf(hf_io.read_json(folder, "config.json"))
  module = SiglipVision(cfg, **module_kwargs)
  params = hf_params(hf_io.read_safetensors(folder))
  if not module.scan:
    params = tower.unscan(params, cfg.num_hidden_layers, "encoder_layers")
  preprocessing = hf_io.read_preprocessing(folder, cfg.image_size)
  return module, params, preprocessing


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  kwargs = dict(
      **tower.tower_kwargs(model_config),
  )
  if model_config.get("init"):
    module, params, pp = load_hf_siglip(model_config.init, **kwargs)
    return Backbone(module, params, pp)
  cfg = tower.variant_config(model_config, VARIANTS, "so400m/16@512")
  pp = {"size": cfg.image_size, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "resample": "bilinear"}
  return Backbone(SiglipVision(cfg, **kwargs), None, pp)
